"""A request store in memory: the fast stand-in for the SQL store behind the same port.

What the use-case tests run against, in milliseconds and with a fake clock: every rule that
lives in the application and the domain (scheduling order, fair shares, slots, retries,
timeouts) is shown without a database. The store port's contract suite
(``tests/contracts``) runs the same tests against this and the SQL store, so both keep
meaning the same thing.

Transactions run one at a time and see their own writes; what they wrote is kept only when
they end without an exception, as a database's would be.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime

from enginedge.application.ports import (
    IdempotencyKeyTaken,
    OutboxMessage,
    RequestQuery,
    RunningCounts,
    TenantCounts,
)
from enginedge.domain.model import Request, RequestStatus, Result, Worker
from enginedge.domain.scheduling import Waiting

_IN_FLIGHT = (RequestStatus.DISPATCHED, RequestStatus.PROCESSING)


@dataclass
class _State:
    requests: dict[uuid.UUID, Request] = field(default_factory=dict)
    results: dict[uuid.UUID, Result] = field(default_factory=dict)
    outbox: dict[int, OutboxMessage] = field(default_factory=dict)
    workers: dict[str, Worker] = field(default_factory=dict)


class MemoryTransaction:
    """A :class:`~enginedge.application.ports.StoreTransaction` on a private copy."""

    def __init__(self, state: _State, ids: itertools.count[int]) -> None:
        self.state = state
        self._ids = ids

    def _copy(self, request: Request) -> Request:
        return copy.copy(request)

    async def add_requests(self, requests: Sequence[Request]) -> None:
        for request in requests:
            if request.id in self.state.requests:
                raise ValueError(f"request {request.id} exists")
            if request.idempotency_key is not None and any(
                r.caller == request.caller and r.idempotency_key == request.idempotency_key
                for r in self.state.requests.values()
            ):
                raise IdempotencyKeyTaken(request.idempotency_key)
            self.state.requests[request.id] = self._copy(request)

    async def find_by_idempotency_key(self, caller: str, key: str) -> Request | None:
        for request in self.state.requests.values():
            if request.caller == caller and request.idempotency_key == key:
                return self._copy(request)
        return None

    async def lock_request(self, request_id: uuid.UUID) -> Request | None:
        found = self.state.requests.get(request_id)
        return self._copy(found) if found is not None else None

    async def lock_requests(self, request_ids: Sequence[uuid.UUID]) -> list[Request]:
        return [
            self._copy(self.state.requests[rid])
            for rid in sorted(set(request_ids))
            if rid in self.state.requests
        ]

    async def save_requests(self, requests: Sequence[Request]) -> None:
        for request in requests:
            self.state.requests[request.id] = self._copy(request)

    async def add_results(self, results: Sequence[Result]) -> None:
        for result in results:
            if result.request_id in self.state.results:
                raise ValueError(f"request {result.request_id} has a result")
            self.state.results[result.request_id] = result

    async def enqueue(self, messages: Sequence[OutboxMessage]) -> None:
        for message in messages:
            kept = copy.copy(message)
            kept.id = next(self._ids)
            self.state.outbox[kept.id] = kept

    async def claim_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        due = [
            m for m in self.state.outbox.values() if m.available_at is None or m.available_at <= now
        ]
        return [copy.copy(m) for m in sorted(due, key=lambda m: m.id or 0)[:limit]]

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        for message_id in ids:
            self.state.outbox.pop(message_id, None)

    async def lock_scheduling(self) -> None:
        """Transactions already run one at a time."""

    async def running_counts(self) -> RunningCounts:
        by_worker: dict[str, int] = {}
        by_tenant: dict[str, int] = {}
        for request in self.state.requests.values():
            if request.status in _IN_FLIGHT:
                if request.worker_id is not None:
                    by_worker[request.worker_id] = by_worker.get(request.worker_id, 0) + 1
                tenant = request.caller or ""
                by_tenant[tenant] = by_tenant.get(tenant, 0) + 1
        return RunningCounts(by_worker, by_tenant)

    async def queue_heads(
        self, worker_types: Sequence[str], per_tenant: int, now: datetime
    ) -> list[Waiting]:
        taken: dict[tuple[str, int, str], int] = {}
        heads = []
        waiting = sorted(
            (
                r
                for r in self.state.requests.values()
                if r.status is RequestStatus.PENDING
                and r.worker_type in worker_types
                and (r.dispatch_after is None or r.dispatch_after <= now)
            ),
            key=lambda r: (r.created_at, r.id),
        )
        for request in waiting:
            key = (request.worker_type, request.priority, request.caller or "")
            if taken.get(key, 0) >= per_tenant:
                continue
            taken[key] = taken.get(key, 0) + 1
            heads.append(
                Waiting(
                    id=request.id,
                    worker_type=request.worker_type,
                    task_type=request.task_type,
                    priority=request.priority,
                    tenant=request.caller or "",
                    queued_at=request.created_at,
                )
            )
        return heads

    async def mark_dispatched(
        self, assignments: Sequence[tuple[uuid.UUID, int, str]], now: datetime
    ) -> None:
        for request_id, attempt, worker_id in assignments:
            request = self.state.requests.get(request_id)
            if (
                request is not None
                and request.status is RequestStatus.PENDING
                and request.attempts == attempt
            ):
                request.mark_dispatched(now, worker_id)

    async def lock_overdue(self, now: datetime, limit: int) -> list[Request]:
        overdue = sorted(
            (r for r in self.state.requests.values() if not r.terminal and r.deadline < now),
            key=lambda r: r.deadline,
        )
        return [self._copy(r) for r in overdue[:limit]]

    async def lock_in_flight(
        self,
        worker_ids: Sequence[str] | None = None,
        limit: int = 1000,
        started_before: datetime | None = None,
    ) -> list[Request]:
        found = []
        for request in self.state.requests.values():
            if request.status not in _IN_FLIGHT:
                continue
            if worker_ids is not None and request.worker_id not in worker_ids:
                continue
            since = request.started_at or request.dispatched_at
            if started_before is not None and (since is None or since >= started_before):
                continue
            found.append(self._copy(request))
        return found[:limit]

    async def save_worker(self, worker: Worker) -> None:
        self.state.workers[worker.id] = copy.copy(worker)


class MemoryStore:
    """A :class:`~enginedge.application.ports.RequestStore` (and reader) in memory."""

    def __init__(self) -> None:
        self._state = _State()
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    @asynccontextmanager
    async def transaction(self, *, durable: bool = True) -> AsyncIterator[MemoryTransaction]:
        async with self._lock:
            working = _State(
                requests={k: copy.copy(v) for k, v in self._state.requests.items()},
                results=dict(self._state.results),
                outbox=dict(self._state.outbox),
                workers=dict(self._state.workers),
            )
            yield MemoryTransaction(working, self._ids)
            self._state = working  # only reached when the block raised nothing

    def _view(self, request: Request) -> Request:
        shown = copy.copy(request)
        result = self._state.results.get(request.id)
        if result is not None:
            shown.result = result.result
            shown.error = result.error
            shown.processing_time_ms = result.processing_time_ms
        return shown

    async def get_request(self, request_id: uuid.UUID) -> Request | None:
        found = self._state.requests.get(request_id)
        return self._view(found) if found is not None else None

    async def list_requests(self, query: RequestQuery) -> list[Request]:
        rows = []
        for r in self._state.requests.values():
            if query.statuses and r.status not in query.statuses:
                continue
            if query.task_type and r.task_type != query.task_type:
                continue
            if query.created_after and r.created_at < query.created_after:
                continue
            if query.created_before and r.created_at >= query.created_before:
                continue
            if query.caller and r.caller != query.caller:
                continue
            if query.cursor and (r.created_at, r.id) >= query.cursor:
                continue
            rows.append(r)
        rows.sort(key=lambda r: (r.created_at, r.id), reverse=True)
        return [self._view(r) for r in rows[: query.limit]]

    async def list_workers(self) -> list[Worker]:
        return [copy.copy(w) for w in self._state.workers.values()]

    async def outbox_backlog(self) -> int:
        return len(self._state.outbox)

    async def queue_depth(self) -> dict[tuple[str, int], int]:
        depth: dict[tuple[str, int], int] = {}
        for r in self._state.requests.values():
            if r.status is RequestStatus.PENDING:
                depth[(r.worker_type, r.priority)] = depth.get((r.worker_type, r.priority), 0) + 1
        return depth

    async def tenant_counts(self) -> dict[str, TenantCounts]:
        counts: dict[str, TenantCounts] = {}
        for r in self._state.requests.values():
            if r.terminal:
                continue
            old = counts.get(r.caller or "", TenantCounts())
            waiting = r.status is RequestStatus.PENDING
            counts[r.caller or ""] = TenantCounts(
                old.waiting + waiting, old.running + (not waiting)
            )
        return counts

    async def any_waiting(self, now: datetime) -> bool:
        return any(
            r.status is RequestStatus.PENDING
            and (r.dispatch_after is None or r.dispatch_after <= now)
            for r in self._state.requests.values()
        )

    async def count_waiting(self, tenant: str) -> int:
        return sum(
            1
            for r in self._state.requests.values()
            if r.status is RequestStatus.PENDING and r.caller == tenant
        )

    async def queue_position(self, request: Request) -> int | None:
        if request.status is not RequestStatus.PENDING:
            return None
        ahead = sum(
            1
            for r in self._state.requests.values()
            if r.status is RequestStatus.PENDING
            and r.worker_type == request.worker_type
            and (
                r.priority > request.priority
                or (r.priority == request.priority and r.created_at < request.created_at)
            )
        )
        return ahead + 1

    async def ping(self) -> None:
        """Always reachable: it lives in this process."""
