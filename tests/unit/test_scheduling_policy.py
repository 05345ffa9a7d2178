"""The scheduling policy alone (domain/scheduling.py): order, fair shares, slots, limits."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from enginedge.domain.scheduling import (
    SchedulingRules,
    Waiting,
    WorkerSlots,
    aged_level,
    plan,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
RULES = SchedulingRules(aging=timedelta(seconds=5))


def waiting(
    tenant: str = "a",
    priority: int = 0,
    age: float = 0.0,
    task_type: str = "llm.chat",
    worker_type: str = "llm",
) -> Waiting:
    return Waiting(
        uuid.uuid4(), worker_type, task_type, priority, tenant, NOW - timedelta(seconds=age)
    )


def worker(wid: str, free: int, *caps: str, wtype: str = "llm") -> WorkerSlots:
    return WorkerSlots(wid, wtype, frozenset(caps or ("llm.chat",)), free)


def order(queue: list[Waiting], slots: int, running: dict[str, int] | None = None) -> list[Waiting]:
    by_id = {w.id: w for w in queue}
    assignments = plan(queue, [worker("w", slots)], running or {}, RULES, NOW)
    return [by_id[a.request_id] for a in assignments]


def test_higher_priority_goes_first_even_behind_older_requests() -> None:
    low = [waiting(priority=0, age=3 - i * 0.1) for i in range(6)]
    urgent = waiting(priority=100)
    assert order([*low, urgent], 1) == [urgent]


def test_fifo_within_a_tenant() -> None:
    queue = [waiting(age=age) for age in (1.0, 3.0, 2.0)]
    assert order(queue, 3) == sorted(queue, key=lambda w: w.queued_at)


def test_a_tenant_with_many_waiting_does_not_delay_one_with_few() -> None:
    burst = [waiting("a", age=10 - i * 0.01) for i in range(1000)]
    late = [waiting("b", age=0.5), waiting("b", age=0.4)]
    first_four = order([*burst, *late], 4)
    assert [w.tenant for w in first_four] == ["a", "b", "a", "b"]


def test_fair_shares_count_what_each_tenant_already_runs() -> None:
    queue = [waiting("a", age=9), waiting("b", age=1)]
    # The tenant running fewer goes first, even with the younger request.
    assert order(queue, 1, running={"a": 3})[0].tenant == "b"
    assert order(queue, 1, running={"b": 3})[0].tenant == "a"


def test_aging_lifts_a_waiting_band_above_newer_higher_priority() -> None:
    assert aged_level(0, NOW - timedelta(seconds=12), NOW, timedelta(seconds=5)) == 2
    assert aged_level(-3, NOW, NOW, timedelta(0)) == -3  # no aging
    starving = waiting(priority=0, age=60)  # 12 levels up
    fresh = [waiting("b", priority=10, age=0.1) for _ in range(3)]
    assert order([starving, *fresh], 1) == [starving]
    young = waiting(priority=0, age=40)  # 8 levels up: still below 10
    assert order([young, *fresh], 1)[0].priority == 10


def test_aging_gives_an_old_burst_no_edge_over_a_new_tenant_of_the_same_priority() -> None:
    old_burst = [waiting("a", age=600 - i) for i in range(50)]  # aged 100+ levels
    newcomer = waiting("b", age=0.0)
    picked = order([*old_burst, newcomer], 2)
    assert newcomer in picked


def test_a_tenant_at_its_running_limit_waits_and_others_go() -> None:
    rules = SchedulingRules(tenant_max_running=2)
    queue = [waiting("a", age=5 - i) for i in range(4)] + [waiting("b", age=0.1)]
    assignments = plan(queue, [worker("w", 10)], {"a": 1}, rules, NOW)
    tenants = sorted(next(w.tenant for w in queue if w.id == a.request_id) for a in assignments)
    assert tenants == ["a", "b"]  # a had one running: one more, then its limit


def test_the_worker_with_the_most_free_slots_is_chosen() -> None:
    assignments = plan(
        [waiting(age=1)], [worker("w1", 1), worker("w2", 3), worker("w3", 2)], {}, RULES, NOW
    )
    assert [a.worker_id for a in assignments] == ["w2"]


def test_a_task_no_free_worker_can_run_does_not_block_others_of_its_type() -> None:
    sql = waiting(task_type="data.sql", worker_type="data", age=9)
    echo = waiting(task_type="echo", worker_type="data", age=1)
    assignments = plan([sql, echo], [worker("w", 1, "echo", wtype="data")], {}, RULES, NOW)
    assert [a.request_id for a in assignments] == [echo.id]


def test_nothing_is_assigned_without_a_free_slot() -> None:
    assert plan([waiting()], [worker("w", 0)], {}, RULES, NOW) == []
    assert plan([waiting(worker_type="data")], [worker("w", 5)], {}, RULES, NOW) == []


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from("abc"),
            st.integers(-2, 2),
            st.floats(0, 100),
            st.sampled_from(["llm.chat", "llm.embed"]),
        ),
        max_size=40,
    ),
    st.lists(st.tuples(st.integers(0, 4), st.booleans()), min_size=1, max_size=4),
    st.one_of(st.none(), st.integers(1, 3)),
)
def test_slots_are_never_overfilled_and_none_is_left_idle_while_work_could_take_it(
    queue_spec: list[tuple[str, int, float, str]],
    worker_spec: list[tuple[int, bool]],
    limit: int | None,
) -> None:
    queue = [waiting(t, p, age, task) for t, p, age, task in queue_spec]
    workers = [
        worker(f"w{i}", free, "llm.chat", *(["llm.embed"] if embeds else []))
        for i, (free, embeds) in enumerate(worker_spec)
    ]
    rules = SchedulingRules(tenant_max_running=limit)
    assignments = plan(queue, workers, {}, rules, NOW)
    by_id = {w.id: w for w in queue}
    used: dict[str, int] = {}
    per_tenant: dict[str, int] = {}
    for a in assignments:
        request = by_id[a.request_id]
        chosen = next(w for w in workers if w.id == a.worker_id)
        assert request.task_type in chosen.capabilities
        used[a.worker_id] = used.get(a.worker_id, 0) + 1
        per_tenant[request.tenant] = per_tenant.get(request.tenant, 0) + 1
    assert len({a.request_id for a in assignments}) == len(assignments)
    for w in workers:
        assert used.get(w.id, 0) <= w.free
    if limit is not None:
        assert all(n <= limit for n in per_tenant.values())
    # Work conservation: what is left unassigned has no capable free worker, or its
    # tenant is at its limit.
    assigned = {a.request_id for a in assignments}
    for request in queue:
        if request.id in assigned:
            continue
        capable_free = any(
            request.task_type in w.capabilities and used.get(w.id, 0) < w.free for w in workers
        )
        at_limit = limit is not None and per_tenant.get(request.tenant, 0) >= limit
        assert not capable_free or at_limit
