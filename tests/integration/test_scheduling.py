"""Scheduling is the orchestrator's (SPEC §5), end to end on each Kafka-protocol broker.

Two orchestrator replicas (`enginedge serve`) and two `enginedge worker --type llm` processes
of capacity 1 share a real PostgreSQL, broker and Redis; the workers' LLM is a fake that takes
about a second per chat completion. Requests wait in the store and are handed to a worker
only when it has a free slot: a burst keeps both workers busy and no more, a high priority
overtakes the queue, a tenant's burst does not queue another tenant behind it, tenants see
only their own requests, and a worker killed mid-burst stalls nobody and loses nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest

from enginedge.entrypoints.processes import stop_process
from tests.conftest import create_database
from tests.integration.test_distributed import KEY as OPS_KEY
from tests.integration.test_distributed import TERMINAL, Cluster
from tests.support.fake_llm import FakeLlm, fake_llm_in_thread
from tests.support.servers import (
    PostgresServer,
    Restartable,
    free_port,
    kafka_broker,
    noida_broker,
    redis_server,
)

KEY_A = "tenant-a-key-0123456789"
KEY_B = "tenant-b-key-0123456789"
A = {"X-API-Key": KEY_A}
B = {"X-API-Key": KEY_B}
# The operator's key (the Cluster helper's own key, which it waits for workers with).
OPS = {"X-API-Key": OPS_KEY}

WORKERS = 2  # each of capacity 1: two slots in all
TASK_SECONDS = 1.0  # what the fake LLM takes per chat completion: 2 tokens, 0.5 s each
HEARTBEAT_TTL = 2.0

BROKERS: dict[str, Callable[[], contextlib.AbstractContextManager[Restartable]]] = {
    "tansu": kafka_broker,
    "noida-db": noida_broker,
}


@dataclass
class LlmCluster(Cluster):
    """The distributed tests' cluster with llm workers of known ids, named tenants and the
    fake LLM."""

    overrides: dict[str, str] = field(default_factory=dict)
    worker_ids: list[str] = field(default_factory=list)
    fake: FakeLlm | None = None
    broker_name: str = "tansu"

    def env(self, **extra: str) -> dict[str, str]:
        env = super().env()
        env.update(self.overrides)
        env.update(extra)
        return env

    def start_llm_worker(self) -> str:
        worker_id = str(uuid.uuid4())
        self.workers.append(
            self._spawn(
                ["worker", "--type", "llm", "--capacity", "1", "--id", worker_id],
                f"worker-{len(self.workers)}",
                WORKER_HEALTH_PORT=str(free_port()),
                WORKER_ADVERTISED_HOST="127.0.0.1",
            )
        )
        self.worker_ids.append(worker_id)
        return worker_id

    @property
    def urls(self) -> list[str]:
        return [url for _, url in self.replicas]


@pytest.fixture(scope="module", params=sorted(BROKERS))
async def llm_cluster(
    request: pytest.FixtureRequest,
    postgres: PostgresServer | str,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[LlmCluster]:
    """A whole deployment on a fresh database, broker and Redis, for every test of the
    module on one broker (the last test kills a worker)."""
    database = await create_database(postgres)
    tmp = tmp_path_factory.mktemp(f"scheduling-{request.param}")
    # Few tokens: each is a partial result the worker publishes before reading on.
    fake = FakeLlm(tokens=["hello ", "world"], delay=TASK_SECONDS / 2)
    with (
        BROKERS[request.param]() as broker,
        redis_server() as redis,
        fake_llm_in_thread(fake),
    ):
        cluster = LlmCluster(tmp, database, broker, redis, fake=fake, broker_name=request.param)
        cluster.overrides.update(
            API_KEYS=f"a:{KEY_A},b:{KEY_B}",
            ADMIN_API_KEYS=f"ops:{OPS_KEY}",
            LLM_BASE_URL=fake.url,
            LLM_MODEL="fake-model",
            WORKER_HEARTBEAT_INTERVAL="0.5",
            WORKER_HEARTBEAT_TTL=str(HEARTBEAT_TTL),
            HEALTH_CHECK_INTERVAL="1",
            WORKER_HEALTH_CHECK_TIMEOUT="5",
        )
        try:
            await asyncio.gather(*(asyncio.to_thread(cluster.start_replica) for _ in range(2)))
            for _ in range(WORKERS):
                cluster.start_llm_worker()
            await asyncio.to_thread(cluster.wait_for_workers, cluster.urls[0], WORKERS)
            await warm_up(cluster)
            yield cluster
        finally:
            await asyncio.to_thread(cluster.stop_all)
            print(f"logs of the {request.param} cluster in {tmp}", file=sys.stderr)


async def warm_up(cluster: LlmCluster) -> None:
    """One chat completion on each worker (two at once go one to each), so that what a
    process does once (connections, topic metadata) is not timed as scheduling."""
    async with httpx.AsyncClient(timeout=30) as http:
        ids = await asyncio.gather(
            *(submit(http, url, A, "warm up") for url in cluster.urls[:WORKERS])
        )
        views = await finished(cluster, http, ids)
    assert {v["status"] for v in views.values()} == {"COMPLETED"}, views


@pytest.fixture(scope="module")
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


def chat(text: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": text}]}


async def submit(
    http: httpx.AsyncClient,
    url: str,
    headers: dict[str, str],
    text: str,
    priority: int | None = None,
) -> str:
    body: dict[str, Any] = {"taskType": "llm.chat", "payload": chat(text)}
    if priority is not None:
        body["metadata"] = {"priority": priority}
    response = await http.post(f"{url}/api/orchestrate", headers=headers, json=body)
    assert response.status_code == 202, response.text
    rid: str = response.json()["requestId"]
    return rid


async def view(http: httpx.AsyncClient, url: str, rid: str, wait: float = 0) -> dict[str, Any]:
    """The request as its operator sees it (``wait``: until it ends, at most that long)."""
    response = await http.get(
        f"{url}/api/requests/{rid}", headers=OPS, params={"wait": wait} if wait else None
    )
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def finished(
    cluster: LlmCluster, http: httpx.AsyncClient, ids: list[str], timeout: float = 60
) -> dict[str, dict[str, Any]]:
    """Every request of ``ids`` once it has ended (long polls, spread over the replicas)."""
    deadline = time.monotonic() + timeout

    async def one(i: int, rid: str) -> dict[str, Any]:
        url = cluster.urls[i % len(cluster.urls)]
        while True:
            left = deadline - time.monotonic()
            found = await view(http, url, rid, wait=max(0.1, min(left, 20)))
            if found["status"] in TERMINAL:
                return found
            if left <= 0:
                raise AssertionError(
                    f"{rid} still {found['status']} after {timeout}s\n{cluster.log_tails()}"
                )

    views = await asyncio.gather(*(one(i, rid) for i, rid in enumerate(ids)))
    return dict(zip(ids, views, strict=True))


async def expect(
    ok: bool, what: str, cluster: LlmCluster, http: httpx.AsyncClient, views: list[dict[str, Any]]
) -> None:
    """Assert ``ok``; if not, say ``what`` with the requests' timeline and the replicas'
    counts of re-dispatches."""
    if not ok:
        raise AssertionError(f"{what}\n{timeline(views)}\n{await diagnosis(cluster, http)}")


# Why a time bound is not held against noida-db on this kind of machine (2 cores).
NOIDA_SPINS = (
    "noida-db answers an empty fetch at once, so every idle Kafka consumer (two or more in "
    "each replica and worker) spins at about 90% of a core: the deployment is CPU-bound and "
    "each scheduling round trip waits for CPU. Time bounds are held on tansu; on noida-db "
    "only the order and the outcomes"
)


async def expect_in_time(
    ok: bool, what: str, cluster: LlmCluster, http: httpx.AsyncClient, views: list[dict[str, Any]]
) -> None:
    """:func:`expect` for a bound on time: an expected failure on noida-db (see
    :data:`NOIDA_SPINS`), a failure on any other broker."""
    if not ok and cluster.broker_name == "noida-db":
        pytest.xfail(f"{what}: {NOIDA_SPINS}")
    await expect(ok, what, cluster, http, views)


def at(value: str | None) -> datetime:
    assert value is not None
    return datetime.fromisoformat(value)


def spread(views: list[dict[str, Any]]) -> float:
    """Seconds from the first request's acceptance to the last one's end."""
    return (
        max(at(v["finishedAt"]) for v in views) - min(at(v["createdAt"]) for v in views)
    ).total_seconds()


def timeline(views: list[dict[str, Any]]) -> str:
    """Each request's steps in seconds from the first acceptance, for assertion messages."""
    zero = min(at(v["createdAt"]) for v in views)

    def offset(value: str | None) -> str:
        return "-" if value is None else f"{(at(value) - zero).total_seconds():6.2f}"

    rows = [
        f"{v['requestId'][:8]} {v['tenant']} p{v['priority']} {v['status']} "
        f"worker {(v['workerId'] or '-')[:8]} attempts {v['attempts']}: created "
        f"{offset(v['createdAt'])} dispatched {offset(v['dispatchedAt'])} started "
        f"{offset(v['startedAt'])} finished {offset(v['finishedAt'])}"
        for v in sorted(views, key=lambda v: v["createdAt"])
    ]
    return "\n".join(rows)


