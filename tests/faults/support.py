"""What the fault scenarios share: a cluster of real processes, requests in flight, an
outage prober, the checks against PostgreSQL, and the figures each scenario writes for
``docs/reliability.md`` (``artifacts/reliability/<scenario>.json``)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil

from enginedge.entrypoints.processes import stop_process
from tests.integration.test_distributed import TERMINAL, Cluster, H, metric
from tests.support.servers import free_port

FIGURES_DIR = Path(
    os.environ.get(
        "RELIABILITY_FIGURES_DIR", Path(__file__).parents[2] / "artifacts" / "reliability"
    )
)

# A task that keeps a worker slot busy for a second or two (the machine has two cores), so
# that some requests are PROCESSING when the fault strikes.
SLOW_SQL = "SELECT count(*) AS n FROM range(300000000) t(i) WHERE i % 7 = 3"
SLOW_ANSWER = 42857143


def fast_payload(i: int) -> dict[str, Any]:
    return {"sql": "SELECT sum(x) AS s FROM t", "tables": {"t": [{"x": i}, {"x": 1000}]}}


def fast_answer(i: int) -> dict[str, Any]:
    return {"columns": ["s"], "rows": [[i + 1000]]}


def slow_payload(i: int) -> dict[str, Any]:
    # ``i`` only makes each payload distinct.
    return {
        "sql": SLOW_SQL.replace("% 7 = 3", f"% 7 = 3 AND {i} = {i}"),
        "tables": {"t": [{"a": 1}]},
    }


def slow_answer(_: int) -> dict[str, Any]:
    return {"columns": ["n"], "rows": [[SLOW_ANSWER]]}


@dataclass
class FaultCluster(Cluster):
    """The distributed test cluster with timings for faults (a lost worker shows within
    seconds) and worker processes that can be told apart by their health endpoint."""

    overrides: dict[str, str] = field(default_factory=dict)
    worker_endpoints: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = super().env(**extra)
        env.update(
            WORKER_HEARTBEAT_TTL="4",
            HEALTH_CHECK_INTERVAL="0.5",
            WORKER_HEALTH_CHECK_TIMEOUT="1",
            RATE_LIMIT_REQUESTS="1000000",
            LOG_LEVEL="warn",
        )
        env.update(self.overrides)
        env.update(extra)
        return env

    def start_fault_worker(
        self, capacity: int = 4, prefix: list[str] | None = None, host: str = "127.0.0.1"
    ) -> tuple[subprocess.Popen[bytes], str]:
        """A `enginedge worker` process (``prefix`` runs it inside e.g. `ip netns exec`);
        its health endpoint identifies it in the registry."""
        port = free_port()
        endpoint = f"http://{host}:{port}"
        n = len(self.workers)
        with open(self.tmp / f"worker-{n}.log", "ab") as log:
            process = subprocess.Popen(
                [
                    *(prefix or []),
                    sys.executable,
                    "-m",
                    "enginedge",
                    "worker",
                    "--type",
                    "data-processing",
                    "--capacity",
                    str(capacity),
                ],
                env=self.env(WORKER_HEALTH_PORT=str(port), WORKER_ADVERTISED_HOST=host),
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.workers.append(process)
        self.worker_endpoints[endpoint] = process
        return process, endpoint

    def restart_replica(self, index: int = 0) -> str:
        """Start a replica in place of ``replicas[index]`` (same settings, new port)."""
        del self.replicas[index]
        return self.start_replica()


@dataclass
class Load:
    """Requests submitted for a scenario: id → (kind, i), with their expected results."""

    url: str
    http: httpx.AsyncClient
    accepted: dict[str, tuple[str, int]] = field(default_factory=dict)
    refused: Counter[int] = field(default_factory=Counter)

    async def submit(self, kind: str, i: int, url: str | None = None) -> str | None:
        payload = slow_payload(i) if kind == "slow" else fast_payload(i)
        response = await self.http.post(
            f"{url or self.url}/api/orchestrate",
            headers=H,
            json={"taskType": "data.sql", "payload": payload},
            timeout=15,
        )
        if response.status_code != 202:
            self.refused[response.status_code] += 1
            return None
        rid = str(response.json()["requestId"])
        self.accepted[rid] = (kind, i)
        return rid

    async def submit_many(self, fast: int, slow: int = 0, start: int = 0) -> list[str]:
        semaphore = asyncio.Semaphore(16)

        async def one(kind: str, i: int) -> str | None:
            async with semaphore:
                return await self.submit(kind, i)

        jobs = [one("slow", start + i) for i in range(slow)]
        jobs += [one("fast", start + slow + i) for i in range(fast)]
        return [rid for rid in await asyncio.gather(*jobs) if rid is not None]

    def expected(self, rid: str) -> dict[str, Any]:
        kind, i = self.accepted[rid]
        return slow_answer(i) if kind == "slow" else fast_answer(i)


async def processing_on(url: str, http: httpx.AsyncClient, rids: list[str]) -> dict[str, str]:
    """request id → worker id of the given requests that are PROCESSING now."""
    found = {}
    for rid in rids:
        body = (await http.get(f"{url}/api/requests/{rid}", headers=H)).json()
        if body.get("status") == "PROCESSING" and body.get("workerId"):
            found[rid] = body["workerId"]
    return found


async def wait_processing(
    url: str, http: httpx.AsyncClient, rids: list[str], at_least: int = 1, timeout: float = 60
) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = await processing_on(url, http, rids)
        if len(found) >= at_least:
            return found
        await asyncio.sleep(0.1)
    # Where they are instead, and what the fleet looks like: enough to tell a stuck dispatch
    # from a starved or lost worker when this fails in CI.
    seen = [(await http.get(f"{url}/api/requests/{r}", headers=H)).json() for r in rids]
    where = [(b.get("status"), b.get("attempts"), b.get("workerId")) for b in seen]
    fleet = (await http.get(f"{url}/api/workers", headers=H)).json().get("items", [])
    workers = [(w.get("workerId"), w.get("status"), w.get("active")) for w in fleet]
    raise AssertionError(
        f"fewer than {at_least} of {len(rids)} requests reached PROCESSING; "
        f"they are (status, attempts, worker): {where}; the workers: {workers}"
    )


async def worker_endpoint(url: str, http: httpx.AsyncClient, worker_id: str) -> str:
    body = (await http.get(f"{url}/api/workers/{worker_id}", headers=H)).json()
    return str(body["endpoint"])


@dataclass
class Verdict:
    """What PostgreSQL says about the accepted requests once all are terminal."""

    statuses: dict[str, int]
    lost: int
    duplicated: int
    wrong: int
    extra_rows: int
    max_attempts: int
    rows: dict[str, asyncpg.Record]


async def verdict(database_url: str, load: Load) -> Verdict:
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT r.id::text AS id, r.status, r.attempts, "
            "count(rr.id) AS results, min(rr.result::text) AS result "
            "FROM requests r LEFT JOIN request_results rr ON rr.request_id = r.id "
            "GROUP BY r.id"
        )
    finally:
        await conn.close()
    by_id = {row["id"]: row for row in rows}
    statuses = Counter(row["status"] for row in rows if row["id"] in load.accepted)
    lost = sum(1 for rid in load.accepted if rid not in by_id)
    duplicated = sum(1 for row in rows if row["results"] > 1)
    wrong = 0
    for rid, row in by_id.items():
        completed = rid in load.accepted and row["status"] == "COMPLETED"
        if completed and (row["results"] != 1 or json.loads(row["result"]) != load.expected(rid)):
            wrong += 1
    return Verdict(
        statuses=dict(statuses),
        lost=lost,
        duplicated=duplicated,
        wrong=wrong,
        extra_rows=len(set(by_id) - set(load.accepted)),
        max_attempts=max((row["attempts"] for row in rows), default=0),
        rows=by_id,
    )


async def wait_all_terminal(database_url: str, load: Load, timeout: float = 120) -> float:
    """Seconds until every accepted request is terminal in PostgreSQL (polled)."""
    started = time.monotonic()
    deadline = started + timeout
    wanted = list(load.accepted)
    pending = len(wanted)
    while time.monotonic() < deadline:
        try:
            conn = await asyncpg.connect(database_url, timeout=5)
            try:
                pending = await conn.fetchval(
                    "SELECT count(*) FROM unnest($1::uuid[]) AS w(id) "
                    "LEFT JOIN requests r ON r.id = w.id "
                    "WHERE r.status IS NULL OR r.status <> ALL($2::text[])",
                    wanted,
                    list(TERMINAL),
                )
            finally:
                await conn.close()
        except (OSError, asyncpg.PostgresError):
            pending = -1
        if pending == 0:
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise AssertionError(f"{pending} accepted requests not terminal after {timeout}s")


@dataclass
class Prober:
    """Calls the API in a loop while a fault lasts: every answer's status is counted; a
    hang (no answer within ``timeout``) or a 500 fails the scenario."""

    url: str
    known: str | None = None
    allowed: frozenset[int] = frozenset({200, 202, 503})
    timeout: float = 10.0
    codes: Counter[str] = field(default_factory=Counter)
    accepted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def _loop(self, load: Load | None) -> None:
        async with httpx.AsyncClient(timeout=self.timeout) as client:
            i = 0
            while not self._stop.is_set():
                i += 1
                calls: list[tuple[str, Callable[[], Awaitable[httpx.Response]]]] = [
                    (
                        "POST /api/orchestrate",
                        lambda: client.post(
                            f"{self.url}/api/orchestrate",
                            headers=H,
                            json={"taskType": "data.sql", "payload": fast_payload(900000 + i)},
                        ),
                    ),
                    (
                        "GET /api/requests",
                        lambda: client.get(f"{self.url}/api/requests", headers=H),
                    ),
                ]
                if self.known:
                    known = self.known
                    calls.append(
                        (
                            "GET /api/requests/{id}",
                            lambda: client.get(f"{self.url}/api/requests/{known}", headers=H),
                        )
                    )
                for name, call in calls:
                    try:
                        response = await call()
                    except httpx.TimeoutException:
                        self.problems.append(f"{name}: no answer within {self.timeout}s")
                        continue
                    except httpx.TransportError as exc:
                        self.problems.append(f"{name}: {exc!r}")
                        continue
                    self.codes[f"{name} {response.status_code}"] += 1
                    if response.status_code not in self.allowed:
                        self.problems.append(f"{name}: {response.status_code} {response.text}")
                    if response.status_code == 503:
                        code = response.json().get("error", {}).get("code")
                        self.codes[f"{name} 503 {code}"] += 1
                        if code not in ("SERVICE_UNAVAILABLE", "NO_ELIGIBLE_WORKERS"):
                            self.problems.append(f"{name}: 503 with {response.text}")
                    if name.startswith("POST") and response.status_code == 202 and load:
                        rid = str(response.json()["requestId"])
                        load.accepted[rid] = ("fast", 900000 + i)
                await asyncio.sleep(0.1)

    def start(self, load: Load | None = None) -> None:
        self._task = asyncio.ensure_future(self._loop(load))

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    def summary(self) -> dict[str, int]:
        return dict(sorted(self.codes.items()))


async def first_success(load: Load, timeout: float = 120, url: str | None = None) -> float:
    """Seconds until a new request is accepted and completes (the service recovered)."""
    started = time.monotonic()
    deadline = started + timeout
    i = 800000
    while time.monotonic() < deadline:
        i += 1
        try:
            rid = await load.submit("fast", i, url)
        except httpx.HTTPError:
            rid = None
        if rid is not None:
            remaining = deadline - time.monotonic()
            body = (
                await load.http.get(
                    f"{url or load.url}/api/requests/{rid}?wait={max(1, min(30, int(remaining)))}",
                    headers=H,
                    timeout=40,
                )
            ).json()
            while body.get("status") not in TERMINAL and time.monotonic() < deadline:
                body = (
                    await load.http.get(
                        f"{url or load.url}/api/requests/{rid}?wait=5", headers=H, timeout=40
                    )
                ).json()
            if body.get("status") == "COMPLETED":
                return time.monotonic() - started
        await asyncio.sleep(0.25)
    raise AssertionError(f"the service did not recover within {timeout}s")


async def ignored_results(urls: list[str], http: httpx.AsyncClient) -> float:
    total = 0.0
    for url in urls:
        try:
            text = (await http.get(f"{url}/metrics")).text
        except httpx.HTTPError:
            continue
        total += metric(text, "enginedge_results_ignored_total")
    return total


def record(scenario: str, **figures: Any) -> dict[str, Any]:
    """Write one scenario's figures for the report."""
    FIGURES_DIR.mkdir(parents=True, exist_ok=True)
    data = {"scenario": scenario, "recordedAt": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    data.update(figures)
    (FIGURES_DIR / f"{scenario}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    return data


def verdict_figures(v: Verdict) -> dict[str, Any]:
    return {k: getattr(v, k) for k in ("lost", "duplicated", "wrong", "extra_rows", "max_attempts")}


def freeze(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGSTOP)


def thaw(process: subprocess.Popen[bytes]) -> None:
    os.kill(process.pid, signal.SIGCONT)


def kill(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, signal.SIGKILL)


@dataclass
class Sampler:
    """Every ``every`` seconds, for some processes: resident memory, open descriptors, TCP
    connections in all, and those to each backing service (``backends``: name → port)."""

    pids: dict[str, int]
    backends: dict[str, int] = field(default_factory=dict)
    every: float = 2.0
    samples: list[dict[str, Any]] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None

    def sample(self) -> dict[str, Any]:
        row: dict[str, Any] = {"t": time.monotonic()}
        for name, pid in self.pids.items():
            proc = psutil.Process(pid)
            tcp = proc.net_connections(kind="tcp")
            row[name] = {
                "rss_mb": proc.memory_info().rss / 2**20,
                "fds": proc.num_fds(),
                "tcp": len(tcp),
            }
            for backend, port in self.backends.items():
                row[name][backend] = sum(1 for c in tcp if c.raddr and c.raddr.port == port)
        return row

    async def _loop(self) -> None:
        while True:
            self.samples.append(await asyncio.to_thread(self.sample))
            await asyncio.sleep(self.every)

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


async def in_flight(database_url: str, load: Load) -> dict[str, int]:
    """Accepted requests not yet terminal, by status (what a fault catches in flight)."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT status, count(*) AS n FROM requests WHERE id = ANY($1::uuid[]) "
            "AND status <> ALL($2::text[]) GROUP BY status",
            list(load.accepted),
            list(TERMINAL),
        )
    finally:
        await conn.close()
    return {row["status"]: row["n"] for row in rows}


def check(v: Verdict, load: Load, expected: str = "COMPLETED") -> None:
    """Every accepted request present, terminal in ``expected``, recorded once, right."""
    assert v.lost == 0, v.statuses
    assert v.statuses == {expected: len(load.accepted)}, v.statuses
    assert v.duplicated == 0
    assert v.wrong == 0
    assert v.extra_rows == 0


@contextlib.contextmanager
def embedded_service(workdir: Path, **env: str) -> Iterator[str]:
    """`enginedge serve` on its embedded defaults (SQLite, in-process bus and workers) as a
    child process on a free port; its URL."""
    port = free_port()
    environment = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "KAFKA_BROKERS", "REDIS_URL")
    }
    environment.update(
        API_KEYS=H["X-API-Key"],
        ENGINEDGE_DATA_DIR=str(workdir),
        HOST="127.0.0.1",
        PORT=str(port),
        LOG_LEVEL="error",
        **env,
    )
    with open(workdir / "service.log", "ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "enginedge", "serve"],
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (workdir / "service.log").read_text()
            try:
                if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the embedded service never became ready"
            time.sleep(0.1)
        yield url
    finally:
        assert stop_process(process) == 0, (workdir / "service.log").read_text()[-3000:]
