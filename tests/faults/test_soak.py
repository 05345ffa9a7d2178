"""Soak: a steady rate of requests through the HTTP API of a distributed cluster (one
orchestrator replica, one worker process, real PostgreSQL, broker and Redis) for
``SOAK_SECONDS`` (60 in CI; `make soak` runs the full 10 minutes), sampling the processes'
memory, descriptors and connections. No error, and no growth beyond the stated bounds."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import asyncpg
import httpx

from tests.faults.support import TERMINAL, FaultCluster, H, Sampler, record

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "60"))
SOAK_RATE = float(os.environ.get("SOAK_RATE", "10"))  # requests per second
# The bounds, measured from the end of the warm-up (the first fifth, at least 10 s) to the
# end, both at rest: resident memory grows by less than 20 % (plus 8 MiB of allocator
# slack for short runs); descriptors other than sockets, connections to PostgreSQL and to
# the broker, and PostgreSQL sessions by at most 5; connections to Redis stay below the
# peak number of callers in flight (+10). (The callers' own connections come and go with
# the long polls in flight: reported, not bounded.)
RSS_GROWTH = 0.20
RSS_SLACK_MB = 8.0
FD_GROWTH = 5


async def _pg_sessions(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND pid <> pg_backend_pid()"
            )
        )
    finally:
        await conn.close()


async def test_soak_steady_rate(fault_cluster: FaultCluster, http: httpx.AsyncClient) -> None:
    cluster = fault_cluster
    # Production-like health timings (the fault scenarios use hair-trigger ones): on a
    # shared 2-core machine a 1 s health-check timeout makes a busy worker look dead.
    cluster.overrides.update(
        WORKER_HEARTBEAT_TTL="20", HEALTH_CHECK_INTERVAL="2", WORKER_HEALTH_CHECK_TIMEOUT="5"
    )
    url = cluster.start_replica()
    worker, _ = cluster.start_fault_worker(capacity=16)
    cluster.wait_for_workers(url, 1)
    replica = cluster.replicas[0][0]

    errors: list[str] = []
    latencies: list[float] = []
    ids: list[str] = []
    inflight: set[asyncio.Task[None]] = set()
    pg_sessions: list[int] = []

    async def one(i: int) -> None:
        started = time.monotonic()
        task: dict[str, Any] = (
            {"taskType": "echo", "payload": {"n": i}}
            if i % 5
            else {
                "taskType": "data.sql",
                "payload": {"sql": "SELECT sum(x) AS s FROM t", "tables": {"t": [{"x": i}]}},
            }
        )
        try:
            response = await http.post(f"{url}/api/orchestrate", headers=H, json=task)
            if response.status_code != 202:
                errors.append(f"submit {response.status_code}: {response.text[:200]}")
                return
            rid = response.json()["requestId"]
            ids.append(rid)
            body: dict[str, Any] = {}
            for _ in range(6):
                body = (
                    await http.get(f"{url}/api/requests/{rid}?wait=30", headers=H, timeout=40)
                ).json()
                if body.get("status") in TERMINAL:
                    break
            if body.get("status") != "COMPLETED":
                errors.append(f"{rid} ended {body.get('status')}: {body.get('error')}")
                return
            latencies.append(time.monotonic() - started)
        except httpx.HTTPError as exc:
            errors.append(f"transport: {exc!r}")

    pg_port = int(cluster.database_url.rsplit(":", 1)[1].split("/")[0])
    sampler = Sampler(
        {"orchestrator": replica.pid, "worker": worker.pid},
        backends={"pg": pg_port, "broker": cluster.broker.port, "redis": cluster.redis.port},
        every=5.0,
    )
    sampler.start()
    began = time.monotonic()
    warmup_end = began + max(10.0, SOAK_SECONDS / 5)
    warm_sample: dict[str, Any] | None = None
    warm_pg = 0
    peak_callers = 0
    i = 0
    next_at = began
    next_pg = began
    while time.monotonic() - began < SOAK_SECONDS:
        now = time.monotonic()
        if warm_sample is None and now >= warmup_end:
            # The baseline, at rest: the arrivals pause once for the callers in flight.
            await asyncio.gather(*inflight)
            await asyncio.sleep(2)
            warm_sample = await asyncio.to_thread(sampler.sample)
            warm_pg = await _pg_sessions(cluster.database_url)
            next_at = now = time.monotonic()
        if now >= next_pg:
            pg_sessions.append(await _pg_sessions(cluster.database_url))
            next_pg = now + 5
        while next_at <= now:  # steady arrivals, whatever the latency
            task = asyncio.ensure_future(one(i))
            inflight.add(task)
            task.add_done_callback(inflight.discard)
            i += 1
            next_at += 1 / SOAK_RATE
        peak_callers = max(peak_callers, len(inflight))
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    held = time.monotonic() - began
    await asyncio.gather(*inflight)
    await asyncio.sleep(2)
    end_sample = await asyncio.to_thread(sampler.sample)  # at rest again
    await sampler.stop()
    pg_sessions.append(await _pg_sessions(cluster.database_url))
    assert warm_sample is not None

    conn = await asyncpg.connect(cluster.database_url)
    try:
        by_status = dict(
            await conn.fetch("SELECT status, count(*) FROM requests GROUP BY status")  # type: ignore[arg-type]
        )
        duplicated = await conn.fetchval(
            "SELECT count(*) FROM (SELECT request_id FROM request_results "
            "GROUP BY request_id HAVING count(*) > 1) d"
        )
    finally:
        await conn.close()

    def series(name: str, key: str) -> list[float]:
        return [s[name][key] for s in sampler.samples]

    figures: dict[str, Any] = {
        "seconds": round(held, 1),
        "rate": SOAK_RATE,
        "requests": i,
        "completed": len(latencies),
        "errors": len(errors),
        "firstErrors": errors[:5],
        "byStatus": by_status,
        "duplicated": duplicated,
        "latencyP50": round(statistics.median(latencies), 4) if latencies else None,
        "latencyP99": round(statistics.quantiles(latencies, n=100)[98], 4)
        if len(latencies) > 100
        else None,
        "pgSessions": {"afterWarmup": warm_pg, "max": max(pg_sessions), "end": pg_sessions[-1]},
        "samples": len(sampler.samples),
        "bounds": {"rssGrowth": RSS_GROWTH, "rssSlackMb": RSS_SLACK_MB, "fdGrowth": FD_GROWTH},
    }
    for name in ("orchestrator", "worker"):
        figures[name] = {
            "rssMbAfterWarmup": round(warm_sample[name]["rss_mb"], 1),
            "rssMbEnd": round(end_sample[name]["rss_mb"], 1),
            "rssMbMax": round(max(series(name, "rss_mb")), 1),
            "fdsAfterWarmup": warm_sample[name]["fds"],
            "fdsEnd": end_sample[name]["fds"],
            "fdsMax": max(series(name, "fds")),
            "otherFdsAfterWarmup": warm_sample[name]["fds"] - warm_sample[name]["tcp"],
            "otherFdsEnd": end_sample[name]["fds"] - end_sample[name]["tcp"],
            "tcpMax": max(series(name, "tcp")),
        }
        for backend in ("pg", "broker", "redis"):
            figures[name][f"{backend}AfterWarmup"] = warm_sample[name][backend]
            figures[name][f"{backend}End"] = end_sample[name][backend]
            figures[name][f"{backend}Max"] = max(series(name, backend))
    figures["peakCallers"] = peak_callers
    record("soak" if SOAK_SECONDS >= 600 else "soak-short", **figures)

    assert not errors, errors[:10]
    assert by_status == {"COMPLETED": i}, by_status
    assert duplicated == 0
    for name in ("orchestrator", "worker"):
        f = figures[name]
        bound = max(f["rssMbAfterWarmup"] * (1 + RSS_GROWTH), f["rssMbAfterWarmup"] + RSS_SLACK_MB)
        assert f["rssMbEnd"] <= bound, (name, f)
        assert f["otherFdsEnd"] <= f["otherFdsAfterWarmup"] + FD_GROWTH, (name, f)
        assert f["pgEnd"] <= f["pgAfterWarmup"] + FD_GROWTH, (name, f)
        assert f["brokerEnd"] <= f["brokerAfterWarmup"] + FD_GROWTH, (name, f)
        # Each long poll holds a Redis connection (XREAD BLOCK) while it waits; the pool
        # keeps them: bounded by the most callers ever in flight, not by the request count.
        assert f["redisEnd"] <= peak_callers + 10, (name, f, peak_callers)
    assert pg_sessions[-1] <= warm_pg + FD_GROWTH, figures["pgSessions"]
