"""Use cases the orchestrator runs on its own: timeouts, lost workers, lost dispatches."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from enginedge.application.context import Context
from enginedge.application.events import status_event
from enginedge.application.outbox import cancel_message, finish, finished
from enginedge.application.ports import StoreTransaction
from enginedge.domain.model import Request, RequestEvent, RequestStatus, Worker, WorkerStatus

BATCH = 200

Selector = Callable[[StoreTransaction], Awaitable[list[Request]]]


@dataclass(slots=True)
class SweepReport:
    timed_out: int = 0
    redispatched: int = 0
    failed: int = 0
    workers_lost: int = 0


async def sweep(ctx: Context) -> SweepReport:
    """One pass of the housekeeping that keeps every request moving to a terminal state."""
    report = SweepReport()
    now = ctx.clock.now()
    await _time_out(ctx, now, report)
    workers = await ctx.registry.all()
    lost = await _lost_workers(ctx, workers, now, report)
    if lost:
        await _redispatch(
            ctx,
            now,
            report,
            "worker_lost",
            "the worker running it was lost",
            # Only what it has run for a whole TTL: a worker judged lost while it still works
            # (its heartbeats delayed, not stopped) would otherwise see every new attempt
            # taken from it again and again, until the request failed.
            lambda tx: tx.lock_in_flight(sorted(lost), BATCH, now - ctx.policy.heartbeat_ttl),
        )
    alive = [w for w in workers if w.id not in lost]
    if alive:
        await _redispatch(
            ctx,
            now,
            report,
            "result_lost",
            "its worker does not hold it and no result came",
            lambda tx: _unheld(ctx, tx, alive, now),
        )
    return report


async def recover_in_flight(ctx: Context) -> SweepReport:
    """Re-dispatch everything in flight at start-up, when the bus did not outlive the process.

    With the in-process bus, dispatches and the built-in workers died with the previous
    process; without this, its in-flight requests would wait for the dispatch timeout.
    """
    report = SweepReport()
    if ctx.bus.durable:
        return report
    await _redispatch(
        ctx,
        ctx.clock.now(),
        report,
        "restart",
        "the service restarted",
        lambda tx: tx.lock_in_flight(None, BATCH),
    )
    return report


async def redispatch_abandoned(
    ctx: Context, worker_id: str, abandoned: dict[str, int]
) -> SweepReport:
    """Give another attempt, at once, to what a worker says it gave up without an outcome
    (a handler that made no progress within its stall timeout).

    Only the very attempt it names, and only while that worker is the one known to run it
    (or none is known yet), so that a heartbeat repeating the list changes nothing later.
    """
    report = SweepReport()
    ids = sorted(uuid.UUID(r) for r in abandoned)

    async def given_up(tx: StoreTransaction) -> list[Request]:
        return [
            r
            for r in await tx.lock_requests(ids)
            if r.status in (RequestStatus.DISPATCHED, RequestStatus.PROCESSING)
            and r.attempts == abandoned[str(r.id)]
            and r.worker_id in (None, worker_id)
        ]

    await _redispatch(
        ctx, ctx.clock.now(), report, "abandoned", "the worker running it gave it up", given_up
    )
    return report


async def _time_out(ctx: Context, now: datetime, report: SweepReport) -> None:
    while True:
        async with ctx.store.transaction() as tx:
            overdue = await tx.lock_overdue(now, BATCH)
            for request in overdue:
                request.time_out(now)
                await finish(ctx, tx, request, now)
                await tx.enqueue([cancel_message(request)])
        for request in overdue:
            finished(ctx, request)
        await ctx.events.append_all([status_event(r) for r in overdue])
        report.timed_out += len(overdue)
        if overdue:
            ctx.wake_relay()
        if len(overdue) < BATCH:
            return


async def _lost_workers(
    ctx: Context, workers: list[Worker], now: datetime, report: SweepReport
) -> set[str]:
    """Workers whose heartbeats stopped or whose health check fails; mark them.

    Not one that says itself it is unhealthy (a stalled handler, a cool-down) while its
    heartbeats still come: it gets no new work, but what it lists it is still running, and
    what it no longer lists is taken back as unheld, or at once if it says it gave it up.
    """
    lost: set[str] = set()
    for worker in workers:
        if worker.reports_itself(now, ctx.policy.heartbeat_ttl):
            continue
        lost.add(worker.id)
        if worker.status is not WorkerStatus.UNHEALTHY:
            # Its heartbeats still say healthy: the cause is silence or a failed check.
            worker.status = WorkerStatus.UNHEALTHY
            worker.reason = worker.check_error or "heartbeats stopped"
            await ctx.registry.upsert(worker)
            async with ctx.store.transaction() as tx:
                await tx.save_worker(worker)
            report.workers_lost += 1
    return lost


async def _unheld(
    ctx: Context, tx: StoreTransaction, alive: list[Worker], now: datetime
) -> list[Request]:
    """Requests handed to a live worker that has not listed them in its heartbeats for a
    whole heartbeat TTL: the worker finished or dropped them and the outcome was lost on the
    way (e.g. a broker restart lost the result message), or the dispatch never reached it."""
    held = {rid for w in alive for rid in w.in_flight}
    # Heartbeats older than the dispatch cannot list it yet.
    heard = {w.id: w.last_heartbeat for w in alive}
    running = await tx.lock_in_flight([w.id for w in alive], BATCH)
    seen = set()
    overdue = []
    for request in running:
        since_dispatch = request.started_at or request.dispatched_at
        if since_dispatch is not None and heard.get(request.worker_id or "", now) < since_dispatch:
            continue
        seen.add(request.id)
        if str(request.id) in held:
            ctx.unheld_since.pop(request.id, None)
            continue
        since = ctx.unheld_since.setdefault(request.id, now)
        if now - since > ctx.policy.heartbeat_ttl:
            overdue.append(request)
    for request_id in set(ctx.unheld_since) - seen:
        del ctx.unheld_since[request_id]
    for request in overdue:
        ctx.unheld_since.pop(request.id, None)
    return overdue


async def _redispatch(
    ctx: Context, now: datetime, report: SweepReport, label: str, reason: str, select: Selector
) -> None:
    """Give each selected request another attempt, or fail it when it has had them all."""
    while True:
        events: list[RequestEvent] = []
        terminal: list[Request] = []
        async with ctx.store.transaction() as tx:
            selected = await select(tx)
            for request in selected:
                if request.can_retry:
                    request.requeue(now, now + ctx.policy.backoff(request.attempts + 1))
                    await tx.save_requests([request])
                    events.append(status_event(request, reason=reason))
                    ctx.metrics.redispatched(label)
                    report.redispatched += 1
                else:
                    request.fail(f"{reason}; gave up after {request.attempts} attempts", now)
                    await finish(ctx, tx, request, now)
                    events.append(status_event(request))
                    terminal.append(request)
                    report.failed += 1
        for request in terminal:
            finished(ctx, request)
        await ctx.events.append_all(events)
        if events:
            # A slot was freed (and a retry queued, due after its backoff).
            ctx.wake_scheduler()
        if len(selected) < BATCH:
            return
