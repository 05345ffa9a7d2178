"""The scheduler: hand waiting requests to chosen workers' free slots (SPEC §5).

One pass reads the fleet, counts the slots in use, asks the policy
(:mod:`enginedge.domain.scheduling`) which waiting requests go where, publishes each
dispatch to its worker's own inbox topic and marks the requests DISPATCHED to that worker,
in one transaction that holds the deployment's scheduling lock: replicas take turns, so no
two count the same free slot. The dispatch is published before the commit: a crash in
between leaves the request waiting, to be dispatched again (at-least-once; the worker's
second report of the same attempt changes nothing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from enginedge.application.context import Context
from enginedge.application.events import status_event
from enginedge.application.outbox import message_headers
from enginedge.application.ports import BusMessage
from enginedge.domain.messages import DispatchMessage
from enginedge.domain.model import Request, RequestStatus, Worker, WorkerStatus
from enginedge.domain.scheduling import Waiting, WorkerSlots, plan

log = logging.getLogger(__name__)

# The most requests of one tenant, band and worker type read per pass: enough to fill every
# free slot of a small fleet; a bigger fleet takes another pass at once.
HEADS_PER_TENANT = 256


@dataclass(frozen=True, slots=True)
class PassReport:
    dispatched: int
    # Free slots were left while more waited than this pass read: run another at once.
    more: bool


def schedulable(worker: Worker, ctx: Context, now: datetime) -> bool:
    """A worker the scheduler may hand work to: healthy, and reachable by an inbox."""
    return (
        worker.inbox is not None
        and worker.effective_status(now, ctx.policy.heartbeat_ttl) is WorkerStatus.HEALTHY
    )


async def schedule(ctx: Context) -> PassReport:
    """One scheduling pass; how many requests it dispatched."""
    now = ctx.clock.now()
    fleet = {w.id: w for w in await ctx.registry.all() if schedulable(w, ctx, now)}
    # Half the passes (a slot freed, nothing waiting) find nothing to do: found out in one
    # read, not by taking the lock. A request committed after this read wakes a pass.
    if not fleet or not await ctx.store.any_waiting(now):
        return PassReport(0, False)
    async with ctx.store.transaction(durable=False) as tx:
        await tx.lock_scheduling()
        # Read again once the lock is held: the wait for another replica's pass may have
        # been long, and what follows (due retries, aging, the dispatch time that the
        # sweeper measures a worker's silence from) must not be judged by an old time.
        now = ctx.clock.now()
        running = await tx.running_counts()
        slots = [
            WorkerSlots(
                id=w.id,
                type=w.type,
                capabilities=frozenset(w.capabilities),
                free=w.capacity - running.by_worker.get(w.id, 0),
            )
            for w in fleet.values()
        ]
        free_by_type: dict[str, int] = {}
        for slot in slots:
            if slot.free > 0:
                free_by_type[slot.type] = free_by_type.get(slot.type, 0) + slot.free
        if not free_by_type:
            return PassReport(0, False)
        per_tenant = min(max(free_by_type.values()), HEADS_PER_TENANT)
        heads = await tx.queue_heads(sorted(free_by_type), per_tenant, now)
        assignments = plan(
            heads, slots, running.by_tenant, ctx.policy.scheduling, now, ctx.tenant_turns
        )
        if not assignments:
            return PassReport(0, False)
        requests = {
            r.id: r
            for r in await tx.lock_requests([a.request_id for a in assignments])
            if r.status is RequestStatus.PENDING
        }
        chosen = [(a, requests[a.request_id]) for a in assignments if a.request_id in requests]
        await ctx.bus.publish([_dispatch(r, fleet[a.worker_id]) for a, r in chosen])
        await tx.mark_dispatched([(r.id, r.attempts, a.worker_id) for a, r in chosen], now)
        dispatched = []
        for assignment, request in chosen:  # locked: the store moved exactly these
            request.mark_dispatched(now, assignment.worker_id)
            dispatched.append(request)
        # Told before the commit, while the rows are locked: a worker's report moves the
        # request on only after this commit, so its events come after these.
        await ctx.events.append_all([status_event(r) for r in dispatched])
    for request in dispatched:
        observe_dispatch(ctx, request, now)
    exhausted = _read_all_of_a_tenant(heads, per_tenant)
    return PassReport(len(dispatched), exhausted and len(dispatched) < sum(free_by_type.values()))


def _read_all_of_a_tenant(heads: list[Waiting], per_tenant: int) -> bool:
    """Whether some tenant's band may hold more than the pass read."""
    counts: dict[tuple[str, int, str], int] = {}
    for head in heads:
        key = (head.worker_type, head.priority, head.tenant)
        counts[key] = counts.get(key, 0) + 1
    return any(n >= per_tenant for n in counts.values())


def _dispatch(request: Request, worker: Worker) -> BusMessage:
    assert worker.inbox is not None  # schedulable() saw to it
    message = DispatchMessage(
        request_id=request.id,
        attempt=request.attempts,
        task_type=request.task_type,
        payload=request.payload,
        metadata=request.metadata,
        deadline=request.deadline,
    )
    return BusMessage(
        topic=worker.inbox,
        key=str(request.id),
        value=message.to_json(),
        headers=message_headers(request),
    )


def observe_dispatch(ctx: Context, request: Request, now: datetime) -> None:
    """Observe how long a request waited in the queue for its first dispatch (a retry is
    not a new wait)."""
    if request.attempts == 1:
        waited = (now - request.created_at).total_seconds()
        ctx.metrics.dispatched(request.worker_type, waited)


async def slots_in_use(ctx: Context) -> dict[str, int]:
    """Each worker's slots taken by the requests the scheduler handed it (the orchestrator's
    own count, which its scheduling goes by; a worker's heartbeat tells its own)."""
    async with ctx.store.transaction() as tx:
        return (await tx.running_counts()).by_worker


async def queue_position(ctx: Context, request: Request) -> int | None:
    """Where a waiting request stands in its worker type's queue (1: next by priority and
    age; fair shares may take it sooner); None once it is not waiting."""
    if request.status is not RequestStatus.PENDING:
        return None
    return await ctx.store.queue_position(request)
