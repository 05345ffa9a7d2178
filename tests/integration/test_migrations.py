"""Migrations build the guide's schema on SQLite and PostgreSQL, and /ready knows if not."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from enginedge.adapters.store.engine import PoolSettings, create_engine
from enginedge.adapters.store.migrate import upgrade
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
