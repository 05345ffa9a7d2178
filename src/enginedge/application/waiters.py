"""Callers waiting for a request's outcome (long polling), woken without a round trip.

A request that finishes on this replica hands its outcome to its waiters directly
(:meth:`Waiters.resolve`). One that finishes on another replica is announced on the event
stream's feed of finished requests, and its waiters here read the outcome (from the request
cache) when :meth:`Waiters.wake` says so. When the feed may have missed something (Redis
reconnected, or is down), every waiter looks again (:meth:`Waiters.wake_all`). When the
process shuts down (:meth:`Waiters.close`), nobody waits any more: each caller is answered
with the request as it is, instead of holding the shutdown until the server gives up on it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from enginedge.domain.model import Request

T = TypeVar("T")


class Waiter:
    """One waiting caller: woken with the outcome, or woken to look again."""

    __slots__ = ("outcome", "request_id", "woken")

    def __init__(self, request_id: uuid.UUID) -> None:
        self.request_id = request_id
        self.outcome: Request | None = None
        self.woken = asyncio.Event()


class Waiters:
    """Every waiting caller of this process, by request id."""

    def __init__(self) -> None:
        self._waiting: dict[uuid.UUID, list[Waiter]] = {}
        self._closed = asyncio.Event()

    @property
    def closed(self) -> bool:
        """True once the process is shutting down: a caller answers without waiting."""
        return self._closed.is_set()

    async def until_closed(self, items: AsyncIterator[T]) -> AsyncIterator[T]:
        """``items`` until they end or this process starts shutting down (an event stream
        then ends cleanly, and its client resumes on another replica)."""
        closed = asyncio.ensure_future(self._closed.wait())
        step: asyncio.Future[T] | None = None
        try:
            while not closed.done():
                step = asyncio.ensure_future(anext(items))
                await asyncio.wait((step, closed), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    return
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            # Also when the client went away while ``items`` was waiting: the step still
            # running is stopped here, not left behind holding the stream.
            closed.cancel()
            if step is not None and not step.done():
                step.cancel()
                await asyncio.gather(step, return_exceptions=True)

    def count(self) -> int:
        """How many callers are waiting."""
        return sum(len(waiting) for waiting in self._waiting.values())

    def close(self) -> None:
        """Shutting down: wake every waiter, and let no later caller wait."""
        self._closed.set()
        self.wake_all()

    @contextmanager
    def watch(self, request_id: uuid.UUID) -> Iterator[Waiter]:
        """A waiter for ``request_id`` while the block runs. Register it before reading the
        request's state, so that an outcome between the read and the wait is not missed."""
        waiter = Waiter(request_id)
        self._waiting.setdefault(request_id, []).append(waiter)
        try:
            yield waiter
        finally:
            waiting = self._waiting.get(request_id)
            if waiting is not None:
                waiting.remove(waiter)
                if not waiting:
                    del self._waiting[request_id]

    def resolve(self, request: Request) -> None:
        """``request`` finished here: its waiters have their answer."""
        for waiter in self._waiting.get(request.id, ()):
            waiter.outcome = request
            waiter.woken.set()

    def wake(self, request_ids: Iterable[uuid.UUID]) -> None:
        """These requests finished somewhere: their waiters should look."""
        for request_id in request_ids:
            for waiter in self._waiting.get(request_id, ()):
                waiter.woken.set()

    def wake_all(self) -> None:
        """Some outcomes may have gone unannounced: every waiter should look."""
        for waiting in self._waiting.values():
            for waiter in waiting:
                waiter.woken.set()
