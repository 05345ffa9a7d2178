"""Shared fixtures: the real PostgreSQL server (and a PgBouncer in front of it), one fresh
database per test, and the service's JSON log lines."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from enginedge.adapters.telemetry.logging import configure_logging
from tests.support.harness import unique
from tests.support.servers import (
    PGBOUNCER_MISSING,
    PgBouncer,
    PostgresServer,
    Restartable,
    kafka_broker,
    pgbouncer_binary,
    pgbouncer_server,
    postgres_server,
    redis_server,
)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer | str]:
    """The suite's PostgreSQL: ``TEST_DATABASE_URL`` if set, else a server started here."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    with postgres_server() as server:
        yield server


@pytest.fixture(scope="session")
def pgbouncer(postgres: PostgresServer | str) -> Iterator[PgBouncer]:
    """A PgBouncer in transaction pooling mode in front of the suite's PostgreSQL."""
    if pgbouncer_binary() is None:
        pytest.skip(PGBOUNCER_MISSING)
    url = make_url(_admin_url(postgres))
    with pgbouncer_server(url.host or "127.0.0.1", url.port or 5432) as bouncer:
        yield bouncer


def _admin_url(postgres: PostgresServer | str) -> str:
    return postgres if isinstance(postgres, str) else postgres.url


async def _connect_once_up(url: str, timeout: float = 20.0) -> asyncpg.Connection:
    """A connection, once the server is past its start-up: `pg_ctl -w` returns when the
    server accepts connections, and a loaded machine can still answer "the database
    system is starting up" for a moment after."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await asyncpg.connect(url)
        except asyncpg.exceptions.CannotConnectNowError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def create_database(postgres: PostgresServer | str) -> str:
    """A new empty database on the suite's server; its URL."""
    admin = _admin_url(postgres)
    name = unique("t_")
    conn = await _connect_once_up(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
async def pg_url(postgres: PostgresServer | str) -> AsyncIterator[str]:
    return await create_database(postgres)


@pytest.fixture(params=["sqlite", "postgres", "pgbouncer"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each test using it runs three times: on the embedded SQLite store, on PostgreSQL, and
    on PostgreSQL through PgBouncer in transaction pooling mode (``?pgbouncer=true``)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'enginedge.db'}"
        return
    postgres = request.getfixturevalue("postgres")
    url = await create_database(postgres)
    if request.param == "pgbouncer":
        bouncer: PgBouncer = request.getfixturevalue("pgbouncer")
        yield bouncer.url_for(make_url(url).database or "postgres")
    else:
        yield url


def _server_or_env(
    variable: str, start: Callable[[], AbstractContextManager[Restartable]], url: str
) -> Iterator[str]:
    if os.environ.get(variable):
        yield os.environ[variable]
        return
    with start() as server:
        yield url.format(port=server.port)


@pytest.fixture
def broker() -> Iterator[str]:
    """A fresh Kafka-protocol broker for the test (or TEST_KAFKA_BROKERS), as host:port."""
    yield from _server_or_env("TEST_KAFKA_BROKERS", kafka_broker, "127.0.0.1:{port}")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A fresh Redis for the test (or TEST_REDIS_URL)."""
    yield from _server_or_env("TEST_REDIS_URL", redis_server, "redis://127.0.0.1:{port}/0")


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """What the service logs during the test, as it renders it (JSON lines at info)."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    stream = io.StringIO()
    configure_logging("info", stream)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
