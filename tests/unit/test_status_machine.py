"""The request status machine: every allowed arrow works, every other one is refused."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from enginedge.domain.errors import IllegalTransition
from enginedge.domain.model import (
    ALLOWED_TRANSITIONS,
    TERMINAL_STATUSES,
    Request,
    RequestStatus,
    can_transition,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
S = RequestStatus


def new_request(**kw: object) -> Request:
    values: dict[str, object] = dict(
        id=uuid.uuid4(),
        task_type="data.sql",
        payload={},
        metadata={},
        worker_type="data-processing",
        created_at=T0,
        updated_at=T0,
        deadline=T0 + timedelta(seconds=30),
    )
    values.update(kw)
    return Request(**values)  # type: ignore[arg-type]


def test_the_forward_path() -> None:
    r = new_request()
    r.mark_dispatched(T0 + timedelta(seconds=1))
    r.mark_processing("w1", T0 + timedelta(seconds=2))
    r.complete({"ok": True}, None, T0 + timedelta(seconds=5))
    assert r.status is S.COMPLETED
    assert r.processing_time_ms == 3000
    assert r.finished_at == T0 + timedelta(seconds=5)
    assert r.result == {"ok": True}


def test_terminal_states_have_no_way_out() -> None:
    for status in TERMINAL_STATUSES:
        assert ALLOWED_TRANSITIONS[status] == frozenset()
        assert status.terminal
    for status in set(S) - TERMINAL_STATUSES:
        assert not status.terminal


@pytest.mark.parametrize("current", list(S))
@pytest.mark.parametrize("target", list(S))
def test_transition_table(current: RequestStatus, target: RequestStatus) -> None:
    expected = target in {
        S.PENDING: {S.DISPATCHED, S.FAILED, S.CANCELLED, S.TIMEOUT},
        S.DISPATCHED: {S.PROCESSING, S.PENDING, S.FAILED, S.CANCELLED, S.TIMEOUT},
        S.PROCESSING: {S.COMPLETED, S.FAILED, S.CANCELLED, S.TIMEOUT, S.PENDING},
    }.get(current, set())
    assert can_transition(current, target) is expected


def test_completing_a_pending_request_is_refused() -> None:
    r = new_request()
    with pytest.raises(IllegalTransition):
        r.complete({}, 1, T0)
    assert r.status is S.PENDING


def test_requeue_starts_a_new_attempt_and_forgets_the_worker() -> None:
    r = new_request()
    r.mark_dispatched(T0)
    r.mark_processing("w1", T0)
    r.requeue(T0 + timedelta(seconds=1))
    assert (r.status, r.attempts, r.worker_id, r.started_at) == (S.PENDING, 2, None, None)


def test_timeout_message_names_the_timeout() -> None:
    r = new_request(deadline=T0 + timedelta(seconds=2.5))
    r.time_out(T0 + timedelta(seconds=3))
    assert r.status is S.TIMEOUT
    assert r.error is not None and "2.5s" in r.error


OPERATIONS = ["dispatch", "process", "complete", "fail", "cancel", "timeout", "requeue"]


@given(st.lists(st.sampled_from(OPERATIONS), max_size=30))
def test_any_sequence_obeys_the_table(ops: list[str]) -> None:
    r = new_request()
    now = T0
    for op in ops:
        now += timedelta(seconds=1)
        before = r.status
        action = {
            "dispatch": lambda: r.mark_dispatched(now),
            "process": lambda: r.mark_processing("w", now),
            "complete": lambda: r.complete({}, 1, now),
            "fail": lambda: r.fail("x", now),
            "cancel": lambda: r.cancel(now),
            "timeout": lambda: r.time_out(now),
            "requeue": lambda: r.requeue(now),
        }[op]
        try:
            action()
        except IllegalTransition as exc:
            assert exc.current is before
            assert r.status is before  # a refused change changes nothing
            continue
        assert can_transition(before, r.status)
        if before.terminal:
            raise AssertionError("left a terminal state")
