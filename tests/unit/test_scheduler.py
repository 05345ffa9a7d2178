"""The scheduling use case against in-memory adapters and a fake clock: a request goes to a
chosen worker's inbox only when that worker has a free slot, slots free with outcomes,
retries wait their backoff, tenants their limits."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from enginedge.application.context import Context, Policy
from enginedge.application.fleet import record_heartbeat, record_results
from enginedge.application.maintenance import sweep
from enginedge.application.ports import Subscription
from enginedge.application.requests import SubmitCommand, get_request, submit
from enginedge.application.scheduler import schedule
from enginedge.bootstrap import memory_context
from enginedge.domain.errors import RateLimitExceeded
from enginedge.domain.messages import DispatchMessage, HeartbeatMessage, ResultMessage
from enginedge.domain.model import RequestStatus
from enginedge.domain.scheduling import SchedulingRules
from tests.support.clock import FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def context(clock: FakeClock, **policy: object) -> Context:
    return memory_context(clock, Policy(retry_backoff=timedelta(seconds=2), **policy))  # type: ignore[arg-type]


async def join(
    ctx: Context, capacity: int, wtype: str = "data-processing"
) -> tuple[str, Subscription]:
    """A worker announces itself; returns its id and a reader of its inbox."""
    worker_id = str(uuid.uuid4())
    inbox = f"worker.{wtype}.{worker_id}.t.requests"
    reader = await ctx.bus.subscribe([inbox], None)
    await record_heartbeat(
        ctx,
        HeartbeatMessage(
            worker_id,
            wtype,
            "inprocess://x",
            ["echo", "data.sql"],
            capacity,
            0,
            "HEALTHY",
            ctx.clock.now(),
            inbox=inbox,
        ),
    )
    return worker_id, reader


async def received(reader: Subscription) -> list[DispatchMessage]:
    return [DispatchMessage.from_json(m.value) for m in await reader.next_batch(100, 0.01)]


async def send(ctx: Context, tenant: str = "a", priority: int = 0) -> uuid.UUID:
    ctx.clock.advance(0.001)  # type: ignore[attr-defined]  # one after the other, as callers
    submission = await submit(
        ctx, SubmitCommand("echo", {"x": 1}, tenant, metadata={"priority": priority})
    )
    return submission.request.id


async def complete(ctx: Context, worker_id: str, dispatch: DispatchMessage) -> None:
    done = ResultMessage(
        dispatch.request_id, dispatch.attempt, worker_id, "completed", 1, result={"ok": True}
    )
    assert await record_results(ctx, [done]) == []


async def test_dispatches_go_only_to_free_slots_and_the_rest_wait(clock: FakeClock) -> None:
    ctx = context(clock)
    w1, inbox1 = await join(ctx, capacity=1)
    w2, inbox2 = await join(ctx, capacity=2)
    ids = [await send(ctx) for _ in range(5)]
    report = await schedule(ctx)
    assert report.dispatched == 3
    first, second = await received(inbox1), await received(inbox2)
    assert (len(first), len(second)) == (1, 2)
    waiting = [await get_request(ctx, rid) for rid in ids]
    assert [r.status for r in waiting].count(RequestStatus.PENDING) == 2
    assert {r.worker_id for r in waiting if r.status is RequestStatus.DISPATCHED} == {w1, w2}
    assert (await schedule(ctx)).dispatched == 0  # full: nothing more, however often asked
    await complete(ctx, w1, first[0])
    assert (await schedule(ctx)).dispatched == 1
    assert [d.request_id for d in await received(inbox1)] == [ids[3]]


async def test_priority_then_fair_shares_then_fifo(clock: FakeClock) -> None:
    ctx = context(clock)
    worker_id, inbox = await join(ctx, capacity=1)
    order = []
    a = [await send(ctx, "a") for _ in range(4)]
    clock.advance(0.5)
    b = [await send(ctx, "b") for _ in range(2)]
    urgent = await send(ctx, "a", priority=100)
    for _ in range(7):
        await schedule(ctx)
        (dispatch,) = await received(inbox)
        order.append(dispatch.request_id)
        await complete(ctx, worker_id, dispatch)
    assert order[0] == urgent
    # The urgent one was a turn of tenant a: b goes next, then they alternate.
    assert order[1:] == [b[0], a[0], b[1], a[1], a[2], a[3]]


async def test_a_retry_waits_its_backoff_and_keeps_its_place(clock: FakeClock) -> None:
    ctx = context(clock, heartbeat_ttl=timedelta(seconds=10))
    _, inbox = await join(ctx, capacity=1)
    rid = await send(ctx)
    await schedule(ctx)
    assert len(await received(inbox)) == 1
    # The worker goes silent: after its TTL it is lost and the request queued again.
    clock.advance(11)
    report = await sweep(ctx)
    assert report.workers_lost == 1 and report.redispatched == 1
    request = await get_request(ctx, rid)
    assert request.status is RequestStatus.PENDING and request.attempts == 2
    survivor, inbox2 = await join(ctx, capacity=1)
    assert (await schedule(ctx)).dispatched == 0  # the backoff (2 s) has not passed
    clock.advance(2.1)
    assert (await schedule(ctx)).dispatched == 1
    (dispatch,) = await received(inbox2)
    assert (dispatch.request_id, dispatch.attempt) == (rid, 2)
    assert (await get_request(ctx, rid)).worker_id == survivor


async def test_a_tenant_beyond_its_running_limit_waits(clock: FakeClock) -> None:
    ctx = context(clock, scheduling=SchedulingRules(tenant_max_running=1))
    await join(ctx, capacity=4)
    for _ in range(3):
        await send(ctx, "a")
    await send(ctx, "b")
    assert (await schedule(ctx)).dispatched == 2  # one of a's, b's one


async def test_a_tenant_beyond_its_queue_limit_is_told_to_retry(clock: FakeClock) -> None:
    ctx = context(clock, tenant_max_queued=2)
    await join(ctx, capacity=1)
    await send(ctx, "a")
    await send(ctx, "a")
    with pytest.raises(RateLimitExceeded) as refused:
        await send(ctx, "a")
    assert refused.value.retry_after >= 1
    await send(ctx, "b")  # another tenant's queue is its own


async def test_an_unhealthy_worker_gets_nothing(clock: FakeClock) -> None:
    ctx = context(clock, heartbeat_ttl=timedelta(seconds=5))
    _, inbox = await join(ctx, capacity=2)
    await send(ctx)
    clock.advance(6)  # its heartbeats stopped
    assert (await schedule(ctx)).dispatched == 0
    assert await received(inbox) == []


async def test_a_report_from_a_worker_it_was_not_handed_to_is_ignored(clock: FakeClock) -> None:
    ctx = context(clock)
    worker_id, inbox = await join(ctx, capacity=1)
    rid = await send(ctx)
    await schedule(ctx)
    (dispatch,) = await received(inbox)
    stranger = str(uuid.uuid4())
    await complete(ctx, stranger, dispatch)
    assert (await get_request(ctx, rid)).status is RequestStatus.DISPATCHED
    await complete(ctx, worker_id, dispatch)
    assert (await get_request(ctx, rid)).status is RequestStatus.COMPLETED


async def test_the_dispatch_time_is_read_once_the_scheduling_lock_is_held(
    clock: FakeClock,
) -> None:
    ctx = context(clock)
    await join(ctx, capacity=1)
    rid = await send(ctx)
    store = ctx.store

    class SlowLock:
        """The store, its scheduling lock taking two seconds (another replica's pass)."""

        def __getattr__(self, name: str) -> object:
            return getattr(store, name)

        def transaction(self, *, durable: bool = True) -> object:
            inner = store.transaction(durable=durable)

            class Tx:
                async def __aenter__(self) -> object:
                    tx = await inner.__aenter__()
                    real_lock = tx.lock_scheduling

                    async def lock_scheduling() -> None:
                        await real_lock()
                        clock.advance(2)

                    tx.lock_scheduling = lock_scheduling  # type: ignore[method-assign]
                    return tx

                async def __aexit__(self, *exc: object) -> object:
                    return await inner.__aexit__(*exc)  # type: ignore[arg-type]

            return Tx()

    ctx.store = SlowLock()  # type: ignore[assignment]
    before = clock.now()
    await schedule(ctx)
    dispatched = await get_request(ctx, rid)
    assert dispatched.dispatched_at is not None
    assert dispatched.dispatched_at >= before + timedelta(seconds=2)
