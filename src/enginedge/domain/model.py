"""The orchestrator's entities: requests, their status machine, results and workers.

Pure code: no I/O, no framework. Time is always passed in, never read here, so that every
rule can be tested with plain values.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from enginedge.domain.errors import IllegalTransition

JSON = dict[str, Any]


class RequestStatus(enum.StrEnum):
    """Where a request is in its life. The last four are terminal."""

    PENDING = "PENDING"
    DISPATCHED = "DISPATCHED"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMEOUT = "TIMEOUT"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset(
    {RequestStatus.COMPLETED, RequestStatus.FAILED, RequestStatus.CANCELLED, RequestStatus.TIMEOUT}
)
# As they are written in events and API answers.
TERMINAL_NAMES = frozenset(s.value for s in TERMINAL_STATUSES)

_S = RequestStatus
# The forward path is PENDING -> DISPATCHED -> PROCESSING -> terminal. The arrows back to
# PENDING are re-dispatch: the worker holding the request was lost, or the dispatch message
# never reached one, and a new attempt is queued.
ALLOWED_TRANSITIONS: dict[RequestStatus, frozenset[RequestStatus]] = {
    _S.PENDING: frozenset({_S.DISPATCHED, _S.FAILED, _S.CANCELLED, _S.TIMEOUT}),
    _S.DISPATCHED: frozenset({_S.PROCESSING, _S.PENDING, _S.FAILED, _S.CANCELLED, _S.TIMEOUT}),
    _S.PROCESSING: frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED, _S.TIMEOUT, _S.PENDING}),
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.TIMEOUT: frozenset(),
}


def can_transition(current: RequestStatus, target: RequestStatus) -> bool:
    """Whether the status machine allows ``current -> target``."""
    return target in ALLOWED_TRANSITIONS[current]


@dataclass(slots=True)
class Request:
    """A task a caller asked for, and everything the orchestrator knows about its progress."""

    id: uuid.UUID
    task_type: str
    payload: JSON
    metadata: JSON
    worker_type: str
    created_at: datetime
    updated_at: datetime
    deadline: datetime
    status: RequestStatus = RequestStatus.PENDING
    attempts: int = 1
    max_attempts: int = 3
    priority: int = 0
    correlation_id: str | None = None
    idempotency_key: str | None = None
    caller: str | None = None
    traceparent: str | None = None
    worker_id: str | None = None
    dispatched_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: JSON | None = None
    error: str | None = None
    processing_time_ms: int | None = None
    # A queued retry waits for its backoff: the scheduler leaves it alone until then.
    dispatch_after: datetime | None = None

    @property
    def terminal(self) -> bool:
        return self.status.terminal

    def _move(self, target: RequestStatus, now: datetime) -> None:
        if not can_transition(self.status, target):
            raise IllegalTransition(self.status, target)
        self.status = target
        self.updated_at = now

    def mark_dispatched(self, now: datetime, worker_id: str | None = None) -> None:
        """Handed to ``worker_id`` (the scheduler's choice; None when a worker's report
        overtook the scheduler's commit, which then names it)."""
        self._move(RequestStatus.DISPATCHED, now)
        self.dispatched_at = now
        self.dispatch_after = None
        if worker_id is not None:
            self.worker_id = worker_id

    def mark_processing(self, worker_id: str, now: datetime) -> None:
        self._move(RequestStatus.PROCESSING, now)
        self.worker_id = worker_id
        self.started_at = now

    def complete(self, result: JSON, processing_time_ms: int | None, now: datetime) -> None:
        self._move(RequestStatus.COMPLETED, now)
        self._finish(now, processing_time_ms)
        self.result = result

    def fail(self, error: str, now: datetime, processing_time_ms: int | None = None) -> None:
        self._move(RequestStatus.FAILED, now)
        self._finish(now, processing_time_ms)
        self.error = error

    def cancel(self, now: datetime) -> None:
        self._move(RequestStatus.CANCELLED, now)
        self._finish(now, None)
        self.error = "cancelled by the caller"

    def time_out(self, now: datetime) -> None:
        self._move(RequestStatus.TIMEOUT, now)
        self._finish(now, None)
        seconds = (self.deadline - self.created_at).total_seconds()
        self.error = f"no result within the request's timeout of {seconds:g}s"

    def requeue(self, now: datetime, not_before: datetime | None = None) -> None:
        """Queue a new attempt, to be dispatched no sooner than ``not_before``; the caller
        has checked :attr:`can_retry`. It keeps its place in its tenant's queue."""
        self._move(RequestStatus.PENDING, now)
        self.attempts += 1
        self.worker_id = None
        self.dispatched_at = None
        self.started_at = None
        self.dispatch_after = not_before

    @property
    def can_retry(self) -> bool:
        return self.attempts < self.max_attempts

    def _finish(self, now: datetime, processing_time_ms: int | None) -> None:
        self.finished_at = now
        if processing_time_ms is None and self.started_at is not None:
            processing_time_ms = int((now - self.started_at).total_seconds() * 1000)
        self.processing_time_ms = processing_time_ms


class WorkerStatus(enum.StrEnum):
    """A worker's health as the orchestrator judges it."""

    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    DRAINING = "DRAINING"


@dataclass(slots=True)
class Worker:
    """A worker node as last announced by its heartbeat."""

    id: str
    type: str
    endpoint: str
    capabilities: list[str]
    capacity: int
    active: int
    status: WorkerStatus
    last_heartbeat: datetime
    last_health_check: datetime | None = None
    first_seen: datetime | None = None
    reason: str | None = None
    # Request ids the worker said it holds in its last heartbeat.
    in_flight: list[str] = field(default_factory=list)
    # Why the orchestrator's last active health check of ``endpoint`` failed (None: passed).
    check_error: str | None = None
    # The topic it reads its dispatches from (announced in its heartbeats); None: a worker
    # that announced none, which the scheduler cannot reach.
    inbox: str | None = None

    def effective_status(self, now: datetime, heartbeat_ttl: timedelta) -> WorkerStatus:
        """The status to route by: a worker whose heartbeats stopped, or whose health check
        fails, is unhealthy."""
        if not self.reports_itself(now, heartbeat_ttl):
            return WorkerStatus.UNHEALTHY
        return self.status

    def reports_itself(self, now: datetime, heartbeat_ttl: timedelta) -> bool:
        """Its heartbeats arrive and its health check passes: what it says about its own
        status and the requests it holds can be believed."""
        return now - self.last_heartbeat <= heartbeat_ttl and self.check_error is None

    @property
    def load(self) -> float:
        """Share of its capacity in use; 0 is idle."""
        return self.active / self.capacity if self.capacity > 0 else 1.0

    def can_handle(self, task_type: str) -> bool:
        return task_type in self.capabilities


@dataclass(frozen=True, slots=True)
class Result:
    """The one recorded outcome of a request (exactly one per terminal request)."""

    id: uuid.UUID
    request_id: uuid.UUID
    status: RequestStatus
    result: JSON | None
    error: str | None
    processing_time_ms: int | None
    attempt: int
    worker_id: str | None
    created_at: datetime

    @classmethod
    def of(cls, request: Request, now: datetime) -> Result:
        return cls(
            id=uuid.uuid4(),
            request_id=request.id,
            status=request.status,
            result=request.result,
            error=request.error,
            processing_time_ms=request.processing_time_ms,
            attempt=request.attempts,
            worker_id=request.worker_id,
            created_at=now,
        )


@dataclass(frozen=True, slots=True)
class RequestEvent:
    """One entry of a request's event stream (status changes and partial results)."""

    request_id: uuid.UUID
    type: str  # "status" or "progress"
    data: JSON
    id: str = ""
