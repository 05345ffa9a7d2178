"""Engine creation: URL translation, pool settings and connection retries (SPEC §7)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def async_url(database_url: str) -> URL:
    """Map the guide's ``postgresql://`` (or ``sqlite:///``) form onto an async driver."""
    url = make_url(database_url)
    backend = url.get_backend_name()
    if backend in ("postgresql", "postgres"):
        query = dict(url.query)
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


def create_engine(database_url: str, pool: PoolSettings) -> AsyncEngine:
    url = async_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            # A first start with a new ENGINEDGE_DATA_DIR creates it.
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        # One connection: SQLite has one writer at a time, and a single connection keeps
        # transactions serial without "database is locked" retries.
        engine = create_async_engine(
            url, pool_size=1, max_overflow=0, pool_timeout=pool.acquire_timeout
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    kwargs: dict[str, Any] = {
        "pool_size": pool.size,
        "max_overflow": 0,
        "pool_timeout": pool.acquire_timeout,
        # SQLAlchemy has no idle timeout; recycling connections older than it is the nearest.
        "pool_recycle": pool.idle_timeout,
        "pool_pre_ping": True,
        "connect_args": {"timeout": 10, "command_timeout": 30},
    }
    return create_async_engine(url, **kwargs)


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
