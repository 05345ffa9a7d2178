"""The request store port's contract, run against every adapter: in memory, SQLite and
PostgreSQL. What the use cases rely on, stated once; an adapter that differs fails here."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from enginedge.adapters.store.engine import PoolSettings, create_engine, sqlite_url
from enginedge.adapters.store.memory import MemoryStore
from enginedge.adapters.store.migrate import head_revision, upgrade
from enginedge.adapters.store.sql import SqlStore
from enginedge.application.ports import (
    IdempotencyKeyTaken,
    OutboxMessage,
    RequestQuery,
    RequestStore,
    TenantCounts,
)
from enginedge.domain.model import Request, RequestStatus, Result, Worker, WorkerStatus
from tests.conftest import create_database

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[RequestStore]:
    if request.param == "memory":
        yield MemoryStore()
        return
    if request.param == "sqlite":
        url = sqlite_url(tmp_path / "contract.db")
    else:
        url = await create_database(request.getfixturevalue("postgres"))
    engine = create_engine(url, PoolSettings())
    await upgrade(engine)
    try:
        yield SqlStore(engine, head_revision())
    finally:
        await engine.dispose()


def new_request(
    *,
    at: float = 0.0,
    tenant: str = "tenant-a",
    priority: int = 0,
    worker_type: str = "llm",
    task_type: str = "llm.chat",
    key: str | None = None,
) -> Request:
    created = T0 + timedelta(seconds=at)
    return Request(
        id=uuid.uuid4(),
        task_type=task_type,
        payload={"n": at},
        metadata={"priority": priority},
        worker_type=worker_type,
        created_at=created,
        updated_at=created,
        deadline=created + timedelta(minutes=5),
        priority=priority,
        caller=tenant,
        idempotency_key=key,
    )


async def add(store: RequestStore, *requests: Request) -> None:
    async with store.transaction() as tx:
        await tx.add_requests(list(requests))


async def test_a_request_reads_back_as_written(store: RequestStore) -> None:
    request = new_request(priority=7)
    request.dispatch_after = T0 + timedelta(seconds=3)
    await add(store, request)
    found = await store.get_request(request.id)
    assert found is not None
    assert (found.id, found.caller, found.priority, found.payload) == (
        request.id,
        "tenant-a",
        7,
        {"n": 0.0},
    )
    assert found.dispatch_after == request.dispatch_after
    assert found.status is RequestStatus.PENDING
    assert await store.get_request(uuid.uuid4()) is None


async def test_a_transaction_that_raises_keeps_nothing(store: RequestStore) -> None:
    request = new_request()

    async def fail_after_writing() -> None:
        async with store.transaction() as tx:
            await tx.add_requests([request])
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        await fail_after_writing()
    assert await store.get_request(request.id) is None


async def test_an_idempotency_key_is_one_request_per_tenant(store: RequestStore) -> None:
    await add(store, new_request(key="k"))
    await add(store, new_request(key="k", tenant="tenant-b"))
    with pytest.raises(IdempotencyKeyTaken):
        await add(store, new_request(key="k"))
    async with store.transaction() as tx:
        found = await tx.find_by_idempotency_key("tenant-a", "k")
    assert found is not None and found.caller == "tenant-a"


async def test_queue_heads_are_each_tenants_first_due_requests_per_band(
    store: RequestStore,
) -> None:
    a = [new_request(at=i) for i in range(5)]
    b = [new_request(at=10 + i, tenant="tenant-b") for i in range(2)]
    urgent = new_request(at=20, priority=100)
    other_type = new_request(at=1, worker_type="data-processing", task_type="echo")
    backing_off = new_request(at=0.5)
    backing_off.dispatch_after = T0 + timedelta(hours=1)
    await add(store, *a, *b, urgent, other_type, backing_off)
    async with store.transaction() as tx:
        heads = await tx.queue_heads(["llm"], 3, T0 + timedelta(seconds=30))
    assert {h.id for h in heads} == {a[0].id, a[1].id, a[2].id, b[0].id, b[1].id, urgent.id}
    head = next(h for h in heads if h.id == urgent.id)
    assert (head.tenant, head.priority, head.worker_type, head.task_type) == (
        "tenant-a",
        100,
        "llm",
        "llm.chat",
    )
    assert head.queued_at == urgent.created_at
    async with store.transaction() as tx:
        later = await tx.queue_heads(["llm"], 10, T0 + timedelta(hours=2))
    async with store.transaction() as tx:  # nothing but the one backing off is left waiting
        await tx.mark_dispatched(
            [(r.id, 1, "w") for r in (*a, *b, urgent, other_type)], T0 + timedelta(seconds=30)
        )
    assert not await store.any_waiting(T0 + timedelta(seconds=31))
    assert await store.any_waiting(T0 + timedelta(hours=2))
    assert backing_off.id in {h.id for h in later}  # due once its backoff has passed


async def test_marking_dispatched_takes_only_pending_current_attempts(store: RequestStore) -> None:
    first, second, cancelled = new_request(), new_request(at=1), new_request(at=2)
    await add(store, first, second, cancelled)
    async with store.transaction() as tx:
        (locked,) = await tx.lock_requests([cancelled.id])
        locked.cancel(T0)
        await tx.save_requests([locked])
    now = T0 + timedelta(seconds=5)
    async with store.transaction() as tx:
        await tx.lock_requests([first.id, second.id, cancelled.id])
        await tx.mark_dispatched(
            [(first.id, 1, "w1"), (second.id, 2, "w1"), (cancelled.id, 1, "w2")], now
        )
    untouched = [await store.get_request(r.id) for r in (second, cancelled)]
    assert [(r.status, r.worker_id) for r in untouched if r] == [
        (RequestStatus.PENDING, None),  # not its current attempt
        (RequestStatus.CANCELLED, None),
    ]
    found = await store.get_request(first.id)
    assert found is not None
    assert (found.status, found.worker_id, found.dispatched_at) == (
        RequestStatus.DISPATCHED,
        "w1",
        now,
    )
    async with store.transaction() as tx:
        counts = await tx.running_counts()
    assert counts.by_worker == {"w1": 1}
    assert counts.by_tenant == {"tenant-a": 1}


async def test_in_flight_and_overdue_selections(store: RequestStore) -> None:
    dispatched, started, waiting = new_request(), new_request(at=1), new_request(at=2)
    await add(store, dispatched, started, waiting)
    async with store.transaction() as tx:
        await tx.mark_dispatched(
            [(dispatched.id, 1, "w1"), (started.id, 1, "w2")], T0 + timedelta(seconds=3)
        )
        (run,) = await tx.lock_requests([started.id])
        run.mark_processing("w2", T0 + timedelta(seconds=10))
        await tx.save_requests([run])
    async with store.transaction() as tx:
        everyone = await tx.lock_in_flight()
        of_w1 = await tx.lock_in_flight(["w1"])
        # Since its dispatch for one not started, since its start for one that is.
        long_ago = await tx.lock_in_flight(None, 100, T0 + timedelta(seconds=5))
        overdue = await tx.lock_overdue(T0 + timedelta(minutes=5, seconds=1, milliseconds=500), 10)
    assert {r.id for r in everyone} == {dispatched.id, started.id}
    assert [r.id for r in of_w1] == [dispatched.id]
    assert [r.id for r in long_ago] == [dispatched.id]
    assert {r.id for r in overdue} == {dispatched.id, started.id}


async def test_queue_and_tenant_counts(store: RequestStore) -> None:
    a1, a2 = new_request(), new_request(at=1)
    b1 = new_request(at=2, tenant="tenant-b", priority=5)
    done = new_request(at=3)
    await add(store, a1, a2, b1, done)
    async with store.transaction() as tx:
        await tx.mark_dispatched([(a1.id, 1, "w1")], T0 + timedelta(seconds=4))
        (finished,) = await tx.lock_requests([done.id])
        finished.fail("no", T0 + timedelta(seconds=4))
        await tx.save_requests([finished])
        await tx.add_results([Result.of(finished, T0 + timedelta(seconds=4))])
    assert await store.queue_depth() == {("llm", 0): 1, ("llm", 5): 1}
    assert await store.tenant_counts() == {
        "tenant-a": TenantCounts(waiting=1, running=1),
        "tenant-b": TenantCounts(waiting=1, running=0),
    }
    assert await store.count_waiting("tenant-a") == 1
    assert await store.any_waiting(T0 + timedelta(seconds=5))
    assert await store.count_waiting("nobody") == 0
    a2_now = await store.get_request(a2.id)
    assert a2_now is not None
    assert await store.queue_position(a2_now) == 2  # b1's higher priority goes first
    a1_now = await store.get_request(a1.id)
    assert a1_now is not None and await store.queue_position(a1_now) is None
    failed = await store.get_request(done.id)
    assert failed is not None and failed.error == "no"


async def test_the_outbox_hands_out_due_messages_oldest_first(store: RequestStore) -> None:
    now = datetime.now(UTC)  # messages without a time are due as they are written
    later = OutboxMessage("t", "k3", b"3", available_at=now + timedelta(hours=1))
    async with store.transaction() as tx:
        await tx.enqueue([OutboxMessage("t", "k1", b"1"), OutboxMessage("t", "k2", b"2"), later])
    async with store.transaction() as tx:
        due = await tx.claim_outbox(now + timedelta(seconds=5), 10)
        assert [m.value for m in due] == [b"1", b"2"]
        await tx.delete_outbox([m.id for m in due if m.id is not None])
    assert await store.outbox_backlog() == 1


async def test_lists_filter_by_tenant_and_page_newest_first(store: RequestStore) -> None:
    mine = [new_request(at=i) for i in range(3)]
    theirs = new_request(at=10, tenant="tenant-b")
    await add(store, *mine, theirs)
    page = await store.list_requests(RequestQuery(caller="tenant-a", limit=2))
    assert [r.id for r in page] == [mine[2].id, mine[1].id]
    rest = await store.list_requests(
        RequestQuery(caller="tenant-a", limit=2, cursor=(page[-1].created_at, page[-1].id))
    )
    assert [r.id for r in rest] == [mine[0].id]
    assert len(await store.list_requests(RequestQuery())) == 4


async def test_a_worker_is_kept_with_its_inbox(store: RequestStore) -> None:
    worker = Worker(
        id=str(uuid.uuid4()),
        type="llm",
        endpoint="http://w:8081",
        capabilities=["llm.chat"],
        capacity=2,
        active=1,
        status=WorkerStatus.HEALTHY,
        last_heartbeat=T0,
        first_seen=T0,
        inbox="worker.llm.x.requests",
    )
    async with store.transaction() as tx:
        await tx.save_worker(worker)
    (kept,) = await store.list_workers()
    assert (kept.id, kept.capacity, kept.inbox, kept.status) == (
        worker.id,
        2,
        "worker.llm.x.requests",
        WorkerStatus.HEALTHY,
    )