async def diagnosis(cluster: LlmCluster, http: httpx.AsyncClient) -> str:
    """What the replicas counted of re-dispatches and ignored results, and the store's
    requests that took more than one attempt, for assertion messages."""
    lines = []
    for url in cluster.urls:
        with contextlib.suppress(httpx.HTTPError):
            text = (await http.get(f"{url}/metrics")).text
            lines += [
                f"{url} {line}"
                for line in text.splitlines()
                if line.startswith(("enginedge_redispatches_total", "enginedge_results_ignored"))
            ]
    conn = await asyncpg.connect(cluster.database_url)
    try:
        rows = await conn.fetch(
            "SELECT id, status, attempts, worker_id, api_key_hash, created_at, dispatched_at,"
            " started_at, finished_at, dispatch_after FROM requests WHERE attempts > 1"
        )
    finally:
        await conn.close()
    lines += [str(dict(row)) for row in rows]
    return "\n".join(lines)


def service_seconds(views: list[dict[str, Any]]) -> float:
    """The mean time a worker spent on one of ``views`` (the fake LLM's pace, measured)."""
    return statistics.mean(float(v["processingTime"]) / 1000 for v in views)


async def until_running(
    http: httpx.AsyncClient, url: str, ids: list[str], count: int, timeout: float = 15
) -> list[dict[str, Any]]:
    """Poll until ``count`` of ``ids`` are in a worker's hands; their views."""
    deadline = time.monotonic() + timeout
    while True:
        views = await asyncio.gather(*(view(http, url, rid) for rid in ids))
        running = [v for v in views if v["status"] in ("DISPATCHED", "PROCESSING")]
        if len(running) >= count:
            return running
        assert time.monotonic() < deadline, [v["status"] for v in views]
        await asyncio.sleep(0.05)


