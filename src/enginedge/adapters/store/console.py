"""The console's reads and its dead-letter table, in the same SQL store as the requests
(SQLite embedded, PostgreSQL distributed), so that every replica serves the same console."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from enginedge.adapters.store import tables as t
from enginedge.adapters.store.sql import unavailable_on_error
from enginedge.application.ports import DeadLetter, RequestTiming
from enginedge.domain.model import TERMINAL_STATUSES, RequestStatus

_TERMINAL = [s.value for s in TERMINAL_STATUSES]
_ACTIVE = [s.value for s in RequestStatus if s not in TERMINAL_STATUSES]
_TIMING_COLUMNS = [
    t.requests.c.worker_type,
    t.requests.c.status,
    t.requests.c.created_at,
    t.requests.c.started_at,
    t.requests.c.finished_at,
]


class SqlConsoleStore:
    """A :class:`~enginedge.application.ports.ConsoleStore` over an async engine."""

    def __init__(self, engine: AsyncEngine, read_engine: AsyncEngine | None = None) -> None:
        self.engine = engine
        # Charts may be a little stale: read them from the replica when there is one.
        self.read_engine = read_engine or engine

    async def _fetch(self, query: Select[Any]) -> list[Any]:
        with unavailable_on_error():
            async with self.read_engine.connect() as conn:
                return list(await conn.execute(query))

    async def request_timings(
        self, since: datetime, limit: int, caller: str | None = None
    ) -> list[RequestTiming]:
        # A terminal request's updated_at is when it finished: both reads use the
        # (status, updated_at) index; one tenant's are filtered from those rows.
        mine = [t.requests.c.api_key_hash == caller] if caller is not None else []
        finished = await self._fetch(
            select(*_TIMING_COLUMNS)
            .where(t.requests.c.status.in_(_TERMINAL), t.requests.c.updated_at >= since, *mine)
            .order_by(t.requests.c.updated_at.desc())
            .limit(limit)
        )
        active = await self._fetch(
            select(*_TIMING_COLUMNS)
            .where(t.requests.c.status.in_(_ACTIVE), *mine)
            .order_by(t.requests.c.updated_at.desc())
            .limit(limit)
        )
        return [
            RequestTiming(
                worker_type=row.worker_type,
                status=RequestStatus(row.status),
                created_at=row.created_at,
                started_at=row.started_at,
                finished_at=row.finished_at,
            )
            for row in [*finished, *active]
        ]

    async def add_dead_letter(self, letter: DeadLetter, keep_after: datetime) -> None:
        with unavailable_on_error():
            async with self.engine.begin() as conn:
                dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
                await conn.execute(
                    dialect.insert(t.dead_letters)
                    .values(
                        id=letter.id,
                        topic=letter.topic,
                        key=letter.key,
                        reason=letter.reason,
                        failed_at=letter.failed_at,
                        message=letter.message,
                        request_id=letter.request_id,
                    )
                    .on_conflict_do_nothing(index_elements=[t.dead_letters.c.id])
                )
                await conn.execute(
                    delete(t.dead_letters).where(t.dead_letters.c.failed_at < keep_after)
                )

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        rows = await self._fetch(
            select(t.dead_letters)
            .order_by(t.dead_letters.c.failed_at.desc(), t.dead_letters.c.id)
            .limit(limit)
        )
        return [
            DeadLetter(
                id=row.id,
                topic=row.topic,
                key=row.key,
                reason=row.reason,
                failed_at=row.failed_at,
                message=dict(row.message or {}),
                request_id=row.request_id,
            )
            for row in rows
        ]
