"""The local copy of the fleet in front of a shared registry."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from datetime import UTC, datetime

from enginedge.adapters.cache.inprocess import InProcessRegistry
from enginedge.adapters.cache.snapshot import SnapshotRegistry
from enginedge.domain.model import Worker, WorkerStatus

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def worker(wid: str, active: int = 0) -> Worker:
    return Worker(
        wid, "data-processing", "http://w", ["echo"], 4, active, WorkerStatus.HEALTHY, NOW
    )


class Counting(InProcessRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def all(self) -> list[Worker]:
        self.reads += 1
        return await super().all()


async def test_reads_the_shared_registry_at_most_once_per_max_age() -> None:
    shared = Counting()
    await shared.upsert(worker("a"))
    snapshot = SnapshotRegistry(shared, max_age=0.2)
    for _ in range(50):
        assert [w.id for w in await snapshot.all()] == ["a"]
    assert shared.reads == 1
    # Another replica's heartbeat lands in the shared registry: seen once the copy is old.
    await shared.upsert(worker("b"))
    assert {w.id for w in await snapshot.all()} == {"a"}
    await asyncio.sleep(0.25)
    assert {w.id for w in await snapshot.all()} == {"a", "b"}
    assert shared.reads == 2


async def test_its_own_writes_show_at_once() -> None:
    shared = Counting()
    snapshot = SnapshotRegistry(shared, max_age=60)
    await snapshot.upsert(worker("a"))
    assert [w.active for w in await snapshot.all()] == [0]
    await snapshot.upsert(replace(worker("a"), active=3))
    assert [w.active for w in await snapshot.all()] == [3]
    assert (await snapshot.get("a")) == replace(worker("a"), active=3)


async def test_fresh_reads_bypass_the_copy() -> None:
    shared = Counting()
    snapshot = SnapshotRegistry(shared, max_age=60)
    assert await snapshot.all() == []
    await shared.upsert(worker("a"))  # another replica's heartbeat
    assert await snapshot.all() == []
    assert [w.id for w in await snapshot.all(fresh=True)] == ["a"]
    assert [w.id for w in await snapshot.all()] == ["a"]  # and the copy is renewed
