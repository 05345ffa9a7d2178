"""The wire contract between the orchestrator and workers (SPEC §6).

Each message is a frozen dataclass with ``to_json`` / ``from_json``. Parsing is strict:
anything that does not match the contract raises :class:`MalformedMessage`, whose reason
goes with the original bytes to the topic's dead-letter queue.
"""

from __future__ import annotations

import re
import secrets
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import orjson

RESULTS_TOPIC = "worker.results"
HEARTBEATS_TOPIC = "worker.heartbeats"
CONTROL_TOPIC = "worker.control"
# Where a worker puts a dispatch it cannot parse: one topic for every worker's inbox, so that
# the operator finds them in one place (the console records it).
DISPATCH_DLQ_TOPIC = "worker.requests.dlq"
ORCHESTRATOR_GROUP = "main-hexagon"
BROADCAST_KEY = "*"
WORKER_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9-]{0,49}$")

ResultKind = Literal["progress", "completed", "failed"]
RESULT_KINDS: frozenset[str] = frozenset({"progress", "completed", "failed"})


TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def new_traceparent() -> str:
    """A W3C trace context for a message that starts a trace (no caller sent one)."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def valid_traceparent(value: str | None) -> str | None:
    """``value`` if it is a well-formed W3C ``traceparent``, else None."""
    return value if value is not None and TRACEPARENT.match(value) else None


TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def inbox_topic(worker_type: str, worker_id: str, incarnation: str) -> str:
    """The topic that carries dispatches to one worker process, and to no other.

    The scheduler picks the worker; the topic only carries the choice. One per process
    start (``incarnation``), so that a worker restarted under the same id reads none of
    what was meant for its previous run, whose requests the orchestrator gave back to the
    queue when that run was lost.
    """
    return f"worker.{worker_type}.{worker_id}.{incarnation}.requests"


def dlq_topic(topic: str) -> str:
    return f"{topic}.dlq"


class MalformedMessage(ValueError):
    """A message that does not follow the wire contract."""


T = TypeVar("T")


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise MalformedMessage(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise MalformedMessage("the message is not a JSON object")
    return value


def _field(
    data: dict[str, Any], name: str, kind: type[T] | tuple[type, ...], *, optional: bool = False
) -> Any:
    value = data.get(name)
    if value is None:
        if optional:
            return None
        raise MalformedMessage(f"missing field {name!r}")
    if isinstance(value, bool) and kind is not bool:
        raise MalformedMessage(f"field {name!r} has the wrong type")
    if not isinstance(value, kind):
        raise MalformedMessage(f"field {name!r} has the wrong type")
    return value


def _uuid(data: dict[str, Any], name: str) -> uuid.UUID:
    value = _field(data, name, str)
    try:
        return uuid.UUID(value)
    except ValueError:
        raise MalformedMessage(f"field {name!r} is not a UUID") from None


def _timestamp(data: dict[str, Any], name: str) -> datetime:
    value = _field(data, name, str)
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise MalformedMessage(f"field {name!r} is not an ISO-8601 timestamp") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


# Counters, attempts, capacities and durations are 32-bit integer columns in the store: a
# larger value would fail there, on every retry, instead of going to the DLQ here.
INT32_MAX = 2**31 - 1


def _positive(data: dict[str, Any], name: str, *, minimum: int = 0) -> int:
    value: int = _field(data, name, int)
    if value < minimum:
        raise MalformedMessage(f"field {name!r} must be at least {minimum}")
    if value > INT32_MAX:
        raise MalformedMessage(f"field {name!r} must be at most {INT32_MAX}")
    return value


def _without_nul(value: Any, name: str) -> Any:
    """PostgreSQL keeps no NUL character in text or JSON: such a message goes to the DLQ
    here rather than failing in the store on every retry."""
    if isinstance(value, str):
        if "\x00" in value:
            raise MalformedMessage(f"field {name!r} contains a NUL character")
    elif isinstance(value, dict):
        for key, item in value.items():
            _without_nul(key, name)
            _without_nul(item, name)
    elif isinstance(value, list):
        for item in value:
            _without_nul(item, name)
    return value


def encode(value: dict[str, Any]) -> bytes:
    return orjson.dumps(value)


@dataclass(frozen=True, slots=True)
class DispatchMessage:
    """Orchestrator -> workers of one type: run this attempt of a request."""

    request_id: uuid.UUID
    attempt: int
    task_type: str
    payload: dict[str, Any]
    metadata: dict[str, Any]
    deadline: datetime

    def to_json(self) -> bytes:
        return encode(
            {
                "requestId": str(self.request_id),
                "attempt": self.attempt,
                "taskType": self.task_type,
                "payload": self.payload,
                "metadata": self.metadata,
                "deadline": self.deadline.isoformat(),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> DispatchMessage:
        data = _decode(raw)
        return cls(
            request_id=_uuid(data, "requestId"),
            attempt=_positive(data, "attempt", minimum=1),
            task_type=_field(data, "taskType", str),
            payload=_field(data, "payload", dict),
            metadata=_field(data, "metadata", dict, optional=True) or {},
            deadline=_timestamp(data, "deadline"),
        )


@dataclass(frozen=True, slots=True)
class ResultMessage:
    """Worker -> orchestrator: progress of, or the outcome of, one attempt.

    ``progress`` with ``seq`` 0 and no chunk says the worker has started the attempt.
    """

    request_id: uuid.UUID
    attempt: int
    worker_id: str
    kind: ResultKind
    seq: int
    result: dict[str, Any] | None = None
    chunk: Any = None
    error: str | None = None
    processing_time_ms: int | None = None

    def to_json(self) -> bytes:
        value: dict[str, Any] = {
            "requestId": str(self.request_id),
            "attempt": self.attempt,
            "workerId": self.worker_id,
            "kind": self.kind,
            "seq": self.seq,
        }
        if self.result is not None:
            value["result"] = self.result
        if self.chunk is not None:
            value["chunk"] = self.chunk
        if self.error is not None:
            value["error"] = self.error
        if self.processing_time_ms is not None:
            value["processingTime"] = self.processing_time_ms
        return encode(value)

    @classmethod
    def from_json(cls, raw: bytes) -> ResultMessage:
        data = _decode(raw)
        kind = _field(data, "kind", str)
        if kind not in RESULT_KINDS:
            raise MalformedMessage(f"field 'kind' must be one of {sorted(RESULT_KINDS)}")
        result = _without_nul(_field(data, "result", dict, optional=True), "result")
        error = _without_nul(_field(data, "error", str, optional=True), "error")
        if kind == "completed" and result is None:
            raise MalformedMessage("a completed message needs a 'result' object")
        if kind == "failed" and error is None:
            raise MalformedMessage("a failed message needs an 'error' string")
        processing_time = data.get("processingTime")
        if processing_time is not None:
            processing_time = _positive(data, "processingTime")
        return cls(
            request_id=_uuid(data, "requestId"),
            attempt=_positive(data, "attempt", minimum=1),
            worker_id=str(_uuid(data, "workerId")),
            kind=kind,  # checked against RESULT_KINDS above
            seq=_positive(data, "seq"),
            result=result,
            chunk=data.get("chunk"),
            error=error,
            processing_time_ms=processing_time,
        )


@dataclass(frozen=True, slots=True)
class HeartbeatMessage:
    """Worker -> orchestrator: who I am, what I can do, how busy I am."""

    worker_id: str
    type: str
    endpoint: str
    capabilities: list[str]
    capacity: int
    active: int
    status: str
    ts: datetime
    in_flight: list[str] = field(default_factory=list)
    reason: str | None = None
    # Where the orchestrator sends this worker's dispatches (see inbox_topic).
    inbox: str | None = None
    # Attempts it gave up without an outcome (a stalled handler), by request id: the
    # orchestrator dispatches them again at once instead of waiting to find them unheld.
    abandoned: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return encode(
            {
                "workerId": self.worker_id,
                "type": self.type,
                "endpoint": self.endpoint,
                "capabilities": self.capabilities,
                "capacity": self.capacity,
                "active": self.active,
                "status": self.status,
                "ts": self.ts.isoformat(),
                "inFlight": self.in_flight,
                **({"reason": self.reason} if self.reason else {}),
                **({"inbox": self.inbox} if self.inbox else {}),
                **({"abandoned": self.abandoned} if self.abandoned else {}),
            }
        )

    @classmethod
    def from_json(cls, raw: bytes) -> HeartbeatMessage:
        data = _decode(raw)
        worker_id = str(_uuid(data, "workerId"))
        worker_type = _field(data, "type", str)
        if not WORKER_TYPE_PATTERN.match(worker_type):
            raise MalformedMessage("field 'type' must be a lower-case worker type name")
        capabilities = _field(data, "capabilities", list)
        if not all(isinstance(c, str) for c in capabilities):
            raise MalformedMessage("field 'capabilities' must be a list of task type names")
        status = _field(data, "status", str).upper()
        if status not in ("HEALTHY", "UNHEALTHY", "DRAINING"):
            raise MalformedMessage("field 'status' must be healthy, unhealthy or draining")
        in_flight = data.get("inFlight") or []
        if not isinstance(in_flight, list) or not all(isinstance(r, str) for r in in_flight):
            raise MalformedMessage("field 'inFlight' must be a list of request ids")
        endpoint = _field(data, "endpoint", str)
        _without_nul([worker_type, endpoint, capabilities, in_flight, data.get("reason")], "*")
        if len(endpoint) > 255:
            raise MalformedMessage("field 'endpoint' must have at most 255 characters")
        return cls(
            worker_id=worker_id,
            type=worker_type,
            endpoint=endpoint,
            capabilities=capabilities,
            capacity=_positive(data, "capacity", minimum=1),
            active=_positive(data, "active"),
            status=status,
            ts=_timestamp(data, "ts"),
            in_flight=in_flight,
            reason=str(data["reason"])[:500] if data.get("reason") else None,
            inbox=_inbox(data),
            abandoned=_abandoned(data),
        )


def _inbox(data: dict[str, Any]) -> str | None:
    inbox: str | None = _field(data, "inbox", str, optional=True)
    if inbox is not None and not TOPIC_NAME.match(inbox):
        raise MalformedMessage("field 'inbox' must be a topic name")
    return inbox


# More than any worker's capacity: a list past it is not an honest heartbeat.
MAX_ABANDONED = 10_000


def _abandoned(data: dict[str, Any]) -> dict[str, int]:
    wrong = MalformedMessage("field 'abandoned' must map request ids to attempt numbers")
    abandoned = data.get("abandoned") or {}
    if (
        not isinstance(abandoned, dict)
        or len(abandoned) > MAX_ABANDONED
        or not all(
            isinstance(a, int) and not isinstance(a, bool) and a >= 1 for a in abandoned.values()
        )
    ):
        raise wrong
    try:
        return {str(uuid.UUID(rid)): attempt for rid, attempt in abandoned.items()}
    except ValueError:
        raise wrong from None


@dataclass(frozen=True, slots=True)
class ControlMessage:
    """Orchestrator -> workers: stop working on a request."""

    action: Literal["cancel"]
    request_id: uuid.UUID

    def to_json(self) -> bytes:
        return encode({"action": self.action, "requestId": str(self.request_id)})

    @classmethod
    def from_json(cls, raw: bytes) -> ControlMessage:
        data = _decode(raw)
        if data.get("action") != "cancel":
            raise MalformedMessage("field 'action' must be 'cancel'")
        return cls(action="cancel", request_id=_uuid(data, "requestId"))


def dead_letter(original: bytes, error: str, failed_at: datetime) -> bytes:
    """The DLQ value: the original message plus ``{error, failedAt}``.

    A JSON object keeps its fields; anything else is carried as text under ``original``.
    """
    try:
        value = orjson.loads(original)
    except orjson.JSONDecodeError:
        value = None
    body: dict[str, Any] = (
        dict(value)
        if isinstance(value, dict)
        else {"original": original.decode("utf-8", errors="replace")}
    )
    body["error"] = error
    body["failedAt"] = failed_at.isoformat()
    return encode(body)
