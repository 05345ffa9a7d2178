"""Fixtures of the fault suite: each scenario gets its own PostgreSQL, broker and Redis, all
child processes that the scenario may stop, kill and start again."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.support import FaultCluster
from tests.support.servers import kafka_broker, postgres_server, redis_server


@pytest.fixture
def fault_cluster(tmp_path: Path) -> Iterator[FaultCluster]:
    if any(os.environ.get(v) for v in ("TEST_KAFKA_BROKERS", "TEST_REDIS_URL")):
        pytest.skip("the fault suite stops and restarts its servers, so it needs its own")
    with postgres_server() as pg, kafka_broker() as broker, redis_server() as redis:
        cluster = FaultCluster(tmp_path, pg.url, broker, redis)
        cluster.postgres = pg  # type: ignore[attr-defined]
        try:
            yield cluster
        finally:
            cluster.stop_all()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client
