"""The SQL store: one adapter for SQLite (embedded) and PostgreSQL (distributed).

SQLAlchemy Core rather than the ORM: the use cases own the domain objects, this module only
maps them to rows, and the hot path stays a handful of statements.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    Integer,
    Select,
    String,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.expression import Executable

from enginedge.adapters.store import tables as t
from enginedge.adapters.store.migrate import alembic_version
from enginedge.adapters.telemetry.tracing import Tracing
from enginedge.application.ports import (
    IdempotencyKeyTaken,
    OutboxMessage,
    RequestQuery,
    RunningCounts,
    TenantCounts,
)
from enginedge.domain.errors import ServiceUnavailable
from enginedge.domain.model import (
    TERMINAL_STATUSES,
    Request,
    RequestStatus,
    Result,
    Worker,
    WorkerStatus,
)
from enginedge.domain.scheduling import Waiting

_ACTIVE = [s.value for s in RequestStatus if s not in TERMINAL_STATUSES]
_IN_FLIGHT = [RequestStatus.DISPATCHED.value, RequestStatus.PROCESSING.value]
_REQUEST_COLUMNS = [
    *t.requests.c,
    t.request_results.c.result,
    t.request_results.c.error,
    t.request_results.c.processing_time,
]


@contextmanager
def unavailable_on_error() -> Iterator[None]:
    """Turn a failure to reach the database into the API's SERVICE_UNAVAILABLE."""
    try:
        yield
    except IntegrityError:
        raise
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        raise ServiceUnavailable(f"database unavailable: {type(exc).__name__}") from exc


def _request_select() -> Select[Any]:
    return select(*_REQUEST_COLUMNS).select_from(
        t.requests.outerjoin(t.request_results, t.request_results.c.request_id == t.requests.c.id)
    )


