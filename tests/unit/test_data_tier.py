"""Data-tier scaling settings: PgBouncer mode, the read replica and its fallback."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from enginedge.adapters.store.engine import PoolSettings, async_url, behind_pgbouncer, create_engine
from enginedge.adapters.store.replica import ReplicaReader
from enginedge.application.ports import RequestQuery
from enginedge.config import ConfigError, load_settings
from enginedge.domain.errors import ServiceUnavailable
from enginedge.domain.model import Request

PG = "postgresql://u:p@db:5432/app"


def test_pgbouncer_is_selected_by_variable_or_by_the_url() -> None:
    assert load_settings({"DB_PGBOUNCER": "true"}).db_pgbouncer is True
    assert load_settings({}).db_pgbouncer is False
    with pytest.raises(ConfigError, match="DB_PGBOUNCER"):
        load_settings({"DB_PGBOUNCER": "maybe"})
    assert behind_pgbouncer(PG + "?pgbouncer=true")
    assert not behind_pgbouncer(PG)
    assert "pgbouncer" not in async_url(PG + "?pgbouncer=true&sslmode=require").query


@pytest.mark.parametrize(
    ("url", "pool"),
    [(PG + "?pgbouncer=true", PoolSettings()), (PG, PoolSettings(pgbouncer=True))],
)
async def test_behind_pgbouncer_no_statement_is_cached(url: str, pool: PoolSettings) -> None:
    engine = create_engine(url, pool)
    try:
        assert engine.url.query["prepared_statement_cache_size"] == "0"
        assert "pgbouncer" not in engine.url.query
    finally:
        await engine.dispose()


async def test_without_pgbouncer_the_caches_stay_on() -> None:
    engine = create_engine(PG, PoolSettings())
    try:
        assert "prepared_statement_cache_size" not in engine.url.query
    finally:
        await engine.dispose()


def test_read_url_needs_a_postgresql_primary() -> None:
    with pytest.raises(ConfigError, match="DATABASE_READ_URL"):
        load_settings({"DATABASE_READ_URL": PG})
    settings = load_settings({"DATABASE_URL": PG, "DATABASE_READ_URL": PG + "-replica"})
    assert settings.database_read_url == PG + "-replica"


def _request() -> Request:
    now = datetime.now(UTC)
    return Request(
        id=uuid.uuid4(),
        task_type="data.sql",
        payload={},
        metadata={},
        worker_type="data-processing",
        created_at=now,
        updated_at=now,
        deadline=now + timedelta(minutes=5),
    )


class FakeReader:
    def __init__(self, *requests: Request, down: bool = False) -> None:
        self.requests = {r.id: r for r in requests}
        self.down = down
        self.reads = 0

    async def get_request(self, request_id: uuid.UUID) -> Request | None:
        self.reads += 1
        if self.down:
            raise ServiceUnavailable("database unavailable: OSError")
        return self.requests.get(request_id)

    async def list_requests(self, query: RequestQuery) -> list[Request]:
        self.reads += 1
        if self.down:
            raise ServiceUnavailable("database unavailable: OSError")
        return list(self.requests.values())


async def test_replica_answers_and_the_primary_covers_its_misses() -> None:
    old, new = _request(), _request()
    replica, primary = FakeReader(old), FakeReader(old, new)
    reader = ReplicaReader(replica, primary)
    assert await reader.get_request(old.id) is old
    assert primary.reads == 0
    assert await reader.get_request(new.id) is new  # created moments ago: not replicated yet
    assert primary.reads == 1
    assert await reader.list_requests(RequestQuery()) == [old]  # lists may be stale
    assert await reader.get_request(uuid.uuid4()) is None


async def test_an_unreachable_replica_is_skipped() -> None:
    request = _request()
    reader = ReplicaReader(FakeReader(down=True), FakeReader(request))
    assert await reader.get_request(request.id) is request
    assert await reader.list_requests(RequestQuery()) == [request]
