"""Routing policy: which worker should take a task (SPEC §5)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

from enginedge.domain.errors import NoEligibleWorkers
from enginedge.domain.model import Worker, WorkerStatus


def eligible_workers(
    workers: Iterable[Worker], task_type: str, now: datetime, heartbeat_ttl: timedelta
) -> list[Worker]:
    """Workers that can handle ``task_type`` and are healthy right now."""
    return [
        w
        for w in workers
        if w.can_handle(task_type)
        and w.effective_status(now, heartbeat_ttl) is WorkerStatus.HEALTHY
    ]


def choose_worker(
    workers: Iterable[Worker], task_type: str, now: datetime, heartbeat_ttl: timedelta
) -> Worker:
    """The least loaded healthy worker able to run ``task_type``.

    A full worker stays eligible: the task waits in its queue rather than being refused,
    because "busy" is not "unable". Ties go to the lower id so that the choice is stable.
    """
    candidates = eligible_workers(workers, task_type, now, heartbeat_ttl)
    if not candidates:
        raise NoEligibleWorkers(task_type)
    return min(candidates, key=lambda w: (w.load, w.active, w.id))
