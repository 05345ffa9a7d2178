"""API-key authentication (``X-API-Key`` or ``Authorization: Bearer``) and rate limiting.

Authenticating a call gives its :class:`~enginedge.application.tenancy.Principal`: the
tenant of the key (a short hash of it), the key's name and whether it is an operator's.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from enginedge.adapters.http.params import context_of
from enginedge.application import requests as use
from enginedge.application.tenancy import Principal, Tenants, tenant_of
from enginedge.config import ApiKey

api_key_header = APIKeyHeader(
    name="X-API-Key",
    auto_error=False,
    description="One of the keys in API_KEYS or ADMIN_API_KEYS",
)
bearer = HTTPBearer(auto_error=False, description="The same key as a bearer token")


def caller_id(key: str) -> str:
    """A short hash that identifies the caller in the store; the key itself is never kept."""
    return tenant_of(key)


class KeyChecker:
    """Compares a presented key with every configured key in constant time."""

    def __init__(self, keys: Sequence[ApiKey]) -> None:
        self._keys = [(k.key.encode(), Principal(tenant_of(k.key), k.name, k.admin)) for k in keys]
        self.tenants = Tenants({p.tenant: p.name for _, p in self._keys if p.name})

    def check(self, presented: str | None) -> Principal:
        """The caller a valid key stands for; 401 ``INVALID_API_KEY`` otherwise."""
        if presented:
            candidate = presented.encode()
            # No early exit: the time taken does not depend on which key matched.
            matched: Principal | None = None
            for key, principal in self._keys:
                if hmac.compare_digest(candidate, key):
                    matched = principal
            if matched is not None:
                return matched
        raise HTTPException(
            status_code=401,
            detail="missing or invalid API key: send it as X-API-Key or Authorization: Bearer",
            headers={"WWW-Authenticate": "Bearer"},
        )


def presented_key(
    header_key: str | None, credentials: HTTPAuthorizationCredentials | None
) -> str | None:
    if header_key:
        return header_key
    if credentials is not None and credentials.scheme.lower() == "bearer":
        return credentials.credentials
    return None


def tenants_of(request: Request) -> Tenants:
    """The names of the keys of the app serving ``request``."""
    checker: KeyChecker = request.app.state.keys
    return checker.tenants


async def authenticated(
    request: Request,
    header_key: Annotated[str | None, Depends(api_key_header)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Principal:
    """Authenticate the caller and count the call against its rate limit."""
    checker: KeyChecker = request.app.state.keys
    principal = checker.check(presented_key(header_key, credentials))
    await use.check_rate(context_of(request), principal.tenant)
    return principal


# The authenticated caller of a route (FastAPI runs ``authenticated`` once per call, also
# when a router's dependencies name it too).
Caller = Annotated[Principal, Depends(authenticated)]
