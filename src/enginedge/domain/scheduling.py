"""Scheduling policy: which waiting request goes to which worker slot (SPEC §5).

Pure code: the store hands in the heads of the queue and the slots in use, this module
decides, the use case carries the decision out. The order is

1. the **priority band**: waiting requests of one worker type and one ``metadata.priority``.
   The band whose oldest request has the highest *aged level* goes first, where a request's
   aged level is its priority plus one for every ``aging`` it has waited: a band of low
   priority that waits long enough overtakes a steady stream of high priority, so none is
   starved. Aging lifts whole bands, never one tenant's requests above another's of the same
   priority, so that an old burst keeps no advantage over a tenant that just arrived;
2. within a band, the **tenant** with the fewest requests running (fair shares of the
   fleet's slots), ties to the tenant served least recently (round robin), then to the one
   whose next request has waited longest; a tenant at its running limit sits the pass out;
3. within a tenant and band, **FIFO**.

Each request goes to the capable worker of its type with the most free slots, and never to a
worker without one.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

MIN_PRIORITY = -100
MAX_PRIORITY = 100


@dataclass(frozen=True, slots=True)
class Waiting:
    """A request in the queue, as much of it as the policy looks at."""

    id: uuid.UUID
    worker_type: str
    task_type: str
    priority: int
    tenant: str
    queued_at: datetime


@dataclass(frozen=True, slots=True)
class WorkerSlots:
    """A healthy worker and how many of its slots are free."""

    id: str
    type: str
    capabilities: frozenset[str]
    free: int


@dataclass(frozen=True, slots=True)
class Assignment:
    request_id: uuid.UUID
    worker_id: str


@dataclass(frozen=True, slots=True)
class SchedulingRules:
    """The operator's settings for the order (``None``: no limit)."""

    aging: timedelta = timedelta(seconds=5)
    tenant_max_running: int | None = None


def aged_level(priority: int, queued_at: datetime, now: datetime, aging: timedelta) -> int:
    """``priority`` plus one level per whole ``aging`` waited (no aging when it is zero)."""
    if aging <= timedelta(0):
        return priority
    waited = max((now - queued_at) / aging, 0.0)
    return priority + math.floor(waited)


Band = tuple[str, int]  # (worker type, priority)


def plan(
    waiting: Sequence[Waiting],
    workers: Sequence[WorkerSlots],
    running_by_tenant: Mapping[str, int],
    rules: SchedulingRules,
    now: datetime,
    served: dict[str, int] | None = None,
) -> list[Assignment]:
    """Assign as many of ``waiting`` as free slots allow, in the policy's order.

    ``waiting`` may be any subset of the queue that holds, for each band and tenant, its
    first requests in FIFO order (their order in ``waiting`` does not matter). ``served``
    numbers each tenant's latest turn (higher is more recent); it is updated with this
    pass's turns, for the next pass to carry on the round robin.
    """
    served = served if served is not None else {}
    turn = max(served.values(), default=0)
    free = {w.id: w.free for w in workers if w.free > 0}
    if not free or not waiting:
        return []
    by_type: dict[str, list[WorkerSlots]] = {}
    for worker in workers:
        if worker.id in free:
            by_type.setdefault(worker.type, []).append(worker)
    queues: dict[Band, dict[str, deque[Waiting]]] = {}
    for request in sorted(waiting, key=lambda r: (r.queued_at, r.id)):
        if request.worker_type in by_type:
            band = queues.setdefault((request.worker_type, request.priority), {})
            band.setdefault(request.tenant, deque()).append(request)
    running = dict(running_by_tenant)
    limit = rules.tenant_max_running
    assignments: list[Assignment] = []
    while queues:
        band_key = max(queues, key=lambda b: (_band_level(queues[b], now, rules), b[1], b[0]))
        band = queues[band_key]
        tenant = min(
            band, key=lambda t: (running.get(t, 0), served.get(t, 0), band[t][0].queued_at, t)
        )
        if limit is not None and running.get(tenant, 0) >= limit:
            _drop_tenant(queues, tenant)
            continue
        request = band[tenant][0]
        chosen = _best_worker(by_type.get(request.worker_type, []), free, request.task_type)
        if chosen is None:
            # No free slot can run this task type: nothing of it is placed in this pass.
            _drop_task_type(queues, request.worker_type, request.task_type)
            continue
        band[tenant].popleft()
        if not band[tenant]:
            del band[tenant]
            if not band:
                del queues[band_key]
        free[chosen.id] -= 1
        running[tenant] = running.get(tenant, 0) + 1
        turn += 1
        served[tenant] = turn
        assignments.append(Assignment(request.id, chosen.id))
        if not any(free.values()):
            break
    return assignments


def _band_level(band: Mapping[str, deque[Waiting]], now: datetime, rules: SchedulingRules) -> int:
    oldest = min(queue[0].queued_at for queue in band.values())
    priority = next(iter(band.values()))[0].priority
    return aged_level(priority, oldest, now, rules.aging)


def _best_worker(
    workers: Sequence[WorkerSlots], free: Mapping[str, int], task_type: str
) -> WorkerSlots | None:
    """The capable worker with the most free slots (ties: the lower id, a stable choice)."""
    capable = [w for w in workers if free[w.id] > 0 and task_type in w.capabilities]
    if not capable:
        return None
    return min(capable, key=lambda w: (-free[w.id], w.id))


def _drop_tenant(queues: dict[Band, dict[str, deque[Waiting]]], tenant: str) -> None:
    for band_key in list(queues):
        queues[band_key].pop(tenant, None)
        if not queues[band_key]:
            del queues[band_key]


def _drop_task_type(
    queues: dict[Band, dict[str, deque[Waiting]]], worker_type: str, task_type: str
) -> None:
    for band_key in [b for b in queues if b[0] == worker_type]:
        band = queues[band_key]
        for tenant in list(band):
            kept = deque(r for r in band[tenant] if r.task_type != task_type)
            if kept:
                band[tenant] = kept
            else:
                del band[tenant]
        if not band:
            del queues[band_key]