async def test_a_burst_keeps_both_workers_busy_and_no_more(
    llm_cluster: LlmCluster, http: httpx.AsyncClient
) -> None:
    cluster, fake = llm_cluster, llm_cluster.fake
    assert fake is not None
    fake.max_active = fake.active
    urls = cluster.urls
    started = time.monotonic()
    ids = await asyncio.gather(
        *(submit(http, urls[i % 2], A if i % 2 else B, f"burst {i}") for i in range(16))
    )
    views = list((await finished(cluster, http, ids)).values())
    wall = time.monotonic() - started
    assert [v["status"] for v in views] == ["COMPLETED"] * 16, views
    per_task = service_seconds(views)
    ideal = 16 * per_task / WORKERS
    took = spread(views)
    print(f"burst: {took:.2f}s (wall {wall:.2f}s), ideal {ideal:.2f}s, task {per_task:.2f}s")
    assert per_task >= TASK_SECONDS * 0.95  # the fake LLM's pace, or the bound means nothing
    by_worker = Counter(v["workerId"] for v in views)
    assert set(by_worker) <= set(cluster.worker_ids), by_worker
    assert max(by_worker.values()) <= 9, by_worker
    # Never more chat completions at once than the fleet has slots.
    assert fake.max_active <= WORKERS, fake.max_active
    await expect(all(v["attempts"] == 1 for v in views), "re-run", cluster, http, views)
    await expect_in_time(
        took <= 1.25 * ideal, f"{took:.2f}s > 1.25 * {ideal:.2f}s", cluster, http, views
    )


