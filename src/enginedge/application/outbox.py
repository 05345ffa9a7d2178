"""Messages the use cases write to the outbox, and the relay that publishes them."""

from __future__ import annotations

import logging
from datetime import datetime

from enginedge.application.context import Context
from enginedge.application.events import status_event
from enginedge.application.ports import BusMessage, OutboxMessage, StoreTransaction
from enginedge.domain.messages import (
    BROADCAST_KEY,
    CONTROL_TOPIC,
    ControlMessage,
    DispatchMessage,
    requests_topic,
)
from enginedge.domain.model import Request, Result

log = logging.getLogger(__name__)


def dispatch_message(request: Request, available_at: datetime | None = None) -> OutboxMessage:
    """The outbox entry that sends the request's current attempt to its worker type."""
    message = DispatchMessage(
        request_id=request.id,
        attempt=request.attempts,
        task_type=request.task_type,
        payload=request.payload,
        metadata=request.metadata,
        deadline=request.deadline,
    )
    return OutboxMessage(
        topic=requests_topic(request.worker_type),
        key=str(request.id),
        value=message.to_json(),
        headers=_headers(request),
        available_at=available_at,
        request_id=request.id,
        attempt=request.attempts,
    )


def cancel_message(request: Request) -> OutboxMessage:
    """Tell the worker holding the request (or every worker, if none is known) to stop."""
    return OutboxMessage(
        topic=CONTROL_TOPIC,
        key=request.worker_id or BROADCAST_KEY,
        value=ControlMessage(action="cancel", request_id=request.id).to_json(),
        headers=_headers(request),
    )


def _headers(request: Request) -> dict[str, str]:
    headers = {"correlation-id": request.correlation_id or str(request.id)}
    if request.traceparent:
        headers["traceparent"] = request.traceparent
    return headers


async def finish(ctx: Context, tx: StoreTransaction, request: Request, now: datetime) -> None:
    """Persist a request that just became terminal, with its one result row."""
    await tx.save_requests([request])
    await tx.add_results([Result.of(request, now)])


def finished(ctx: Context, request: Request) -> None:
    """Count and log a terminal request and answer its waiters (after its transaction
    committed, before its event goes out: the event wakes waiters that would then read it).
    """
    ctx.waiters.resolve(request)
    ctx.metrics.request_finished(
        request.status, (request.updated_at - request.created_at).total_seconds()
    )
    log.info(
        "request finished",
        extra={
            "requestId": str(request.id),
            "status": request.status.value,
            "taskType": request.task_type,
            "workerType": request.worker_type,
            "workerId": request.worker_id,
            "attempts": request.attempts,
            "processingTime": request.processing_time_ms,
            "correlationId": request.correlation_id,
            "error": request.error,
        },
    )
    if request.processing_time_ms is not None and request.status.value == "COMPLETED":
        ctx.observe_duration(request.task_type, request.processing_time_ms / 1000)


async def relay_outbox(ctx: Context, batch_size: int) -> int:
    """Publish up to ``batch_size`` due outbox messages; return how many were sent.

    The messages are deleted and their requests marked DISPATCHED only after the bus has
    taken them, in the same transaction that claimed them: a crash in between publishes
    them again (at-least-once), never loses them.
    """
    now = ctx.clock.now()
    # Not durable: a crash that loses this commit brings the messages back to the outbox,
    # and they are published again, as when the crash comes before the commit.
    async with ctx.store.transaction(durable=False) as tx:
        pending = await tx.claim_outbox(now, batch_size)
        if not pending:
            return 0
        await ctx.bus.publish(
            [
                BusMessage(topic=m.topic, key=m.key, value=m.value, headers=m.headers)
                for m in pending
            ]
        )
        await tx.delete_outbox([m.id for m in pending if m.id is not None])
        attempts = [
            (m.request_id, m.attempt)
            for m in pending
            if m.request_id is not None and m.attempt is not None
        ]
        dispatched = await tx.mark_dispatched(attempts, now) if attempts else []
        # Told before the commit, while the rows are still locked: a worker's report moves
        # the request on only after this commit, so its events come after these.
        await ctx.events.append_all([status_event(r) for r in dispatched])
    for request in dispatched:
        observe_dispatch(ctx, request, now)
    return len(pending)


def observe_dispatch(ctx: Context, request: Request, now: datetime) -> None:
    """Observe how long a request waited for its first dispatch (a retry is not a new wait)."""
    if request.attempts == 1:
        ctx.metrics.dispatched(request.worker_type, (now - request.created_at).total_seconds())
