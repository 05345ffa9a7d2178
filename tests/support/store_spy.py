"""The real store with some of its transaction methods wrapped, to count or delay them."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

Override = Callable[..., Awaitable[Any]]


class SpiedStore:
    """Everything as the real store does, except the named transaction methods: each
    override is called with the real method first, then the call's own arguments."""

    def __init__(self, inner: Any, **overrides: Override) -> None:
        self.inner = inner
        self.overrides = overrides

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @asynccontextmanager
    async def transaction(self, *, durable: bool = True) -> AsyncIterator[Any]:
        async with self.inner.transaction(durable=durable) as tx:
            yield _SpiedTransaction(tx, self.overrides)


class _SpiedTransaction:
    def __init__(self, tx: Any, overrides: dict[str, Override]) -> None:
        self._tx = tx
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        real = getattr(self._tx, name)
        override = self._overrides.get(name)
        return functools.partial(override, real) if override else real
