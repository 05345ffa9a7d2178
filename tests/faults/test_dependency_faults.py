"""Backing services stopped and started again with requests in flight: the Kafka-protocol
broker (memory-only: it comes back empty), PostgreSQL, Redis. While one is down the API
answers at once, with 503 ``SERVICE_UNAVAILABLE`` where it needs it and normally where it
does not, never a 500 or a hang; afterwards it recovers by itself and every accepted
request ends COMPLETED, recorded exactly once."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import httpx

from tests.faults.support import (
    FaultCluster,
    Load,
    Prober,
    check,
    first_success,
    in_flight,
    record,
    verdict,
    verdict_figures,
    wait_all_terminal,
    wait_processing,
)
from tests.support.servers import PostgresServer

DOWN_SECONDS = 6.0


async def _outage(
    c: FaultCluster,
    http: httpx.AsyncClient,
    scenario: str,
    fault: str,
    stop: Callable[[], None],
    start: Callable[[], None],
    allowed: frozenset[int],
) -> tuple[Prober, dict[str, object]]:
    url = c.start_replica()
    c.start_fault_worker(capacity=3)
    c.start_fault_worker(capacity=3)
    c.wait_for_workers(url, 2)
    load = Load(url, http)
    done = await load.submit("fast", 0)
    assert done is not None
    await wait_all_terminal(c.database_url, load, timeout=60)
    await load.submit_many(fast=100, slow=4, start=1)
    slow = [rid for rid, (kind, _) in load.accepted.items() if kind == "slow"]
    await wait_processing(url, http, slow)
    caught = await in_flight(c.database_url, load)

    prober = Prober(url, known=done, allowed=allowed)
    prober.start(load)
    await asyncio.to_thread(stop)
    stopped_at = time.monotonic()
    await asyncio.sleep(DOWN_SECONDS)
    during = prober.summary()
    await asyncio.to_thread(start)
    back_at = time.monotonic()
    recovery = await first_success(load, timeout=150)
    await prober.stop()
    await wait_all_terminal(c.database_url, load, timeout=180)
    drained = time.monotonic() - back_at
    v = await verdict(c.database_url, load)
    figures = record(
        scenario,
        fault=fault,
        downSeconds=round(back_at - stopped_at, 1),
        inFlight=caught,
        accepted=len(load.accepted),
        outcome=v.statuses,
        recoverySeconds=round(recovery, 2),
        recoveryMeaning="service back -> a new request accepted and COMPLETED",
        allTerminalSeconds=round(drained, 2),
        apiDuringOutage=during,
        apiUntilRecovered=prober.summary(),
        **verdict_figures(v),
    )
    assert not prober.problems, prober.problems[:5]
    check(v, load)
    return prober, figures


async def test_broker_stopped_and_restarted(
    fault_cluster: FaultCluster, http: httpx.AsyncClient
) -> None:
    c = fault_cluster
    _, figures = await _outage(
        c,
        http,
        "broker-restart",
        "the Kafka-protocol broker killed (SIGKILL) and started again empty",
        lambda: c.broker.stop(signal.SIGKILL),
        c.broker.start,
        frozenset({200, 202, 503}),
    )
    # Submissions need only the store (the outbox): accepted throughout.
    during = figures["apiDuringOutage"]
    assert isinstance(during, dict)
    assert during.get("POST /api/orchestrate 202", 0) > 0, during


async def test_postgres_stopped_and_restarted(
    fault_cluster: FaultCluster, http: httpx.AsyncClient
) -> None:
    c = fault_cluster
    pg: PostgresServer = c.postgres  # type: ignore[attr-defined]
    _, figures = await _outage(
        c,
        http,
        "postgres-restart",
        "PostgreSQL stopped (fast shutdown) and started again",
        pg.stop,
        pg.restart,
        frozenset({200, 202, 503}),
    )
    during = figures["apiDuringOutage"]
    assert isinstance(during, dict)
    assert during.get("POST /api/orchestrate 503", 0) > 0, during  # a clear 503, at once
    assert during.get("GET /api/requests 503", 0) > 0, during


async def test_redis_stopped_and_restarted(
    fault_cluster: FaultCluster, http: httpx.AsyncClient
) -> None:
    c = fault_cluster
    _, figures = await _outage(
        c,
        http,
        "redis-restart",
        "Redis killed (SIGKILL) and started again empty",
        lambda: c.redis.stop(signal.SIGKILL),
        c.redis.start,
        frozenset({200, 202}),  # Redis only degrades: the store stands in
    )
    during = figures["apiDuringOutage"]
    assert isinstance(during, dict)
    assert during.get("POST /api/orchestrate 202", 0) > 0, during
