"""Group commit of accepted requests.

A durable commit costs a disk flush, and a flush costs the same for one request as for a
hundred. While one transaction of new requests commits, the requests accepted meanwhile wait
and then go together in the next one: alone, a request is written at once; under load, each
flush carries many. Every caller still returns only after its own request is committed, so
a 202 keeps meaning "durable".

A batch's ``PENDING`` events are told inside its transaction, just before the commit: until
the commit no scheduler can see its requests, so no later event of a request (``DISPATCHED``,
the worker's) can reach its stream before the first one.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable

from enginedge.application.ports import RequestStore
from enginedge.domain.model import Request

log = logging.getLogger(__name__)
MAX_BATCH = 256


class RequestWriter:
    """Writes new requests, many per transaction under load."""

    def __init__(
        self,
        store: Callable[[], RequestStore],
        accepted: Callable[[list[Request]], Awaitable[None]],
        max_batch: int = MAX_BATCH,
    ) -> None:
        # The store is looked up when writing, so that a context whose store is swapped
        # (tests, a reconnect) is followed.
        self._store = store
        # Told each batch as it is about to commit (its events go out in one round trip).
        self._accepted = accepted
        self._max_batch = max_batch
        self._waiting: list[tuple[Request, asyncio.Future[None]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def add(self, request: Request) -> None:
        """Return once ``request`` is committed; raise what writing it alone would have
        raised (e.g. ``IdempotencyKeyTaken``)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.append((request, done))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_all(), name="request-writer")
        await asyncio.shield(done)

    async def _write_all(self) -> None:
        while self._waiting:
            batch = self._waiting[: self._max_batch]
            del self._waiting[: self._max_batch]
            told: set[uuid.UUID] = set()
            try:
                await self._write([entry for entry, _ in batch], told)
            except Exception as exc:
                if len(batch) == 1:
                    _fail(batch[0][1], exc)
                    continue
                # One bad request must not fail the others: each on its own, with its own
                # outcome.
                for entry, done in batch:
                    try:
                        await self._write([entry], told)
                    except Exception as single:
                        _fail(done, single)
                    else:
                        _succeed(done)
            else:
                for _, done in batch:
                    _succeed(done)

    async def _write(self, requests: list[Request], told: set[uuid.UUID]) -> None:
        async with self._store().transaction() as tx:
            await tx.add_requests(requests)
            # Once per request: a batch whose commit failed after its events went out is
            # written again one by one. (A request that then fails alone leaves a PENDING
            # event in a stream whose id no caller was given; it expires.)
            await self._tell([r for r in requests if r.id not in told])
            told.update(r.id for r in requests)

    async def _tell(self, requests: list[Request]) -> None:
        if not requests:
            return
        try:
            await self._accepted(requests)
        except Exception:
            # The requests are about to be durable and will be dispatched: a caller must not
            # hear otherwise because their first event could not be told.
            log.exception("could not tell that requests were accepted")


def _succeed(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _fail(done: asyncio.Future[None], error: BaseException) -> None:
    if not done.done():
        done.set_exception(error)
