"""Messages the use cases write to the outbox, and the relay that publishes them; what
every use case does with a request that just finished."""

from __future__ import annotations

import logging
from datetime import datetime

from enginedge.application.context import Context
from enginedge.application.ports import BusMessage, OutboxMessage, StoreTransaction
from enginedge.domain.messages import BROADCAST_KEY, CONTROL_TOPIC, ControlMessage
from enginedge.domain.model import Request, Result

log = logging.getLogger(__name__)


def cancel_message(request: Request) -> OutboxMessage:
    """Tell the worker holding the request (or every worker, if none is known) to stop."""
    return OutboxMessage(
        topic=CONTROL_TOPIC,
        key=request.worker_id or BROADCAST_KEY,
        value=ControlMessage(action="cancel", request_id=request.id).to_json(),
        headers=message_headers(request),
    )


def message_headers(request: Request) -> dict[str, str]:
    """The headers every message about ``request`` carries (SPEC §6)."""
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
            "tenant": ctx.tenants.label(request.caller),
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
    """Publish up to ``batch_size`` due outbox messages (control messages: cancels); return
    how many were sent.

    The messages are deleted only after the bus has taken them, in the same transaction
    that claimed them: a crash in between publishes them again (at-least-once), never loses
    them.
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
    return len(pending)
