"""Engine creation: URL translation, pool settings and connection retries (SPEC §7)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PoolSettings:
    """The guide's performance-tuning block, as configurable defaults."""

    size: int = 10
    connect_retries: int = 3
    retry_delay: float = 3.0
    acquire_timeout: float = 60.0
    idle_timeout: float = 300.0
    # The URL points at PgBouncer in transaction pooling mode (DB_PGBOUNCER).
    pgbouncer: bool = False


# ``?pgbouncer=true`` in a database URL means the same as DB_PGBOUNCER=true (the convention
# other PostgreSQL clients use); it is removed before the URL reaches the driver.
PGBOUNCER_QUERY = "pgbouncer"


def behind_pgbouncer(database_url: str) -> bool:
    """Whether ``database_url`` says, with ``?pgbouncer=true``, that it points at PgBouncer."""
    value = make_url(database_url).query.get(PGBOUNCER_QUERY)
    if isinstance(value, tuple):
        value = value[-1]
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


def async_url(database_url: str) -> URL:
    """Map the guide's ``postgresql://`` (or ``sqlite:///``) form onto an async driver."""
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        query = dict(url.query)
        query.pop(PGBOUNCER_QUERY, None)
        sslmode = query.pop("sslmode", None)
        if sslmode is not None:
            query["ssl"] = sslmode
        return url.set(drivername="postgresql+asyncpg", query=query)
    if backend == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    raise ValueError(
        f"unsupported database URL scheme {url.drivername!r}: use postgresql:// or sqlite:///path"
    )


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def _json_text(value: Any) -> str:
    return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()


# The JSON columns (payloads, results, metadata) through orjson rather than the standard
# library: decoding them was 2% of the orchestrator's busy time under load.
JSON_CODEC: dict[str, Any] = {"json_serializer": _json_text, "json_deserializer": orjson.loads}


def create_engine(database_url: str, pool: PoolSettings) -> AsyncEngine:
    url = async_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            # A first start with a new ENGINEDGE_DATA_DIR creates it.
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # One connection: SQLite has one writer at a time, and a single connection keeps
        # transactions serial without "database is locked" retries.
        engine = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_timeout=pool.acquire_timeout, **JSON_CODEC
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs: dict[str, Any] = {
        "pool_size": pool.size,
        "max_overflow": 0,
        "pool_timeout": pool.acquire_timeout,
        # SQLAlchemy has no idle timeout; recycling connections older than it is the nearest.
        "pool_recycle": pool.idle_timeout,
        # No ping before each use (a round trip per transaction): a connection found dead
        # fails its one operation (503 or a retried loop) and SQLAlchemy then discards every
        # connection made before it.
        "pool_pre_ping": False,
        "connect_args": {"timeout": 10, "command_timeout": 30},
        **JSON_CODEC,
    }
    if pool.pgbouncer or behind_pgbouncer(database_url):
        kwargs["connect_args"].update(_PGBOUNCER_CONNECT_ARGS)
        url = url.update_query_dict({"prepared_statement_cache_size": "0"})
    return create_async_engine(url, **kwargs)


# PgBouncer in transaction pooling mode hands each transaction whichever server connection
# is free, so nothing may outlive a transaction on the server. asyncpg's statement cache off
# (and SQLAlchemy's, set in the URL) makes every statement an unnamed one, parsed again with
# each execution, so no named prepared statement is left on a server connection for another
# client to collide with. Everything else the store does already fits that mode: each
# statement runs in an explicit transaction (SQLAlchemy's asyncpg dialect begins one, its
# pre-ping too), the migration lock is pg_advisory_xact_lock, and nothing uses SET (only
# SET LOCAL, which ends with its transaction), LISTEN or session advisory locks.
_PGBOUNCER_CONNECT_ARGS: dict[str, Any] = {"statement_cache_size": 0}


def create_sqlite_reader(database_url: str, pool: PoolSettings, size: int = 4) -> AsyncEngine:
    """Read-only connections to the embedded SQLite file: in WAL mode they read the last
    commit without waiting for the one writer connection (busy with a flush)."""
    url = async_url(database_url)
    engine = create_async_engine(
        url, pool_size=size, max_overflow=0, pool_timeout=pool.acquire_timeout, **JSON_CODEC
    )
    event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    event.listen(engine.sync_engine, "connect", _read_only)
    return engine


def _read_only(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # an accepted request survives a power loss
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


async def connect_with_retries(engine: AsyncEngine, pool: PoolSettings) -> None:
    """Wait for the database at start-up: ``connect_retries`` more tries, ``retry_delay`` apart."""
    for attempt in range(pool.connect_retries + 1):
        try:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
            return
        except Exception as exc:
            if attempt == pool.connect_retries:
                raise
            log.warning(
                "database not reachable, retrying",
                extra={
                    "attempt": attempt + 1,
                    "error": type(exc).__name__,
                    "retryInSeconds": pool.retry_delay,
                },
            )
            await asyncio.sleep(pool.retry_delay)
