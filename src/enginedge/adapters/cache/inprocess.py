"""Embedded registry, event streams and rate limits: plain dictionaries in this process."""

from __future__ import annotations

import asyncio
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime

from enginedge.domain.model import TERMINAL_NAMES, Request, RequestEvent, Worker


class InProcessRegistry:
    """A :class:`~enginedge.application.ports.WorkerRegistry` in a dict."""

    def __init__(self) -> None:
        self._workers: dict[str, Worker] = {}

    async def upsert(self, worker: Worker) -> None:
        self._workers[worker.id] = replace(worker)

    async def get(self, worker_id: str) -> Worker | None:
        worker = self._workers.get(worker_id)
        return replace(worker) if worker else None

    async def all(self, *, fresh: bool = False) -> list[Worker]:
        return [replace(w) for w in self._workers.values()]


class InProcessEventStream:
    """Per-request event lists; a finished request's list is dropped after ``retention``, or
    sooner once ``max_finished`` finished requests are kept, oldest first.

    The bound keeps memory flat under sustained load: an hour's retention at hundreds of
    requests a second would otherwise hold millions of lists (about 2.5 KB each; 40,000
    round trips took the embedded orchestrator from 110 to 267 MB). A list dropped early is
    treated as one that expired: the request's events endpoint tells its outcome from the
    store.
    """

    def __init__(
        self,
        retention_seconds: float = 3600.0,
        max_events: int = 100_000,
        max_finished: int = 2_000,
    ) -> None:
        self._events: dict[uuid.UUID, list[RequestEvent]] = {}
        self._changed: dict[uuid.UUID, asyncio.Event] = {}
        self._retention = retention_seconds
        self._max_events = max_events
        self._max_finished = max_finished
        # Finished requests by when they finished (loop time), oldest first.
        self._finished: OrderedDict[uuid.UUID, float] = OrderedDict()

    def _expire(self) -> None:
        deadline = asyncio.get_running_loop().time() - self._retention
        while self._finished and (
            len(self._finished) > self._max_finished
            or next(iter(self._finished.values())) <= deadline
        ):
            request_id, _ = self._finished.popitem(last=False)
            self._events.pop(request_id, None)

    async def append(self, event: RequestEvent) -> RequestEvent:
        events = self._events.setdefault(event.request_id, [])
        if len(events) >= self._max_events:
            return event  # a runaway producer must not exhaust memory; clients resync at end
        stored = replace(event, id=str(len(events) + 1))
        events.append(stored)
        changed = self._changed.pop(event.request_id, None)
        if changed is not None:
            changed.set()
        if event.type == "status" and event.data.get("status") in TERMINAL_NAMES:
            self._finished[event.request_id] = asyncio.get_running_loop().time()
            self._expire()
        return stored

    async def append_all(self, events: Sequence[RequestEvent]) -> None:
        for event in events:
            await self.append(event)

    async def history(self, request_id: uuid.UUID, after: str | None) -> list[RequestEvent]:
        self._expire()
        return self._events.get(request_id, [])[_position(after) :]

    @asynccontextmanager
    async def follow(
        self, request_id: uuid.UUID, after: str | None, idle_timeout: float
    ) -> AsyncIterator[AsyncIterator[RequestEvent | None]]:
        yield self._iterate(request_id, _position(after), idle_timeout)

    async def _iterate(
        self, request_id: uuid.UUID, position: int, idle_timeout: float
    ) -> AsyncIterator[RequestEvent | None]:
        while True:
            events = self._events.get(request_id, [])
            while position < len(events):
                yield events[position]
                position += 1
            changed = self._changed.setdefault(request_id, asyncio.Event())
            try:
                async with asyncio.timeout(idle_timeout):
                    await changed.wait()
            except TimeoutError:
                yield None

    async def finished_feed(self) -> AsyncIterator[Sequence[uuid.UUID] | None]:
        # Every request that finishes in this process wakes its waiters itself: there is no
        # other replica to hear from.
        await asyncio.Event().wait()
        yield None  # pragma: no cover - never reached


def _position(after: str | None) -> int:
    """Event ids here are 1, 2, 3...: the id of an event is the count of events up to it."""
    return int(after) if after and after.isdigit() else 0


class InProcessRateLimiter:
    """Fixed-window counters per key."""

    def __init__(self) -> None:
        self._windows: dict[str, tuple[int, int]] = {}

    async def hit(self, key: str, limit: int, window_seconds: int, now: datetime) -> int | None:
        window = int(now.timestamp()) // window_seconds
        start, count = self._windows.get(key, (window, 0))
        if start != window:
            count = 0
        count += 1
        self._windows[key] = (window, count)
        if count > limit:
            return (window + 1) * window_seconds - int(now.timestamp())
        return None


class InProcessCache:
    async def ping(self) -> None:
        """Always reachable: it lives in this process."""


class InProcessRequestCache:
    """The most recently read finished requests, bounded."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._items: OrderedDict[uuid.UUID, Request] = OrderedDict()

    async def get(self, request_id: uuid.UUID) -> Request | None:
        request = self._items.get(request_id)
        if request is not None:
            self._items.move_to_end(request_id)
        return request

    async def put_all(self, requests: Sequence[Request]) -> None:
        for request in requests:
            if request.terminal:
                self._items[request.id] = request
                self._items.move_to_end(request.id)
        while len(self._items) > self._size:
            self._items.popitem(last=False)
