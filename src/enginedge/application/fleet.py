"""Use cases workers drive over the bus: results, progress and heartbeats."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta

from enginedge.application.context import Context
from enginedge.application.events import progress_event, status_event
from enginedge.application.maintenance import redispatch_abandoned
from enginedge.application.outbox import finished
from enginedge.application.scheduler import observe_dispatch
from enginedge.domain.errors import IllegalTransition
from enginedge.domain.messages import HeartbeatMessage, ResultMessage
from enginedge.domain.model import (
    Request,
    RequestEvent,
    RequestStatus,
    Result,
    Worker,
    WorkerStatus,
)

log = logging.getLogger(__name__)


class UnknownRequest(LookupError):
    """A result for a request this orchestrator never accepted."""


async def record_result(ctx: Context, msg: ResultMessage) -> None:
    """Apply one worker message to its request, exactly once (see :func:`record_results`)."""
    refused = await record_results(ctx, [msg])
    if refused:
        raise refused[0][1]


Around = Callable[[ResultMessage], AbstractContextManager[object]]


async def record_results(
    ctx: Context, messages: Sequence[ResultMessage], around: Around | None = None
) -> list[tuple[ResultMessage, Exception]]:
    """Apply a batch of worker messages in one transaction, exactly once; return those
    refused (unknown request, impossible transition) with the reason, for the DLQ.

    Delivery is at-least-once, so the same message may come twice, and a superseded attempt
    may still report: both are counted and change nothing. One transaction for the batch
    is the group commit that lets the store keep up with a busy fleet. ``around`` wraps the
    application of each message (a tracing span).
    """
    now = ctx.clock.now()
    events: list[RequestEvent] = []
    done: list[Request] = []
    refused: list[tuple[ResultMessage, Exception]] = []
    async with ctx.store.transaction() as tx:
        requests = {r.id: r for r in await tx.lock_requests([m.request_id for m in messages])}
        changed: dict[uuid.UUID, Request] = {}
        for msg in messages:
            request = requests.get(msg.request_id)
            if request is None:
                refused.append((msg, UnknownRequest(f"unknown request {msg.request_id}")))
                continue
            with around(msg) if around else contextlib.nullcontext():
                try:
                    told = _apply(ctx, request, msg, now)
                except IllegalTransition as exc:
                    refused.append((msg, exc))
                    continue
            events += told
            if any(e.type == "status" for e in told):
                changed[request.id] = request
                if request.terminal:
                    done.append(request)
        await tx.save_requests(list(changed.values()))
        await tx.add_results([Result.of(r, now) for r in done])
    # Callers of this replica are handed the outcome (first: their answers need no cache);
    # others read it as soon as its event is out, from the cache (so filled before the
    # event), not the store.
    for request in done:
        finished(ctx, request)
    if done:
        ctx.wake_scheduler()  # their slots are free
    await ctx.request_cache.put_all(done)
    await ctx.events.append_all(events)
    return refused


def _started_at(request: Request, msg: ResultMessage, now: datetime) -> datetime:
    """When the worker started, as well as this replica can tell: an outcome says how long
    it ran (a duration, so the two clocks need not agree)."""
    if msg.kind == "progress" or msg.processing_time_ms is None:
        return now
    started = now - timedelta(milliseconds=msg.processing_time_ms)
    dispatched = request.dispatched_at
    return max(started, dispatched) if dispatched is not None else started


def _apply(ctx: Context, request: Request, msg: ResultMessage, now: datetime) -> list[RequestEvent]:
    """Move ``request`` as ``msg`` says; the events to tell (none if nothing changed)."""
    if _ignored(ctx, request, msg):
        return []
    told = []
    if request.status is RequestStatus.PENDING:
        # The worker answered before the relay's commit marked the request DISPATCHED (the
        # relay's update will find it moved on and change nothing): tell it here, so the
        # events still show every step.
        request.mark_dispatched(now)
        observe_dispatch(ctx, request, now)
        told.append(status_event(request))
    if request.status is RequestStatus.DISPATCHED:
        # A partial result or outcome before its start message (not sent for a short task,
        # or lost, or overtaken) starts the attempt.
        request.mark_processing(msg.worker_id, _started_at(request, msg, now))
        told.append(status_event(request))
    if msg.kind == "completed":
        assert msg.result is not None
        request.complete(msg.result, msg.processing_time_ms, now)
        told.append(status_event(request))
    elif msg.kind == "failed":
        assert msg.error is not None
        request.fail(msg.error, now, msg.processing_time_ms)
        told.append(status_event(request))
    elif msg.seq > 0:
        told.append(progress_event(request, msg.seq, msg.chunk))
    return told


def _ignored(ctx: Context, request: Request, msg: ResultMessage) -> bool:
    if request.terminal:
        ctx.metrics.result_ignored("duplicate" if msg.kind != "progress" else "late")
        return True
    if msg.attempt != request.attempts:
        ctx.metrics.result_ignored("superseded")
        return True
    if request.worker_id is not None and request.worker_id != msg.worker_id:
        # Handed to another worker (a dispatch that an earlier scheduler pass published but
        # whose commit was lost): only the chosen one's reports count.
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
        inbox=msg.inbox,
    )
    await ctx.registry.upsert(worker)
    if previous is None or _schedulable_changed(ctx, previous, worker):
        ctx.wake_scheduler()
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
    if msg.abandoned:
        await redispatch_abandoned(ctx, worker.id, msg.abandoned)
    return worker


def _schedulable_changed(ctx: Context, old: Worker, new: Worker) -> bool:
    """A change that may give the scheduler slots it did not have."""
    return (
        old.effective_status(new.last_heartbeat, ctx.policy.heartbeat_ttl) != new.status
        or old.capacity != new.capacity
        or old.inbox != new.inbox
    )


def _persisted_fields_changed(ctx: Context, old: Worker, new: Worker) -> bool:
    return (
        old.effective_status(new.last_heartbeat, ctx.policy.heartbeat_ttl) != new.status
        or old.type != new.type
        or old.endpoint != new.endpoint
        or old.capabilities != new.capabilities
        or old.capacity != new.capacity
        or old.inbox != new.inbox
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