def _to_request(row: Any) -> Request:
    m = row._mapping
    return Request(
        id=m["id"],
        task_type=m["task_type"],
        payload=m["payload"],
        metadata=m["metadata"] or {},
        worker_type=m["worker_type"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        deadline=m["deadline"],
        status=RequestStatus(m["status"]),
        attempts=m["attempts"],
        max_attempts=m["max_attempts"],
        priority=m["priority"],
        correlation_id=m["correlation_id"],
        idempotency_key=m["idempotency_key"],
        caller=m["api_key_hash"],
        traceparent=m["traceparent"],
        worker_id=m["worker_id"],
        dispatched_at=m["dispatched_at"],
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        result=m.get("result"),
        error=m.get("error"),
        processing_time_ms=m.get("processing_time"),
        dispatch_after=m["dispatch_after"],
    )


def _request_values(r: Request) -> dict[str, Any]:
    return {
        "task_type": r.task_type,
        "payload": r.payload,
        "metadata": r.metadata,
        "status": r.status.value,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "worker_type": r.worker_type,
        "worker_id": r.worker_id,
        "attempts": r.attempts,
        "max_attempts": r.max_attempts,
        "priority": r.priority,
        "correlation_id": r.correlation_id,
        "idempotency_key": r.idempotency_key,
        "api_key_hash": r.caller,
        "traceparent": r.traceparent,
        "deadline": r.deadline,
        "dispatched_at": r.dispatched_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "dispatch_after": r.dispatch_after,
    }


def _state_values(r: Request) -> dict[str, Any]:
    """The columns that change after a request is created."""
    return {
        "status": r.status.value,
        "updated_at": r.updated_at,
        "worker_id": r.worker_id,
        "attempts": r.attempts,
        "dispatched_at": r.dispatched_at,
        "started_at": r.started_at,
        "finished_at": r.finished_at,
        "dispatch_after": r.dispatch_after,
    }


_SAVE_STATE = (
    update(t.requests)
    .where(t.requests.c.id == bindparam("request_id"))
    .values(
        {
            name: bindparam(name)
            for name in (
                "status",
                "updated_at",
                "worker_id",
                "attempts",
                "dispatched_at",
                "started_at",
                "finished_at",
                "dispatch_after",
            )
        }
    )
)


# The hot path's statements are built once, with their values bound at execution: building
# one with SQLAlchemy costs 50 to 200 µs of Python, which a lone request paid every time.
_LOCK_REQUESTS = (
    _request_select()
    .where(t.requests.c.id.in_(bindparam("ids", expanding=True)))
    # One order for every replica, so that two batches never wait on each other's rows.
    .order_by(t.requests.c.id)
)
_LOCK_REQUESTS_FOR_UPDATE = _LOCK_REQUESTS.with_for_update(of=t.requests)
# A status read of a request that is still running (finished ones come from the cache).
_GET_REQUEST = _request_select().where(t.requests.c.id == bindparam("request_id"))
_CLAIM_OUTBOX = (
    select(t.outbox)
    .where(t.outbox.c.available_at <= bindparam("now"))
    .order_by(t.outbox.c.id)
    .limit(bindparam("limit", type_=Integer))
)
_CLAIM_OUTBOX_SKIP_LOCKED = _CLAIM_OUTBOX.with_for_update(skip_locked=True)
_DELETE_OUTBOX = delete(t.outbox).where(t.outbox.c.id.in_(bindparam("ids", expanding=True)))
_PENDING = RequestStatus.PENDING.value
_MARK_DISPATCHED = (
    update(t.requests)
    .where(
        t.requests.c.id == bindparam("request_id"),
        t.requests.c.status == _PENDING,
        t.requests.c.attempts == bindparam("attempt"),
    )
    .values(
        status=RequestStatus.DISPATCHED.value,
        worker_id=bindparam("worker_id"),
        dispatched_at=bindparam("now"),
        updated_at=bindparam("now"),
        dispatch_after=None,
    )
)
_TENANT = func.coalesce(t.requests.c.api_key_hash, "")
_RANKED = (
    select(
        t.requests.c.id,
        t.requests.c.worker_type,
        t.requests.c.task_type,
        t.requests.c.priority,
        _TENANT.label("tenant"),
        t.requests.c.created_at,
        func.row_number()
        .over(
            partition_by=(t.requests.c.worker_type, t.requests.c.priority, _TENANT),
            order_by=(t.requests.c.created_at, t.requests.c.id),
        )
        .label("place"),
    )
    .where(
        t.requests.c.status == _PENDING,
        t.requests.c.worker_type.in_(bindparam("worker_types", expanding=True)),
        or_(t.requests.c.dispatch_after.is_(None), t.requests.c.dispatch_after <= bindparam("now")),
    )
    .subquery()
)
_QUEUE_HEADS = select(_RANKED).where(_RANKED.c.place <= bindparam("per_tenant", type_=Integer))
_RUNNING_COUNTS = (
    select(t.requests.c.worker_id, _TENANT, func.count())
    .where(t.requests.c.status.in_(_IN_FLIGHT))
    .group_by(t.requests.c.worker_id, _TENANT)
)
# Any 64-bit number, the same in every replica: the key of the scheduling lock.
SCHEDULING_LOCK = 0x656E67696E656467  # "enginedg"
# Waiting for it is bounded (and so is every row lock the pass then takes): a replica whose
# pass hangs holds the others up for at most this long, then they fail and retry. A pass
# that may lose its commit (see SqlStore.transaction) says so in the same round trip.
_LOCK_TIMEOUT = "set_config('lock_timeout', '20s', true)"
_RELAX_COMMIT = "set_config('synchronous_commit', 'off', true)"
_LOCK = f"pg_advisory_xact_lock({SCHEDULING_LOCK})"
_LOCK_SCHEDULING = text(f"SELECT {_LOCK_TIMEOUT}, {_LOCK}")
_LOCK_SCHEDULING_RELAXED = text(f"SELECT {_LOCK_TIMEOUT}, {_RELAX_COMMIT}, {_LOCK}")
_ANY_WAITING = (
    select(t.requests.c.id)
    .where(
        t.requests.c.status == _PENDING,
        or_(t.requests.c.dispatch_after.is_(None), t.requests.c.dispatch_after <= bindparam("now")),
    )
    .limit(1)
)


_COUNT_WAITING = select(func.count()).where(
    t.requests.c.status == _PENDING, t.requests.c.api_key_hash == bindparam("tenant", type_=String)
)


def _result_values(result: Result) -> dict[str, Any]:
    return {
        "id": result.id,
        "request_id": result.request_id,
        "status": result.status.value,
        "result": result.result,
        "error": result.error,
        "processing_time": result.processing_time_ms,
        "created_at": result.created_at,
        "attempt": result.attempt,
        "worker_id": result.worker_id,
    }


def _to_worker(row: Any) -> Worker:
    m = row._mapping
    return Worker(
        id=str(m["id"]),
        type=m["type"],
        endpoint=m["endpoint"],
        capabilities=list(m["capabilities"] or []),
        capacity=m["capacity"],
        active=m["active"],
        status=WorkerStatus(m["status"]),
        last_heartbeat=m["last_heartbeat"] or m["updated_at"],
        last_health_check=m["last_health_check"],
        first_seen=m["created_at"],
        reason=m["status_reason"],
        inbox=m["inbox"],
    )


class SqlTransaction:
    """A :class:`~enginedge.application.ports.StoreTransaction` on one connection."""

    def __init__(self, conn: AsyncConnection, *, durable: bool = True) -> None:
        self._conn = conn
        self._postgres = conn.dialect.name == "postgresql"
        self._durable = durable
        # This transaction's commit was told already not to wait for the WAL flush.
        self.relaxed = False

    def _locked(self, query: Select[Any], *, skip_locked: bool = False) -> Select[Any]:
        if not self._postgres:  # SQLite runs one writer at a time: no row locks needed
            return query
        return query.with_for_update(of=t.requests, skip_locked=skip_locked)

    async def _requests(
        self, query: Executable, params: dict[str, Any] | None = None
    ) -> list[Request]:
        return [_to_request(row) for row in await self._conn.execute(query, params)]

    async def add_requests(self, requests: Sequence[Request]) -> None:
        if not requests:
            return
        try:
            await self._conn.execute(
                insert(t.requests), [{"id": r.id, **_request_values(r)} for r in requests]
            )
        except IntegrityError as exc:
            keys = [r.idempotency_key for r in requests if r.idempotency_key is not None]
            if keys:  # ids are random UUIDs: the unique (caller, key) is what clashed
                raise IdempotencyKeyTaken(keys[0]) from exc
            raise

    async def find_by_idempotency_key(self, caller: str, key: str) -> Request | None:
        rows = await self._requests(
            _request_select().where(
                t.requests.c.api_key_hash == caller, t.requests.c.idempotency_key == key
            )
        )
        return rows[0] if rows else None

    async def lock_request(self, request_id: uuid.UUID) -> Request | None:
        rows = await self._requests(
            self._locked(_request_select().where(t.requests.c.id == request_id))
        )
        return rows[0] if rows else None

    async def lock_requests(self, request_ids: Sequence[uuid.UUID]) -> list[Request]:
        if not request_ids:
            return []
        query = _LOCK_REQUESTS_FOR_UPDATE if self._postgres else _LOCK_REQUESTS
        return await self._requests(query, {"ids": sorted(set(request_ids))})

    async def save_requests(self, requests: Sequence[Request]) -> None:
        if requests:
            await self._conn.execute(
                _SAVE_STATE, [{"request_id": r.id, **_state_values(r)} for r in requests]
            )

    async def add_results(self, results: Sequence[Result]) -> None:
        if results:
            await self._conn.execute(
                insert(t.request_results), [_result_values(r) for r in results]
            )

    async def enqueue(self, messages: Sequence[OutboxMessage]) -> None:
        now = datetime.now(UTC)
        await self._conn.execute(
            insert(t.outbox),
            [
                {
                    "topic": m.topic,
                    "key": m.key,
                    "value": m.value.decode(),
                    "headers": m.headers,
                    "available_at": m.available_at or now,
                }
                for m in messages
            ],
        )

    async def claim_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        query = _CLAIM_OUTBOX_SKIP_LOCKED if self._postgres else _CLAIM_OUTBOX
        return [
            OutboxMessage(
                id=row.id,
                topic=row.topic,
                key=row.key,
                value=row.value.encode(),
                headers=dict(row.headers),
                available_at=row.available_at,
            )
            for row in await self._conn.execute(query, {"now": now, "limit": limit})
        ]

    async def delete_outbox(self, ids: Sequence[int]) -> None:
        if ids:
            await self._conn.execute(_DELETE_OUTBOX, {"ids": list(ids)})

    async def lock_scheduling(self) -> None:
        # SQLite: the store's one writing connection already runs one transaction at a time.
        if self._postgres:
            relax = not self._durable and not self.relaxed
            await self._conn.execute(_LOCK_SCHEDULING_RELAXED if relax else _LOCK_SCHEDULING)
            self.relaxed = self.relaxed or relax

    async def running_counts(self) -> RunningCounts:
        by_worker: dict[str, int] = {}
        by_tenant: dict[str, int] = {}
        for worker_id, tenant, count in await self._conn.execute(_RUNNING_COUNTS):
            if worker_id is not None:
                by_worker[worker_id] = by_worker.get(worker_id, 0) + count
            by_tenant[tenant] = by_tenant.get(tenant, 0) + count
        return RunningCounts(by_worker, by_tenant)

    async def queue_heads(
        self, worker_types: Sequence[str], per_tenant: int, now: datetime
    ) -> list[Waiting]:
        if not worker_types or per_tenant <= 0:
            return []
        rows = await self._conn.execute(
            _QUEUE_HEADS,
            {"worker_types": list(worker_types), "now": now, "per_tenant": per_tenant},
        )
        return [
            Waiting(
                id=row.id,
                worker_type=row.worker_type,
                task_type=row.task_type,
                priority=row.priority,
                tenant=row.tenant,
                queued_at=row.created_at,
            )
            for row in rows
        ]

    async def mark_dispatched(
        self, assignments: Sequence[tuple[uuid.UUID, int, str]], now: datetime
    ) -> None:
        if assignments:
            await self._conn.execute(
                _MARK_DISPATCHED,
                [
                    {"request_id": rid, "attempt": attempt, "worker_id": worker, "now": now}
                    for rid, attempt, worker in assignments
                ],
            )

    async def lock_overdue(self, now: datetime, limit: int) -> list[Request]:
        return await self._requests(
            self._locked(
                _request_select()
                .where(t.requests.c.status.in_(_ACTIVE), t.requests.c.deadline < now)
                .order_by(t.requests.c.deadline)
                .limit(limit),
                skip_locked=True,
            )
        )

    async def lock_in_flight(
        self,
        worker_ids: Sequence[str] | None = None,
        limit: int = 1000,
        started_before: datetime | None = None,
    ) -> list[Request]:
        query = _request_select().where(t.requests.c.status.in_(_IN_FLIGHT)).limit(limit)
        if worker_ids is not None:
            query = query.where(t.requests.c.worker_id.in_(list(worker_ids)))
        if started_before is not None:
            since = func.coalesce(t.requests.c.started_at, t.requests.c.dispatched_at)
            query = query.where(since < started_before)
        return await self._requests(self._locked(query, skip_locked=True))

    async def save_worker(self, worker: Worker) -> None:
        values = {
            "id": uuid.UUID(worker.id),
            "type": worker.type,
            "endpoint": worker.endpoint,
            # A failed active health check shows in the table as the worker being unhealthy.
            "status": WorkerStatus.UNHEALTHY.value if worker.check_error else worker.status.value,
            "capabilities": worker.capabilities,
            "last_health_check": worker.last_health_check,
            "capacity": worker.capacity,
            "active": worker.active,
            "last_heartbeat": worker.last_heartbeat,
            "status_reason": worker.check_error or worker.reason,
            "inbox": worker.inbox,
            "updated_at": worker.last_heartbeat,
        }
        dialect = postgresql if self._postgres else sqlite
        stmt = dialect.insert(t.workers).values(created_at=worker.first_seen, **values)
        await self._conn.execute(
            stmt.on_conflict_do_update(
                index_elements=[t.workers.c.id],
                set_={k: v for k, v in values.items() if k != "id"},
            )
        )


class SqlStore:
    """A :class:`~enginedge.application.ports.RequestStore` over an async engine."""

    def __init__(
        self, engine: AsyncEngine, head_revision: str, tracing: Tracing | None = None
    ) -> None:
        self.engine = engine
        self._head = head_revision
        self._tracing = tracing or Tracing()

    @asynccontextmanager
    async def transaction(self, *, durable: bool = True) -> AsyncIterator[SqlTransaction]:
        with (
            self._tracing.span(
                "db.transaction", attributes={"db.system": self.engine.dialect.name}
            ),
            unavailable_on_error(),
        ):
            async with self.engine.begin() as conn:
                tx = SqlTransaction(conn, durable=durable)
                yield tx
                if not durable and not tx.relaxed and conn.dialect.name == "postgresql":
                    # The commit returns without waiting for its WAL flush (the next durable
                    # commit flushes it). Set at the end, where only the commit needs it: the
                    # relay's first statements are on the way of every dispatch. SQLite has
                    # no per-transaction setting: it stays durable.
                    await conn.exec_driver_sql("SET LOCAL synchronous_commit TO OFF")

    async def _fetch(self, query: Executable, params: dict[str, Any] | None = None) -> list[Any]:
        with unavailable_on_error():
            async with self.engine.connect() as conn:
                return list(await conn.execute(query, params))

    async def get_request(self, request_id: uuid.UUID) -> Request | None:
        rows = await self._fetch(_GET_REQUEST, {"request_id": request_id})
        return _to_request(rows[0]) if rows else None

    async def list_requests(self, query: RequestQuery) -> list[Request]:
        q = _request_select()
        if query.statuses:
            q = q.where(t.requests.c.status.in_([s.value for s in query.statuses]))
        if query.task_type:
            q = q.where(t.requests.c.task_type == query.task_type)
        if query.created_after:
            q = q.where(t.requests.c.created_at >= query.created_after)
        if query.created_before:
            q = q.where(t.requests.c.created_at < query.created_before)
        if query.caller:
            q = q.where(t.requests.c.api_key_hash == query.caller)
        if query.cursor:
            created, ident = query.cursor
            q = q.where(
                or_(
                    t.requests.c.created_at < created,
                    (t.requests.c.created_at == created) & (t.requests.c.id < ident),
                )
            )
        q = q.order_by(t.requests.c.created_at.desc(), t.requests.c.id.desc()).limit(query.limit)
        return [_to_request(row) for row in await self._fetch(q)]

    async def list_workers(self) -> list[Worker]:
        return [_to_worker(row) for row in await self._fetch(select(t.workers))]

    async def outbox_backlog(self) -> int:
        rows = await self._fetch(select(func.count()).select_from(t.outbox))
        return int(rows[0][0])

    async def queue_depth(self) -> dict[tuple[str, int], int]:
        rows = await self._fetch(
            select(t.requests.c.worker_type, t.requests.c.priority, func.count())
            .where(t.requests.c.status == _PENDING)
            .group_by(t.requests.c.worker_type, t.requests.c.priority)
        )
        return {(row[0], int(row[1])): int(row[2]) for row in rows}

    async def tenant_counts(self) -> dict[str, TenantCounts]:
        rows = await self._fetch(
            select(_TENANT, t.requests.c.status, func.count())
            .where(t.requests.c.status.in_(_ACTIVE))
            .group_by(_TENANT, t.requests.c.status)
        )
        counts: dict[str, TenantCounts] = {}
        for tenant, status, count in rows:
            old = counts.get(tenant, TenantCounts())
            counts[tenant] = (
                TenantCounts(old.waiting + count, old.running)
                if status == _PENDING
                else TenantCounts(old.waiting, old.running + count)
            )
        return counts

    async def any_waiting(self, now: datetime) -> bool:
        return bool(await self._fetch(_ANY_WAITING, {"now": now}))

    async def count_waiting(self, tenant: str) -> int:
        rows = await self._fetch(_COUNT_WAITING, {"tenant": tenant})
        return int(rows[0][0])

    async def queue_position(self, request: Request) -> int | None:
        if request.status is not RequestStatus.PENDING:
            return None
        c = t.requests.c
        rows = await self._fetch(
            select(func.count()).where(
                c.status == _PENDING,
                c.worker_type == request.worker_type,
                or_(
                    c.priority > request.priority,
                    (c.priority == request.priority) & (c.created_at < request.created_at),
                ),
            )
        )
        return int(rows[0][0]) + 1

    async def ping(self) -> None:
        rows = await self._fetch(select(alembic_version.c.version_num))
        current = rows[0][0] if rows else None
        if current != self._head:
            raise ServiceUnavailable(
                f"database schema is at {current or 'nothing'}, expected {self._head}: "
                "run `enginedge migrate`"
            )