async def test_a_high_priority_overtakes_the_queue(
    llm_cluster: LlmCluster, http: httpx.AsyncClient
) -> None:
    cluster = llm_cluster
    first, second = cluster.urls
    # The two workers start their first tasks half a second apart, so that their slots
    # never free in the same scheduling pass.
    low = [await submit(http, first, A, "low 0", priority=0)]
    await until_running(http, first, low, 1)
    await asyncio.sleep(0.5)
    low += await asyncio.gather(
        *(submit(http, (first, second)[i % 2], A, f"low {i}", priority=0) for i in range(1, 6))
    )
    await until_running(http, first, low, 2)
    high = await submit(http, second, A, "high", priority=100)
    views = await finished(cluster, http, [*low, high])
    assert {v["status"] for v in views.values()} == {"COMPLETED"}, views
    top = views[high]
    sent = at(top["createdAt"])
    waiting = [views[r] for r in low if at(views[r]["dispatchedAt"]) > sent]
    # Four, unless the machine is so slow that a slot freed while the queue was sent.
    assert len(waiting) >= 2, [(views[r]["dispatchedAt"], top["createdAt"]) for r in low]
    everything = list(views.values())
    for other in waiting:
        await expect(
            at(top["startedAt"]) < at(other["startedAt"]),
            f"{other['requestId']} started before {high}",
            cluster,
            http,
            everything,
        )


async def test_one_tenants_burst_does_not_queue_another_behind_it(
    llm_cluster: LlmCluster, http: httpx.AsyncClient
) -> None:
    cluster = llm_cluster
    urls = cluster.urls
    theirs = await asyncio.gather(*(submit(http, urls[i % 2], A, f"a {i}") for i in range(12)))
    mine = await asyncio.gather(*(submit(http, urls[i % 2], B, f"b {i}") for i in range(2)))
    views = await finished(cluster, http, theirs + mine)
    assert {v["status"] for v in views.values()} == {"COMPLETED"}, views
    a_done = sorted(at(views[r]["finishedAt"]) for r in theirs)
    b_done = max(at(views[r]["finishedAt"]) for r in mine)
    await expect(
        b_done < a_done[5], "B waited behind A's burst", cluster, http, list(views.values())
    )
    assert all(views[r]["tenant"] == "b" for r in mine)
    assert all(views[r]["tenant"] == "a" for r in theirs)


async def test_a_tenant_sees_only_its_own_requests(
    llm_cluster: LlmCluster, http: httpx.AsyncClient
) -> None:
    first, second = llm_cluster.urls
    theirs = await submit(http, first, A, "private")
    mine = await submit(http, second, B, "mine")
    await finished(llm_cluster, http, [theirs, mine])
    for url in (first, second):
        got = await http.get(f"{url}/api/requests/{theirs}", headers=B)
        assert got.status_code == 404, got.text
        assert got.json()["error"]["code"] == "REQUEST_NOT_FOUND"
        cancelled = await http.post(f"{url}/api/requests/{theirs}/cancel", headers=B)
        assert cancelled.status_code == 404, cancelled.text
        assert cancelled.json()["error"]["code"] == "REQUEST_NOT_FOUND"
        async with http.stream(
            "GET", f"{url}/api/requests/{theirs}/events", headers=B, timeout=10
        ) as events:
            assert events.status_code == 404
        listed = await http.get(f"{url}/api/requests", headers=B, params={"limit": 200})
        assert listed.status_code == 200, listed.text
        items = listed.json()["items"]
        assert {i["tenant"] for i in items} == {"b"}, items
        assert mine in {i["requestId"] for i in items}
        assert theirs not in {i["requestId"] for i in items}
    # A's request is untouched, and A still sees it.
    own = await http.get(f"{first}/api/requests/{theirs}", headers=A)
    assert own.status_code == 200
    assert own.json()["status"] == "COMPLETED"


