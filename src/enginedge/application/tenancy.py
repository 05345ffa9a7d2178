"""Tenancy (SPEC §3): every API key is a tenant, and sees only its own requests; operator
keys (``ADMIN_API_KEYS``) see every tenant's.

A tenant is known by a short hash of its key (what the store keeps as a request's caller)
and, if the operator gave the key one, by a name (``search-team``) in logs, views and the
console. Nothing here knows about HTTP or configuration: the adapters build the
:class:`Principal` of each caller and the :class:`Tenants` directory of names.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

# A key's name: what logs, views and the console show instead of its hash.
NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
# A tenant's hash: the first 16 hex digits of the key's SHA-256.
TENANT_PATTERN = re.compile(r"[0-9a-f]{16}")


def tenant_of(key: str) -> str:
    """The tenant of an API key: a short hash that identifies it in the store; the key
    itself is never kept."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def valid_name(name: str) -> bool:
    """Whether ``name`` can name a key: lowercase letters, digits, ``.``, ``_`` and ``-``,
    at most 63, starting with a letter or digit, and not 16 hex digits (a tenant hash)."""
    return NAME_PATTERN.fullmatch(name) is not None and TENANT_PATTERN.fullmatch(name) is None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant of the key presented, its name if it has one, and
    whether it is an operator's key."""

    tenant: str
    name: str | None = None
    admin: bool = False

    @property
    def label(self) -> str:
        """What logs and views call this caller: its name, else its hash."""
        return self.name or self.tenant

    @property
    def scope(self) -> str | None:
        """The one tenant whose requests this caller may see; None: every tenant's."""
        return None if self.admin else self.tenant

    def sees(self, caller: str | None) -> bool:
        """Whether this caller may see (follow, cancel) a request made by ``caller``."""
        return self.admin or caller == self.tenant


class Tenants:
    """The names operators gave their keys, by tenant hash."""

    def __init__(self, names: Mapping[str, str] | None = None) -> None:
        self._names = dict(names or {})
        self._by_name = {name: tenant for tenant, name in self._names.items()}

    def label(self, tenant: str | None) -> str | None:
        """A tenant's name if it has one, else its hash (None for no tenant)."""
        if tenant is None:
            return None
        return self._names.get(tenant, tenant)

    def named(self) -> dict[str, str]:
        """Every named tenant: hash -> name."""
        return dict(self._names)

    def resolve(self, name_or_hash: str) -> str | None:
        """The tenant a name or a hash means: a configured key's name, or any tenant hash
        (a key since removed still has its requests); None if it is neither."""
        value = name_or_hash.strip().lower()
        if value in self._by_name:
            return self._by_name[value]
        return value if TENANT_PATTERN.fullmatch(value) else None
