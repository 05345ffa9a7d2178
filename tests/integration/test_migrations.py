"""Migrations build the guide's schema on SQLite and PostgreSQL, and /ready knows if not."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from enginedge.adapters.store.engine import PoolSettings, create_engine
from enginedge.adapters.store.migrate import upgrade
from enginedge.adapters.store.tables import Json, UTCDateTime
from tests.support.harness import fast_settings, run_service

GUIDE_COLUMNS = {
    "requests": {"id", "task_type", "payload", "metadata", "status", "created_at", "updated_at"},
    "request_results": {
        "id",
        "request_id",
        "status",
        "result",
        "error",
        "processing_time",
        "created_at",
    },
    "workers": {
        "id",
        "type",
        "endpoint",
        "status",
        "capabilities",
        "last_health_check",
        "created_at",
        "updated_at",
    },
}


def _describe(conn: Connection) -> dict[str, dict[str, str]]:
    inspector = inspect(conn)
    return {
        table: {c["name"]: str(c["type"]) for c in inspector.get_columns(table)}
        for table in inspector.get_table_names()
    }


async def test_migrations_create_the_guides_tables(database_url: str) -> None:
    engine = create_engine(database_url, PoolSettings())
    try:
        await upgrade(engine)
        await upgrade(engine)  # applying again is a no-op
        async with engine.connect() as conn:
            tables = await conn.run_sync(_describe)
    finally:
        await engine.dispose()
    assert {"requests", "request_results", "workers", "outbox", "alembic_version"} <= set(tables)
    for table, columns in GUIDE_COLUMNS.items():
        assert columns <= set(tables[table]), table
    if database_url.startswith("postgresql"):
        assert tables["requests"]["payload"] == "JSONB"
        assert tables["requests"]["id"] == "UUID"
        assert tables["requests"]["task_type"] == "VARCHAR(50)"
        assert tables["requests"]["created_at"] == "TIMESTAMP"  # WITH TIME ZONE, see below
        assert tables["request_results"]["processing_time"] == "INTEGER"
        assert tables["workers"]["endpoint"] == "VARCHAR(255)"


async def test_timestamps_are_with_time_zone_on_postgres(pg_url: str) -> None:
    import asyncpg

    engine = create_engine(pg_url, PoolSettings())
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()
    conn = await asyncpg.connect(pg_url)
    try:
        kinds = {
            r["column_name"]: r["data_type"]
            for r in await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_name = 'requests'"
            )
        }
    finally:
        await conn.close()
    assert kinds["created_at"] == "timestamp with time zone"
    assert kinds["payload"] == "jsonb"


async def test_ready_is_503_until_migrations_are_applied(database_url: str, tmp_path: Path) -> None:
    settings = fast_settings(tmp_path, database_url, migrate_on_start=False, builtin_workers="none")
    engine = create_engine(database_url, PoolSettings())
    async with run_service(settings) as svc:
        not_ready = await svc.client.get("/ready")
        assert not_ready.status_code == 503
        assert not_ready.json()["components"]["database"]["status"] == "down"
        assert (await svc.client.get("/live")).status_code == 200
        assert (await svc.client.get("/health")).status_code == 503
        try:
            await upgrade(engine)
        finally:
            await engine.dispose()
        ready = await svc.client.get("/ready")
        assert ready.status_code == 200, ready.text


# The tables as revision 0002 left them, as much as the test below writes.
_old_requests = sa.table(
    "requests",
    sa.column("id", sa.Uuid()),
    sa.column("task_type", sa.String()),
    sa.column("payload", Json),
    sa.column("status", sa.String()),
    sa.column("worker_type", sa.String()),
    sa.column("worker_id", sa.String()),
    sa.column("deadline", UTCDateTime),
    sa.column("dispatched_at", UTCDateTime),
)
_old_outbox = sa.table(
    "outbox",
    sa.column("topic", sa.String()),
    sa.column("key", sa.String()),
    sa.column("value", sa.Text()),
    sa.column("headers", Json),
    sa.column("request_id", sa.Uuid()),
    sa.column("attempt", sa.Integer()),
    sa.column("available_at", UTCDateTime),
)


async def test_the_queue_migration_gives_old_dispatches_back_to_the_queue(
    database_url: str,
) -> None:
    """0003: dispatches no longer go through the outbox to a shared topic. What the previous
    version left there, or on that topic unclaimed (DISPATCHED to no worker), waits in the
    queue again; a request a worker holds, and a cancel, are kept."""
    now = datetime.now(UTC)
    unsent, unclaimed, held = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    engine = create_engine(database_url, PoolSettings())
    try:
        await upgrade(engine, "0002")
        async with engine.begin() as conn:
            for rid, status, worker, dispatched in (
                (unsent, "PENDING", None, None),
                (unclaimed, "DISPATCHED", None, now),
                (held, "PROCESSING", str(uuid.uuid4()), now),
            ):
                await conn.execute(
                    _old_requests.insert().values(
                        id=rid,
                        task_type="test.echo",
                        payload={},
                        status=status,
                        worker_type="testing",
                        worker_id=worker,
                        deadline=now + timedelta(minutes=5),
                        dispatched_at=dispatched,
                    )
                )
            for topic, rid, attempt in (
                ("worker.testing.requests", unsent, 1),
                ("worker.control", None, None),
            ):
                await conn.execute(
                    _old_outbox.insert().values(
                        topic=topic,
                        key=str(rid),
                        value="{}",
                        headers={},
                        request_id=rid,
                        attempt=attempt,
                        available_at=now,
                    )
                )
        await upgrade(engine)
        async with engine.connect() as conn:
            tables = await conn.run_sync(_describe)
            requests = sa.table(
                "requests",
                sa.column("id", sa.Uuid()),
                sa.column("status", sa.String()),
                sa.column("dispatched_at", UTCDateTime),
                sa.column("dispatch_after", UTCDateTime),
            )
            rows = await conn.execute(
                sa.select(
                    requests.c.id,
                    requests.c.status,
                    requests.c.dispatched_at,
                    requests.c.dispatch_after,
                )
            )
            after = {
                row.id: (row.status, row.dispatched_at is None, row.dispatch_after) for row in rows
            }
            topics = [row.topic for row in await conn.execute(sa.text("SELECT topic FROM outbox"))]
            indexes = await conn.run_sync(
                lambda sync: {i["name"] for i in inspect(sync).get_indexes("requests")}
            )
    finally:
        await engine.dispose()
    assert after == {
        unsent: ("PENDING", True, None),
        unclaimed: ("PENDING", True, None),  # back in the queue, dispatched again from it
        held: ("PROCESSING", False, None),
    }
    assert topics == ["worker.control"]  # the cancel is still sent; the dispatch is gone
    assert {"request_id", "attempt"}.isdisjoint(tables["outbox"])
    assert "dispatch_after" in tables["requests"]
    assert "inbox" in tables["workers"]
    assert "ix_requests_queue" in indexes
