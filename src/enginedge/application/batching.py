"""Group commit of accepted requests.

A durable commit costs a disk flush, and a flush costs the same for one request as for a
hundred. While one transaction of new requests commits, the requests accepted meanwhile wait
and then go together in the next one: alone, a request is written at once; under load, each
flush carries many. Every caller still returns only after its own request is committed, so
a 202 keeps meaning "durable".
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from enginedge.application.ports import OutboxMessage, RequestStore
from enginedge.domain.model import Request

log = logging.getLogger(__name__)
MAX_BATCH = 256

Entry = tuple[Request, list[OutboxMessage]]


class RequestWriter:
    """Writes new requests with their dispatches, many per transaction under load."""

    def __init__(
        self,
        store: Callable[[], RequestStore],
        committed: Callable[[list[Request]], Awaitable[None]],
        max_batch: int = MAX_BATCH,
    ) -> None:
        # The store is looked up when writing, so that a context whose store is swapped
        # (tests, a reconnect) is followed.
        self._store = store
        # Told each committed batch (its events go out in one round trip), before its
        # callers return.
        self._committed = committed
        self._max_batch = max_batch
        self._waiting: list[tuple[Entry, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def add(self, request: Request, outbox: list[OutboxMessage]) -> None:
        """Return once ``request`` and its ``outbox`` messages are committed; raise what
        writing it alone would have raised (e.g. ``IdempotencyKeyTaken``)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append(((request, outbox), done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="request-writer")
        await asyncio.shield(done)

    async def _write_all(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            try:
                await self._write([entry for entry, _ in batch])
            except Exception as exc:
                if len(batch) == 1:
                    _fail(batch[0][1], exc)
                    continue
                # One bad request must not fail the others: each on its own, with its own
                # outcome.
                for entry, done in batch:
                    try:
                        await self._write([entry])
                    except Exception as single:
                        _fail(done, single)
                    else:
                        await self._tell([entry[0]])
                        _succeed(done)
            else:
                await self._tell([request for (request, _), _ in batch])
                for _, done in batch:
                    _succeed(done)

    async def _tell(self, requests: list[Request]) -> None:
        try:
            await self._committed(requests)
        except Exception:
            # The requests are durable and will be dispatched: a caller must not hear
            # otherwise because their first event could not be told.
            log.exception("could not tell that requests were accepted")

    async def _write(self, entries: list[Entry]) -> None:
        async with self._store().transaction() as tx:
            await tx.add_requests([request for request, _ in entries])
            await tx.enqueue([m for _, outbox in entries for m in outbox])


def _succeed(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _fail(done: asyncio.Future[None], error: BaseException) -> None:
    if not done.done():
        done.set_exception(error)
