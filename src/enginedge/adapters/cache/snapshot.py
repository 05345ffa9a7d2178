"""A short-lived local copy of the fleet, in front of a shared registry.

Every submission routes by the fleet, and reading it from Redis costs two round trips and a
decoding of every worker, which grows with the fleet. What the registry holds is already as
old as the last heartbeat (seconds); a copy a fraction of a second old changes no decision.
"""

from __future__ import annotations

import time

from enginedge.application.ports import WorkerRegistry
from enginedge.domain.model import Worker

DEFAULT_MAX_AGE = 0.25


class SnapshotRegistry:
    """A :class:`~enginedge.application.ports.WorkerRegistry` whose ``all()`` is served from
    a copy at most ``max_age`` seconds old; writes go through and refresh it."""

    def __init__(self, shared: WorkerRegistry, max_age: float = DEFAULT_MAX_AGE) -> None:
        self._shared = shared
        self._max_age = max_age
        self._copy: dict[str, Worker] | None = None
        self._taken = 0.0

    async def upsert(self, worker: Worker) -> None:
        await self._shared.upsert(worker)
        if self._copy is not None:
            self._copy[worker.id] = worker

    async def get(self, worker_id: str) -> Worker | None:
        return await self._shared.get(worker_id)

    async def all(self, *, fresh: bool = False) -> list[Worker]:
        now = time.monotonic()
        if fresh or self._copy is None or now - self._taken > self._max_age:
            self._copy = {w.id: w for w in await self._shared.all()}
            self._taken = now
        return list(self._copy.values())
