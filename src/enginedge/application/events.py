"""The request events that SSE clients follow."""

from __future__ import annotations

from typing import Any

from enginedge.domain.model import Request, RequestEvent


def status_event(request: Request, **extra: Any) -> RequestEvent:
    """A status change, carrying the outcome once the request is terminal."""
    data: dict[str, Any] = {
        "requestId": str(request.id),
        "status": request.status.value,
        "attempt": request.attempts,
        "timestamp": request.updated_at.isoformat(),
    }
    if request.worker_id:
        data["workerId"] = request.worker_id
    if request.terminal:
        data["result"] = request.result
        data["error"] = request.error
        data["processingTime"] = request.processing_time_ms
    data.update(extra)
    return RequestEvent(request_id=request.id, type="status", data=data)


def progress_event(request: Request, seq: int, chunk: Any) -> RequestEvent:
    """A partial result (e.g. LLM tokens) of the request's current attempt."""
    return RequestEvent(
        request_id=request.id,
        type="progress",
        data={
            "requestId": str(request.id),
            "attempt": request.attempts,
            "seq": seq,
            "chunk": chunk,
        },
    )
