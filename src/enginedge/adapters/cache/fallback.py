"""Degrading gracefully when Redis is down (SPEC §7): each shared adapter falls back to a
local or store-backed one, so the service keeps accepting and finishing requests.

What degrades: rate limits count per replica, events reach only SSE clients of the replica
that recorded them (the others learn the outcome from the store), and the registry is read
from and written to the ``workers`` table.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TypeVar

from enginedge.application.ports import (
    EventStream,
    RateLimiter,
    RequestCache,
    RequestStore,
    WorkerRegistry,
)
from enginedge.domain.model import Request, RequestEvent, Worker

log = logging.getLogger(__name__)
T = TypeVar("T")
WARN_EVERY_SECONDS = 30.0
FEED_RETRY_SECONDS = 1.0


class _Fallback:
    """Try the shared backend; on failure use the local one and warn now and then."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._last_warning = 0.0

    async def _try(
        self, primary: Callable[[], Awaitable[T]], fallback: Callable[[], Awaitable[T]]
    ) -> T:
        try:
            return await primary()
        except Exception as exc:  # any Redis failure: connection, timeout, protocol
            self._warn(exc)
            return await fallback()

    def _warn(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._last_warning > WARN_EVERY_SECONDS:
            self._last_warning = now
            log.warning(
                "Redis unavailable: %s falls back",
                self._name,
                extra={"error": f"{type(exc).__name__}: {exc}"},
            )


class StoreRegistry:
    """The ``workers`` table as a registry: slower, but it outlives Redis."""

    def __init__(self, store: RequestStore) -> None:
        self._store = store

    async def upsert(self, worker: Worker) -> None:
        async with self._store.transaction() as tx:
            await tx.save_worker(worker)

    async def get(self, worker_id: str) -> Worker | None:
        return next((w for w in await self._store.list_workers() if w.id == worker_id), None)

    async def all(self, *, fresh: bool = False) -> list[Worker]:
        return await self._store.list_workers()


class FallbackRegistry(_Fallback):
    def __init__(self, primary: WorkerRegistry, fallback: WorkerRegistry) -> None:
        super().__init__("the worker registry")
        self._primary, self._fallback = primary, fallback

    async def upsert(self, worker: Worker) -> None:
        await self._try(lambda: self._primary.upsert(worker), lambda: self._fallback.upsert(worker))

    async def get(self, worker_id: str) -> Worker | None:
        worker = await self._try(
            lambda: self._primary.get(worker_id), lambda: self._fallback.get(worker_id)
        )
        return worker or await self._fallback.get(worker_id)

    async def all(self, *, fresh: bool = False) -> list[Worker]:
        # An empty registry is what a restarted (or flushed) Redis holds until the next
        # heartbeats: meanwhile the table knows the fleet.
        workers = await self._try(self._primary.all, self._fallback.all)
        return workers or await self._fallback.all()


class FallbackEvents(_Fallback):
    def __init__(self, primary: EventStream, fallback: EventStream) -> None:
        super().__init__("the event stream")
        self._primary, self._fallback = primary, fallback

    async def append(self, event: RequestEvent) -> RequestEvent:
        return await self._try(
            lambda: self._primary.append(event), lambda: self._fallback.append(event)
        )

    async def append_all(self, events: Sequence[RequestEvent]) -> None:
        await self._try(
            lambda: self._primary.append_all(events), lambda: self._fallback.append_all(events)
        )

    async def history(self, request_id: uuid.UUID, after: str | None) -> list[RequestEvent]:
        return await self._try(
            lambda: self._primary.history(request_id, after),
            lambda: self._fallback.history(request_id, after),
        )

    @asynccontextmanager
    async def follow(
        self, request_id: uuid.UUID, after: str | None, idle_timeout: float
    ) -> AsyncIterator[AsyncIterator[RequestEvent | None]]:
        yield self._iterate(request_id, after, idle_timeout)

    async def _iterate(
        self, request_id: uuid.UUID, after: str | None, idle_timeout: float
    ) -> AsyncIterator[RequestEvent | None]:
        try:
            async with self._primary.follow(request_id, after, idle_timeout) as stream:
                async for event in stream:
                    yield event
        except Exception:
            # Redis went away mid-stream: keep the client informed from this replica, and
            # the SSE endpoint's idle check reports the outcome from the store.
            async with self._fallback.follow(request_id, None, idle_timeout) as stream:
                async for event in stream:
                    yield event

    async def finished_feed(self) -> AsyncIterator[Sequence[uuid.UUID] | None]:
        # While Redis is away, outcomes recorded by other replicas go unannounced: waiters
        # are told to look for themselves every FEED_RETRY_SECONDS until the feed is back.
        while True:
            try:
                async for ids in self._primary.finished_feed():
                    yield ids
            except Exception as exc:
                self._warn(exc)
            yield None
            await asyncio.sleep(FEED_RETRY_SECONDS)


class FallbackLimiter(_Fallback):
    def __init__(self, primary: RateLimiter, fallback: RateLimiter) -> None:
        super().__init__("the rate limiter (now per replica)")
        self._primary, self._fallback = primary, fallback

    async def hit(self, key: str, limit: int, window_seconds: int, now: datetime) -> int | None:
        return await self._try(
            lambda: self._primary.hit(key, limit, window_seconds, now),
            lambda: self._fallback.hit(key, limit, window_seconds, now),
        )


class FallbackRequestCache(_Fallback):
    """A cache that is down is a cache miss."""

    def __init__(self, primary: RequestCache) -> None:
        super().__init__("the request cache")
        self._primary = primary

    async def get(self, request_id: uuid.UUID) -> Request | None:
        async def miss() -> Request | None:
            return None

        return await self._try(lambda: self._primary.get(request_id), miss)

    async def put_all(self, requests: Sequence[Request]) -> None:
        async def skip() -> None:
            return None

        await self._try(lambda: self._primary.put_all(requests), skip)
