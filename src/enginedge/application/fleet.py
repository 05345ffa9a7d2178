"""Use cases workers drive over the bus: results, progress and heartbeats."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from enginedge.application.context import Context
from enginedge.application.events import progress_event, status_event
from enginedge.application.outbox import finish, finished
from enginedge.domain.messages import HeartbeatMessage, ResultMessage
from enginedge.domain.model import Request, RequestStatus, Worker, WorkerStatus

log = logging.getLogger(__name__)


class UnknownRequest(LookupError):
    """A result for a request this orchestrator never accepted."""


async def record_result(ctx: Context, msg: ResultMessage) -> None:
    """Apply a worker's message to its request, exactly once.

    Delivery is at-least-once, so the same message may come twice, and a superseded attempt
    may still report: both are counted and change nothing.
    """
    if msg.kind == "progress" and msg.seq > 0:
        await _record_progress(ctx, msg)
        return
    now = ctx.clock.now()
    events = []
    async with ctx.store.transaction() as tx:
        request = await tx.lock_request(msg.request_id)
        if request is None:
            raise UnknownRequest(f"unknown request {msg.request_id}")
        if _ignored(ctx, request, msg):
            return
        if request.status is RequestStatus.PENDING:
            request.mark_dispatched(now)
        if request.status is RequestStatus.DISPATCHED:
            request.mark_processing(msg.worker_id, now)
            events.append(status_event(request))
        if msg.kind == "completed":
            assert msg.result is not None
            request.complete(msg.result, msg.processing_time_ms, now)
        elif msg.kind == "failed":
            assert msg.error is not None
            request.fail(msg.error, now, msg.processing_time_ms)
        if request.terminal:
            await finish(ctx, tx, request, now)
            events.append(status_event(request))
        elif events:
            await tx.save_request(request)
    for event in events:
        await ctx.events.append(event)
    if request.terminal:
        finished(ctx, request)


async def _record_progress(ctx: Context, msg: ResultMessage) -> None:
    request = await ctx.store.get_request(msg.request_id)
    if request is None:
        raise UnknownRequest(f"unknown request {msg.request_id}")
    if _ignored(ctx, request, msg):
        return
    if request.status is not RequestStatus.PROCESSING:
        # The start message was lost or overtaken: let this message start the attempt.
        await record_result(ctx, replace(msg, seq=0, chunk=None))
    await ctx.events.append(progress_event(request, msg.seq, msg.chunk))


def _ignored(ctx: Context, request: Request, msg: ResultMessage) -> bool:
    if request.terminal:
        ctx.metrics.result_ignored("duplicate" if msg.kind != "progress" else "late")
        return True
    if msg.attempt != request.attempts:
        ctx.metrics.result_ignored("superseded")
        return True
    if request.status is RequestStatus.PROCESSING and request.worker_id != msg.worker_id:
        ctx.metrics.result_ignored("other-worker")
        return True
    return False


async def record_heartbeat(ctx: Context, msg: HeartbeatMessage) -> Worker:
    """Refresh the registry; persist the worker when it is new, when what the table shows
    changed, and every third of the heartbeat TTL, so that the ``workers`` table can stand in
    for the registry (``last_heartbeat`` within the TTL) if the cache goes away."""
    now = ctx.clock.now()
    previous = await ctx.registry.get(msg.worker_id)
    worker = Worker(
        id=msg.worker_id,
        type=msg.type,
        endpoint=msg.endpoint,
        capabilities=list(msg.capabilities),
        capacity=msg.capacity,
        active=msg.active,
        status=WorkerStatus(msg.status),
        # The orchestrator's own clock decides liveness, so worker clock skew cannot.
        last_heartbeat=now,
        last_health_check=previous.last_health_check if previous else None,
        first_seen=previous.first_seen if previous and previous.first_seen else now,
        in_flight=list(msg.in_flight),
        reason=msg.reason,
        check_error=previous.check_error if previous else None,
        idle=msg.idle,
    )
    await ctx.registry.upsert(worker)
    persisted = ctx.worker_persisted_at.get(worker.id)
    if (
        previous is None
        or persisted is None
        or now - persisted >= ctx.policy.heartbeat_ttl / 3
        or _persisted_fields_changed(ctx, previous, worker)
    ):
        async with ctx.store.transaction() as tx:
            await tx.save_worker(worker)
        ctx.worker_persisted_at[worker.id] = now
    return worker


def _persisted_fields_changed(ctx: Context, old: Worker, new: Worker) -> bool:
    return (
        old.effective_status(new.last_heartbeat, ctx.policy.heartbeat_ttl) != new.status
        or old.type != new.type
        or old.endpoint != new.endpoint
        or old.capabilities != new.capabilities
        or old.capacity != new.capacity
    )


async def check_worker_health(ctx: Context) -> list[Worker]:
    """Check the ``/health`` of every live worker that has an HTTP endpoint, side by side;
    a failed check makes the worker UNHEALTHY (no new work, its requests re-dispatched by
    the sweeper) until a check passes again. Returns the workers checked."""
    if ctx.prober is None:
        return []
    prober = ctx.prober
    now = ctx.clock.now()
    workers = [
        w
        for w in await ctx.registry.all()
        if w.endpoint.startswith(("http://", "https://"))
        and now - w.last_heartbeat <= ctx.policy.heartbeat_ttl
    ]
    errors = await asyncio.gather(
        *(prober.probe(w.endpoint, ctx.policy.worker_check_timeout) for w in workers)
    )
    for worker, error in zip(workers, errors, strict=True):
        changed = error != worker.check_error
        worker.check_error = error
        worker.last_health_check = now
        await ctx.registry.upsert(worker)
        if changed:
            log.warning(
                "worker health check " + ("failed" if error else "passes again"),
                extra={"workerId": worker.id, "workerType": worker.type, "error": error},
            )
            async with ctx.store.transaction() as tx:
                await tx.save_worker(worker)
    return workers
