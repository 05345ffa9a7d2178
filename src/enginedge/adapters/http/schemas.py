"""The API's bodies, as pydantic models: they validate input and make the OpenAPI document."""

from __future__ import annotations

import math
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from enginedge.domain.model import Request, Worker


class Model(BaseModel):
    model_config = ConfigDict(populate_by_name=True)


def _storable(value: Any) -> Any:
    """JSON that can be kept and sent on as given: no lone surrogates (not UTF-8), no NUL
    characters (PostgreSQL keeps none), no infinite numbers (1e999 parses as one), no
    integers over 64 bits."""
    if isinstance(value, str):
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("strings must be valid UTF-8") from None
        if "\x00" in value:
            raise ValueError("strings must not contain NUL characters")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("numbers must be finite")
    elif isinstance(value, int) and not -(2**63) <= value < 2**64:
        # The wire format (orjson) carries 64-bit integers; a bigger one cannot be sent on.
        raise ValueError("integers must fit in 64 bits (-2^63 to 2^64-1)")
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key)
            _storable(item)
    elif isinstance(value, list):
        for item in value:
            _storable(item)
    return value


class OrchestrateBody(Model):
    taskType: str = Field(
        description="Task type, e.g. data.sql, data.describe, llm.chat", examples=["data.sql"]
    )
    payload: dict[str, Any] = Field(
        description="Input of the task; its shape depends on the task type"
    )
    metadata: dict[str, Any] | None = Field(
        default=None,
        description="Optional: priority (-100..100), correlationId, timeout (seconds), "
        "callbackUrl; other fields are kept as given",
    )

    @field_validator("taskType", "payload", "metadata")
    @classmethod
    def _json_that_can_be_kept(cls, value: Any) -> Any:
        return _storable(value)


class OrchestrateResponse(Model):
    requestId: str
    status: str
    workerType: str
    estimatedDuration: float | None = Field(
        description="Seconds this task type has recently taken; null until one has finished"
    )
    statusUrl: str


class RequestView(Model):
    requestId: str
    tenant: str | None = Field(
        description="Whose request it is: the name of the API key that submitted it, or "
        "the key's tenant hash (16 hex digits) if it has no name"
    )
    taskType: str
    status: str
    workerType: str
    workerId: str | None
    attempts: int
    maxAttempts: int
    priority: int
    correlationId: str | None
    payload: dict[str, Any]
    metadata: dict[str, Any]
    createdAt: datetime
    updatedAt: datetime
    deadline: datetime
    dispatchedAt: datetime | None
    startedAt: datetime | None
    finishedAt: datetime | None
    result: dict[str, Any] | None
    error: str | None
    processingTime: int | None = Field(description="Milliseconds the worker spent on it")
    queuePosition: int | None = Field(
        default=None,
        description="While it waits (PENDING), shown by GET /api/requests/{id}: how many "
        "waiting requests of its worker type go before it by priority and age, plus one "
        "(fair shares across tenants may take it sooner); null otherwise",
    )

    @classmethod
    def of(
        cls, r: Request, tenant: str | None = None, queue_position: int | None = None
    ) -> RequestView:
        """The view of ``r``; ``tenant`` is how to call its tenant (default: its hash)."""
        return cls(
            requestId=str(r.id),
            tenant=tenant if tenant is not None else r.caller,
            taskType=r.task_type,
            status=r.status.value,
            workerType=r.worker_type,
            workerId=r.worker_id,
            attempts=r.attempts,
            maxAttempts=r.max_attempts,
            priority=r.priority,
            correlationId=r.correlation_id,
            payload=r.payload,
            metadata=r.metadata,
            createdAt=r.created_at,
            updatedAt=r.updated_at,
            deadline=r.deadline,
            dispatchedAt=r.dispatched_at,
            startedAt=r.started_at,
            finishedAt=r.finished_at,
            result=r.result,
            error=r.error,
            processingTime=r.processing_time_ms,
            queuePosition=queue_position,
        )


class RequestPage(Model):
    items: list[RequestView]
    nextCursor: str | None = Field(
        description="Pass as ?cursor= for the next page; null at the end"
    )


class WorkerView(Model):
    workerId: str
    type: str
    endpoint: str
    status: Literal["HEALTHY", "UNHEALTHY", "DRAINING"]
    capabilities: list[str]
    capacity: int
    active: int = Field(description="Requests it runs, as its last heartbeat said")
    slotsInUse: int = Field(
        description="Slots taken by the requests the scheduler handed it (dispatched or "
        "running): what the scheduler counts; at most its capacity"
    )
    load: float
    lastHeartbeat: datetime
    lastHealthCheck: datetime | None
    statusReason: str | None

    @classmethod
    def of(cls, w: Worker, status: str, slots_in_use: int = 0) -> WorkerView:
        return cls(
            workerId=w.id,
            type=w.type,
            endpoint=w.endpoint,
            status=status,  # type: ignore[arg-type]
            capabilities=w.capabilities,
            capacity=w.capacity,
            active=w.active,
            slotsInUse=slots_in_use,
            load=w.load,
            lastHeartbeat=w.last_heartbeat,
            lastHealthCheck=w.last_health_check,
            statusReason=w.check_error or w.reason,
        )


class WorkerList(Model):
    items: list[WorkerView]


class ErrorDetail(Model):
    code: str
    message: str
    requestId: str | None = None


class ErrorBody(Model):
    error: ErrorDetail


class ComponentView(Model):
    status: Literal["up", "down"]
    error: str | None = None


class HealthView(Model):
    status: Literal["ok", "degraded", "down"]
    timestamp: datetime
    components: dict[str, ComponentView]
    workers: dict[str, dict[str, int]] = Field(
        description="Per worker type: healthy and total workers"
    )


class ProbeView(Model):
    status: str
    components: dict[str, ComponentView] | None = None