async def test_a_worker_killed_mid_burst_stalls_nobody_and_loses_nothing(
    llm_cluster: LlmCluster, http: httpx.AsyncClient
) -> None:
    cluster = llm_cluster
    urls = cluster.urls
    ids = [await submit(http, urls[i % 2], A, f"before {i}") for i in range(4)]
    running = await until_running(http, urls[0], ids, WORKERS)
    # Wait until the victim has its request in hand (PROCESSING, i.e. started).
    deadline = time.monotonic() + 10
    while True:
        held = [v for v in running if v["status"] == "PROCESSING" and v["workerId"]]
        if held:
            break
        assert time.monotonic() < deadline, running
        await asyncio.sleep(0.05)
        running = await until_running(http, urls[0], ids, WORKERS)
    victim_request = held[0]
    victim = victim_request["workerId"]
    (survivor,) = set(cluster.worker_ids) - {victim}
    process = cluster.workers[cluster.worker_ids.index(victim)]
    killed_at = datetime.now(UTC)
    await asyncio.to_thread(stop_process, process, signal.SIGKILL)

    # Submits go on being accepted, before and after the orchestrators notice.
    codes: list[int] = []
    window = HEARTBEAT_TTL + 1.5
    until = time.monotonic() + window
    i = 0
    while time.monotonic() < until:
        body = {"taskType": "llm.chat", "payload": chat(f"during {i}")}
        response = await http.post(f"{urls[i % 2]}/api/orchestrate", headers=A, json=body)
        codes.append(response.status_code)
        if response.status_code == 202:
            ids.append(response.json()["requestId"])
        i += 1
        await asyncio.sleep(0.5)
    assert codes and set(codes) == {202}, codes

    views = await finished(cluster, http, ids, timeout=90)
    statuses = Counter(v["status"] for v in views.values())
    assert statuses == {"COMPLETED": len(ids)}, (statuses, cluster.log_tails())
    rerun = views[victim_request["requestId"]]
    assert rerun["workerId"] == survivor, rerun
    assert rerun["attempts"] >= 2, rerun
    # After the kill, only the survivor finished anything.
    after = [v for v in views.values() if at(v["finishedAt"]) > killed_at]
    assert {v["workerId"] for v in after} == {survivor}, after
    workers = (await http.get(f"{urls[1]}/api/workers", headers=OPS)).json()["items"]
    status = {w["workerId"]: w["status"] for w in workers}
    assert status.get(survivor) == "HEALTHY", status
    assert status.get(victim) != "HEALTHY", status
    # The survivor kept its pace while the victim was still thought alive (its slot held
    # the victim's request: nothing else was sent there)...
    in_ttl = [v for v in after if (at(v["finishedAt"]) - killed_at).total_seconds() <= window]
    await expect_in_time(
        len(in_ttl) >= 2, "the survivor stalled", cluster, http, list(views.values())
    )
    # ... and worked through the rest as if alone from the start (no stall of seconds, as
    # a consumer group's rebalance would be).
    per_task = service_seconds(after)
    took = (max(at(v["finishedAt"]) for v in after) - killed_at).total_seconds()
    print(f"after the kill: {len(after)} requests in {took:.2f}s, task {per_task:.2f}s")
    await expect_in_time(
        took <= 1.5 * len(after) * per_task,
        f"{len(after)} requests took {took:.2f}s after the kill",
        cluster,
        http,
        list(views.values()),
    )
