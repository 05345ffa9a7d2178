"""Shared fixtures: the real PostgreSQL server and one fresh database per test."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.support.harness import unique
from tests.support.servers import PostgresServer, postgres_server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer | str]:
    """The suite's PostgreSQL: ``TEST_DATABASE_URL`` if set, else a server started here."""
    external = os.environ.get("TEST_DATABASE_URL")
    if external:
        yield external
        return
    with postgres_server() as server:
        yield server


def _admin_url(postgres: PostgresServer | str) -> str:
    return postgres if isinstance(postgres, str) else postgres.url


async def create_database(postgres: PostgresServer | str) -> str:
    """A new empty database on the suite's server; its URL."""
    admin = _admin_url(postgres)
    name = unique("t_")
    conn = await asyncpg.connect(admin)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return admin.rsplit("/", 1)[0] + "/" + name


@pytest.fixture
async def pg_url(postgres: PostgresServer | str) -> AsyncIterator[str]:
    return await create_database(postgres)


@pytest.fixture(params=["sqlite", "postgres"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """Each test using it runs twice: on the embedded SQLite store and on PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'enginedge.db'}"
    else:
        postgres = request.getfixturevalue("postgres")
        yield await create_database(postgres)
