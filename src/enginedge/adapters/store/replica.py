"""Reads from a PostgreSQL read replica (``DATABASE_READ_URL``), with the primary behind it.

A replica applies the primary's changes a little later, so only reads that may be stale come
here: a request by id for its status, and list pages. Everything that decides a state change
(idempotency checks, transitions, the outbox) reads the primary inside its transaction.

Read-your-writes for the caller: a request the replica does not have yet (it was created
moments ago) is read again from the primary, so the ``statusUrl`` of a 202 always answers.
A replica that cannot be reached is skipped the same way: reads go to the primary.
"""

from __future__ import annotations

import logging
import uuid

from enginedge.application.ports import RequestQuery, RequestReader
from enginedge.domain.errors import ServiceUnavailable
from enginedge.domain.model import Request

log = logging.getLogger(__name__)


class ReplicaReader:
    """A :class:`~enginedge.application.ports.RequestReader` on a replica, falling back to
    the primary on a miss by id or when the replica is unavailable."""

    def __init__(self, replica: RequestReader, primary: RequestReader) -> None:
        self._replica = replica
        self._primary = primary

    async def get_request(self, request_id: uuid.UUID) -> Request | None:
        try:
            found = await self._replica.get_request(request_id)
        except ServiceUnavailable as exc:
            log.warning("read replica unavailable, reading the primary", extra={"error": str(exc)})
            return await self._primary.get_request(request_id)
        if found is not None:
            return found
        return await self._primary.get_request(request_id)

    async def list_requests(self, query: RequestQuery) -> list[Request]:
        try:
            return await self._replica.list_requests(query)
        except ServiceUnavailable as exc:
            log.warning("read replica unavailable, reading the primary", extra={"error": str(exc)})
            return await self._primary.list_requests(query)
