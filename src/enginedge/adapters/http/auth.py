"""API-key authentication (``X-API-Key`` or ``Authorization: Bearer``) and rate limiting."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from fastapi import HTTPException
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="One of the keys in API_KEYS"
)
bearer = HTTPBearer(auto_error=False, description="The same key as a bearer token")


def caller_id(key: str) -> str:
    """A short hash that identifies the caller in the store; the key itself is never kept."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class KeyChecker:
    """Compares a presented key with every configured key in constant time."""

    def __init__(self, keys: Sequence[str]) -> None:
        self._keys = [k.encode() for k in keys]

    def check(self, presented: str | None) -> str:
        """The caller id for a valid key; 401 ``INVALID_API_KEY`` otherwise."""
        if presented:
            candidate = presented.encode()
            # No early exit: the time taken does not depend on which key matched.
            matched = False
            for key in self._keys:
                matched |= hmac.compare_digest(candidate, key)
            if matched:
                return caller_id(presented)
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
