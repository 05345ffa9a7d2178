"""Distributed mode end to end: orchestrator replicas and worker processes, each started
through the `enginedge` command, sharing a real PostgreSQL, Kafka-protocol broker and Redis."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import KafkaError

from enginedge.entrypoints.processes import stop_process
from tests.support.harness import until
from tests.support.otlp import otlp_receiver
from tests.support.servers import (
    Restartable,
    free_port,
    kafka_broker,
    postgres_server,
    redis_server,
)

KEY = "distributed-key-0123456789"
H = {"X-API-Key": KEY}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}


@dataclass
class Cluster:
    tmp: Path
    database_url: str
    broker: Restartable
    redis: Restartable
    replicas: list[tuple[subprocess.Popen[bytes], str]] = field(default_factory=list)
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def brokers(self) -> str:
        return f"127.0.0.1:{self.broker.port}"

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            DATABASE_URL=self.database_url,
            KAFKA_BROKERS=self.brokers,
            REDIS_URL=f"redis://127.0.0.1:{self.redis.port}/0",
            API_KEYS=KEY,
            ENGINEDGE_DATA_DIR=str(self.tmp),
            HOST="127.0.0.1",
            LOG_LEVEL="info",
            WORKER_HEARTBEAT_INTERVAL="0.5",
            WORKER_HEARTBEAT_TTL="20",
            SWEEP_INTERVAL="0.5",
            HEALTH_CHECK_INTERVAL="1",
            RETRY_BACKOFF="0.2",
            MAX_ATTEMPTS="5",
            **self.extra_env,
            **extra,
        )
        return env

    def _spawn(self, args: list[str], name: str, **env: str) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "enginedge", *args],
                env=self.env(**env),
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def start_replica(self) -> str:
        port = free_port()
        process = self._spawn(["serve"], f"replica-{port}", PORT=str(port))
        url = f"http://127.0.0.1:{port}"
        self.replicas.append((process, url))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, (self.tmp / f"replica-{port}.log").read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("replica never ready")

    def start_worker(self, capacity: int = 4) -> None:
        n = len(self.workers)
        self.workers.append(
            self._spawn(
                ["worker", "--type", "data-processing", "--capacity", str(capacity)],
                f"worker-{n}",
                # Its own /health, which the replicas check every second.
                WORKER_HEALTH_PORT=str(free_port()),
                WORKER_ADVERTISED_HOST="127.0.0.1",
            )
        )

    def wait_for_workers(self, url: str, count: int) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            items = httpx.get(f"{url}/api/workers", headers=H).json()["items"]
            if sum(w["status"] == "HEALTHY" for w in items) >= count:
                return
            time.sleep(0.1)
        raise AssertionError(f"fewer than {count} healthy workers: {items}")

    def log_tails(self, lines: int = 15) -> str:
        """The last lines of every process's log, for an assertion message."""
        parts = []
        for path in sorted(self.tmp.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {path.name}\n" + "\n".join(line[:300] for line in tail))
        return "\n".join(parts)

    def stop_all(self) -> list[int]:
        codes = [stop_process(p) for p in self.workers]
        codes += [stop_process(p) for p, _ in self.replicas]
        return codes


@pytest.fixture
def cluster(tmp_path: Path, pg_url: str) -> Iterator[Cluster]:
    if os.environ.get("TEST_KAFKA_BROKERS") or os.environ.get("TEST_REDIS_URL"):
        pytest.skip("this test stops and restarts its broker, so it needs the one it starts")
    with kafka_broker() as broker, redis_server() as redis:
        c = Cluster(tmp_path, pg_url, broker, redis)
        try:
            yield c
        finally:
            c.stop_all()


def sql_payload(i: int) -> dict[str, Any]:
    return {"sql": "SELECT sum(x) AS s FROM t", "tables": {"t": [{"x": i}, {"x": 1000}]}}


async def db_counts(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT status, count(*) AS n FROM requests GROUP BY status")
        return {r["status"]: r["n"] for r in rows}
    finally:
        await conn.close()


async def worker_inboxes(url: str) -> list[str]:
    """The inbox topics the workers announced (the ``workers`` table)."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT inbox FROM workers WHERE inbox IS NOT NULL")
        return [r["inbox"] for r in rows]
    finally:
        await conn.close()


async def produce(brokers: str, topic: str, value: bytes) -> None:
    """Put a raw message on a topic, retrying while a just-restarted broker settles."""
    producer = AIOKafkaProducer(bootstrap_servers=brokers)
    await producer.start()
    try:
        for _ in range(50):
            try:
                await producer.send_and_wait(topic, value, key=b"bad")
                return
            except KafkaError:
                await asyncio.sleep(0.2)
        raise AssertionError(f"could not produce to {topic}")
    finally:
        await producer.stop()


async def read_topic(
    brokers: str, topic: str, expected: int, timeout: float = 30
) -> list[dict[str, Any]]:
    """The messages of ``topic``, read until ``expected`` have come (or the timeout)."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=brokers,
        group_id=f"t-{uuid.uuid4()}",
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
    )
    await consumer.start()
    try:
        found: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while len(found) < expected and time.monotonic() < deadline:
            records = await consumer.getmany(timeout_ms=500)
            for messages in records.values():
                found += [orjson.loads(m.value) for m in messages]
        return found
    finally:
        await consumer.stop()


async def sse_terminal(client: httpx.AsyncClient, url: str, rid: str) -> dict[str, Any]:
    async with client.stream(
        "GET", f"{url}/api/requests/{rid}/events", headers=H, timeout=60
    ) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                data: dict[str, Any] = orjson.loads(line[5:])
                if data.get("status") in TERMINAL:
                    return data
    raise AssertionError("stream ended without a terminal event")


def metric(text: str, series: str) -> float:
    """The value of ``series`` (name with labels), or the sum over all labels of a name."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(series + " ") or ("{" not in series and line.startswith(series + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=30) as client:
        yield client


async def test_two_replicas_two_workers_a_thousand_requests(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a = cluster.start_replica()
    b = cluster.start_replica()
    cluster.start_worker()
    cluster.start_worker()
    cluster.wait_for_workers(a, 2)

    ids: dict[str, int] = {}
    semaphore = asyncio.Semaphore(32)

    async def submit(i: int) -> None:
        async with semaphore:
            url = a if i % 2 == 0 else b
            response = await http.post(
                f"{url}/api/orchestrate",
                headers=H,
                json={"taskType": "data.sql", "payload": sql_payload(i)},
            )
            assert response.status_code == 202, response.text
            ids[response.json()["requestId"]] = i

    await asyncio.gather(*(submit(i) for i in range(400)))

    # The broker goes away mid-run, taking every message it held (memory only), and returns.
    outage = asyncio.ensure_future(asyncio.gather(*(submit(i) for i in range(400, 700))))
    await asyncio.sleep(0.5)
    await asyncio.to_thread(cluster.broker.stop, signal.SIGKILL)
    await asyncio.sleep(3)
    await asyncio.to_thread(cluster.broker.start)
    await outage
    await asyncio.gather(*(submit(i) for i in range(700, 1000)))
    assert len(ids) == 1000

    deadline = time.monotonic() + 150
    while time.monotonic() < deadline:
        counts = await db_counts(cluster.database_url)
        if counts.get("COMPLETED", 0) == 1000:
            break
        assert not set(counts) & {"FAILED", "TIMEOUT", "CANCELLED"}, counts
        await asyncio.sleep(0.5)
    assert counts == {"COMPLETED": 1000}, f"{counts}\n{cluster.log_tails()}"

    conn = await asyncpg.connect(cluster.database_url)
    try:
        rows = await conn.fetch(
            "SELECT r.id, count(rr.id) AS results, min(rr.result::text) AS result "
            "FROM requests r LEFT JOIN request_results rr ON rr.request_id = r.id GROUP BY r.id"
        )
    finally:
        await conn.close()
    assert len(rows) == 1000
    for row in rows:
        assert row["results"] == 1, row  # exactly one recorded outcome per request
        expected = ids[str(row["id"])] + 1000
        assert orjson.loads(row["result"]) == {"columns": ["s"], "rows": [[expected]]}

    # A malformed message on the results topic goes to its DLQ; nothing else notices. (Sent
    # once the group has settled: the memory-only test broker lost its log in the restart,
    # and offsets committed against the old log can skip what a new one holds at first.)
    await produce(cluster.brokers, "worker.results", b"{not json")
    await produce(
        cluster.brokers,
        "worker.results",
        orjson.dumps(
            {
                "requestId": str(uuid.uuid4()),
                "attempt": 1,
                "workerId": str(uuid.uuid4()),
                "kind": "completed",
                "seq": 1,
                "result": {},
            }
        ),
    )
    dead = await read_topic(cluster.brokers, "worker.results.dlq", expected=2)
    reasons = " ".join(d["error"] for d in dead)
    assert "not JSON" in reasons, dead
    assert "unknown request" in reasons, dead

    # Counted once the broker took the dead letter, which a reader may see a moment sooner.
    async def counted() -> bool:
        metrics = [(await http.get(f"{u}/metrics")).text for u in (a, b)]
        return sum(metric(m, "enginedge_dlq_messages_total") for m in metrics) >= 2

    await until("both dead letters to be counted", counted, timeout=10)

    # SIGTERM: every process drains and exits 0.
    assert cluster.stop_all() == [0, 0, 0, 0]


async def successes(http: httpx.AsyncClient, replica: str) -> float:
    """How many requests ``replica`` recorded as completed (its metrics)."""
    text = (await http.get(f"{replica}/metrics")).text
    return metric(text, 'enginedge_requests_total{status="success"}')


async def recorded_by(
    http: httpx.AsyncClient, replica: str, round_trip: Callable[[int], Awaitable[None]]
) -> int:
    """Run ``round_trip(i)`` (which submits request ``i`` and checks its outcome) until
    ``replica`` has recorded two of the outcomes, or 20 times; how many it recorded."""
    recorded = 0
    for i in range(20):
        before = await successes(http, replica)
        await round_trip(i)
        recorded += int(await successes(http, replica) > before)
        if recorded >= 2:
            break
    return recorded


async def test_events_cross_replicas_and_limits_are_shared(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    cluster.extra_env.update(RATE_LIMIT_REQUESTS="500", RATE_LIMIT_WINDOW="3600")
    a = cluster.start_replica()
    b = cluster.start_replica()
    cluster.start_worker()
    cluster.wait_for_workers(a, 1)
    # The replicas check the worker's own /health: it passes, and says so.
    for _ in range(50):
        (worker,) = (await http.get(f"{b}/api/workers", headers=H)).json()["items"]
        if worker["lastHealthCheck"]:
            break
        await asyncio.sleep(0.1)
    assert worker["lastHealthCheck"] is not None
    assert worker["status"] == "HEALTHY"
    assert worker["endpoint"].startswith("http://127.0.0.1:")
    health = (await http.get(worker["endpoint"] + "/health")).json()
    assert (health["status"], health["workerId"]) == ("HEALTHY", worker["workerId"])

    # An SSE client on A sees the outcome of requests whose results B recorded.
    async def followed_over_sse(i: int) -> None:
        response = await http.post(
            f"{a}/api/orchestrate",
            headers=H,
            json={"taskType": "data.sql", "payload": sql_payload(i)},
        )
        rid = response.json()["requestId"]
        event = await asyncio.wait_for(sse_terminal(http, a, rid), 30)
        assert event["status"] == "COMPLETED"
        assert event["result"] == {"columns": ["s"], "rows": [[i + 1000]]}

    assert await recorded_by(http, b, followed_over_sse) >= 2

    # A caller waiting on A is woken when B records the outcome (the finished feed), not
    # when its wait runs out.
    async def waited_for(i: int) -> None:
        started = asyncio.get_running_loop().time()
        response = await http.post(
            f"{a}/api/orchestrate",
            params={"wait": 20},
            headers=H,
            json={"taskType": "data.sql", "payload": sql_payload(i)},
        )
        assert response.status_code == 200, response.text
        assert response.json()["result"] == {"columns": ["s"], "rows": [[i + 1000]]}
        assert asyncio.get_running_loop().time() - started < 10

    assert await recorded_by(http, b, waited_for) >= 2

    # One key's limit holds across both replicas (Redis counts for all of them).
    used = 0
    codes = []
    for i in range(600):
        url = a if i % 2 == 0 else b
        response = await http.get(f"{url}/api/requests?limit=1", headers=H)
        codes.append(response.status_code)
        if response.status_code == 429:
            break
        used += 1
    assert codes[-1] == 429
    assert used < 500  # the window also counted the calls above, from both replicas
    assert all(c == 200 for c in codes[:-1])


async def test_redis_outage_degrades_and_loses_nothing(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a = cluster.start_replica()
    cluster.start_worker()
    cluster.wait_for_workers(a, 1)

    async def run(i: int) -> str:
        response = await http.post(
            f"{a}/api/orchestrate",
            headers=H,
            json={"taskType": "data.sql", "payload": sql_payload(i)},
        )
        if response.status_code != 202:
            conn = await asyncpg.connect(cluster.database_url)
            rows = await conn.fetch(
                "SELECT id, status, last_heartbeat, capabilities, now() FROM workers"
            )
            await conn.close()
            raise AssertionError(f"{i} {response.text} {rows}")
        return str(response.json()["requestId"])

    before = [await run(i) for i in range(5)]
    await asyncio.to_thread(cluster.redis.stop, signal.SIGKILL)
    ready = await http.get(f"{a}/ready")
    assert ready.status_code == 503
    assert ready.json()["components"]["cache"]["status"] == "down"
    assert (await http.get(f"{a}/live")).status_code == 200
    conn = await asyncpg.connect(cluster.database_url)
    print("DEBUG", await conn.fetch("SELECT id, status, last_heartbeat, now() FROM workers"))
    await conn.close()
    during = [await run(i) for i in range(5, 15)]  # still accepted: the store stands in
    await asyncio.to_thread(cluster.redis.start)
    after = [await run(i) for i in range(15, 20)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        counts = await db_counts(cluster.database_url)
        if counts.get("COMPLETED") == 20:
            break
        await asyncio.sleep(0.3)
    assert counts == {"COMPLETED": 20}, counts
    for rid in before + during + after:
        body = (await http.get(f"{a}/api/requests/{rid}", headers=H)).json()
        assert body["status"] == "COMPLETED"
    assert (await http.get(f"{a}/ready")).status_code == 200


async def test_ready_follows_each_backing_service(tmp_path: Path, http: httpx.AsyncClient) -> None:
    """Each of PostgreSQL, the broker and Redis stopped in turn: /ready 503 within the probe
    timeout, naming it; /live stays 200; /ready recovers by itself."""
    with postgres_server() as pg, kafka_broker() as broker, redis_server() as redis:
        cluster = Cluster(tmp_path, pg.url, broker, redis)
        try:
            a = cluster.start_replica()
            outages: list[tuple[str, Any]] = [
                ("database", pg),
                ("messageBus", broker),
                ("cache", redis),
            ]
            for component, server in outages:
                await asyncio.to_thread(server.stop)
                started = time.monotonic()
                ready = await http.get(f"{a}/ready")
                assert time.monotonic() - started < 5  # never hangs
                assert ready.status_code == 503, (component, ready.text)
                assert ready.json()["components"][component]["status"] == "down"
                assert (await http.get(f"{a}/live")).status_code == 200
                await asyncio.to_thread(server.restart)
                for _ in range(100):
                    if (await http.get(f"{a}/ready")).status_code == 200:
                        break
                    await asyncio.sleep(0.2)
                else:
                    raise AssertionError(f"/ready did not recover after {component}")
        finally:
            cluster.stop_all()


async def test_one_request_is_one_trace_across_processes(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    async with otlp_receiver() as receiver:
        cluster.extra_env.update(
            OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url, OTEL_BSP_SCHEDULE_DELAY="100"
        )
        a = cluster.start_replica()
        cluster.start_worker()
        cluster.wait_for_workers(a, 1)
        caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        response = await http.post(
            f"{a}/api/orchestrate",
            headers={**H, "traceparent": caller},
            json={"taskType": "data.sql", "payload": sql_payload(1)},
        )
        rid = response.json()["requestId"]
        assert (await asyncio.wait_for(sse_terminal(http, a, rid), 30))["status"] == "COMPLETED"
        # The dispatch goes to the chosen worker's own inbox topic.
        (inbox,) = await worker_inboxes(cluster.database_url)
        wanted = {
            ("main-hexagon", "POST /api/orchestrate"),
            ("main-hexagon", "db.transaction"),
            ("main-hexagon", f"publish {inbox}"),
            ("enginedge-worker-data-processing", "process data.sql"),
            ("enginedge-worker-data-processing", "publish worker.results"),
            ("main-hexagon", "record worker.results"),
        }
        for _ in range(100):
            trace = [s for s in receiver.spans if s.trace_id == caller[3:35]]
            if wanted <= {(s.service, s.name) for s in trace}:
                break
            await asyncio.sleep(0.1)
        assert wanted <= {(s.service, s.name) for s in trace}, trace
        by_id = {s.span_id: s for s in trace}
        process = next(s for s in trace if s.name == "process data.sql")
        # The worker's span hangs from the orchestrator's publish of its dispatch.
        assert by_id[process.parent_id].name == f"publish {inbox}"
        http_span = next(s for s in trace if s.name == "POST /api/orchestrate")
        assert http_span.parent_id == caller[36:52]  # the caller's own span


async def test_sigterm_drains_a_worker_process_and_loses_nothing(
    cluster: Cluster, http: httpx.AsyncClient
) -> None:
    a = cluster.start_replica()
    cluster.start_worker(capacity=2)
    cluster.wait_for_workers(a, 1)
    slow = {
        "sql": "SELECT count(*) AS n FROM range(1000000000) t(i) WHERE i % 7 = 3",
        "tables": {"t": [{"a": 1}]},
    }
    ids = []
    for _ in range(2):
        response = await http.post(
            f"{a}/api/orchestrate", headers=H, json={"taskType": "data.sql", "payload": slow}
        )
        ids.append(response.json()["requestId"])
    for rid in ids:
        for _ in range(200):
            body = (await http.get(f"{a}/api/requests/{rid}", headers=H)).json()
            if body["status"] == "PROCESSING":
                break
            await asyncio.sleep(0.05)
        assert body["status"] == "PROCESSING", body
    (worker,) = cluster.workers
    worker.send_signal(signal.SIGTERM)  # mid-work
    assert await asyncio.to_thread(worker.wait, 60) == 0
    for rid in ids:
        body = (await http.get(f"{a}/api/requests/{rid}", headers=H)).json()
        for _ in range(100):
            if body["status"] == "COMPLETED":
                break
            await asyncio.sleep(0.1)
            body = (await http.get(f"{a}/api/requests/{rid}", headers=H)).json()
        assert body["status"] == "COMPLETED", body
        assert body["attempts"] == 1  # finished by the draining worker, not re-run
        assert body["result"] == {"columns": ["n"], "rows": [[142857143]]}


def test_bench_short_form_in_distributed_mode(cluster: Cluster) -> None:
    """`enginedge bench --mode distributed` starts an orchestrator and a worker process on
    the suite's PostgreSQL, broker and Redis, and reports every round trip (no timing
    asserted: that is docs/performance.md's business)."""
    done = subprocess.run(
        [
            *(sys.executable, "-m", "enginedge", "bench", "--mode", "distributed", "--json"),
            *("--requests", "40", "--concurrency", "4", "--warmup", "4"),
            *("--database-url", cluster.database_url, "--kafka-brokers", cluster.brokers),
            *("--redis-url", f"redis://127.0.0.1:{cluster.redis.port}/0"),
            *("--log-dir", str(cluster.tmp / "bench")),
        ],
        env=cluster.env(),
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = orjson.loads(done.stdout)
    assert (report["mode"], report["completed"], report["errors"]) == ("distributed", 40, 0)
    assert report["orchestrator_peak_rss_mb"] > 10
    assert (cluster.tmp / "bench" / "worker.log").exists()
    # The machine's CPU by process names the worker process the bench started.
    assert {"orchestrator", "worker", "client"} <= set(report["cpu_seconds_by_process"])
