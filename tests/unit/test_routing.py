"""Routing: capable, healthy, least loaded; none -> NO_ELIGIBLE_WORKERS."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enginedge.domain.errors import NoEligibleWorkers
from enginedge.domain.model import Worker, WorkerStatus
from enginedge.domain.routing import choose_worker, eligible_workers

NOW = datetime(2026, 1, 1, tzinfo=UTC)
TTL = timedelta(seconds=15)


def worker(
    wid: str,
    *,
    active: int = 0,
    capacity: int = 4,
    caps: tuple[str, ...] = ("a",),
    status: WorkerStatus = WorkerStatus.HEALTHY,
    age: float = 0,
) -> Worker:
    return Worker(
        id=wid,
        type="t",
        endpoint="e",
        capabilities=list(caps),
        capacity=capacity,
        active=active,
        status=status,
        last_heartbeat=NOW - timedelta(seconds=age),
    )


def test_least_loaded_capable_healthy_worker_wins() -> None:
    workers = [
        worker("busy", active=3),
        worker("idle-but-unable", caps=("b",)),
        worker("idle-but-sick", status=WorkerStatus.UNHEALTHY),
        worker("idle-but-silent", age=16),
        worker("idle-but-draining", status=WorkerStatus.DRAINING),
        worker("half", active=2),
    ]
    assert choose_worker(workers, "a", NOW, TTL).id == "half"


def test_load_is_relative_to_capacity() -> None:
    big = worker("big", active=4, capacity=16)
    small = worker("small", active=1, capacity=2)
    assert choose_worker([small, big], "a", NOW, TTL).id == "big"


def test_a_full_worker_is_still_eligible() -> None:
    assert choose_worker([worker("full", active=4)], "a", NOW, TTL).id == "full"


def test_no_eligible_worker_names_the_task_type() -> None:
    with pytest.raises(NoEligibleWorkers) as caught:
        choose_worker([worker("x", caps=("b",))], "a", NOW, TTL)
    assert caught.value.message == "No eligible workers for task type a"


workers_strategy = st.lists(
    st.builds(
        worker,
        wid=st.uuids().map(str),
        active=st.integers(0, 10),
        capacity=st.integers(1, 10),
        caps=st.sets(st.sampled_from(["a", "b", "c"]), max_size=3).map(tuple),
        status=st.sampled_from(list(WorkerStatus)),
        age=st.floats(0, 30),
    ),
    max_size=12,
)


@given(workers_strategy, st.sampled_from(["a", "b", "c"]))
def test_choice_is_eligible_and_minimal(workers: list[Worker], task: str) -> None:
    eligible = eligible_workers(workers, task, NOW, TTL)
    if not eligible:
        with pytest.raises(NoEligibleWorkers):
            choose_worker(workers, task, NOW, TTL)
        return
    chosen = choose_worker(workers, task, NOW, TTL)
    assert chosen in eligible
    assert chosen.load == min(w.load for w in eligible)
