"""`enginedge bench`: round-trip throughput and latency through the public HTTP API.

The bench is the client process. It starts the orchestrator (and, in distributed mode, a
built-in worker) as processes of their own, drives ``POST /api/orchestrate`` with the ``echo``
task from a fixed number of concurrent callers, and waits for each request's terminal status,
by default in the submit itself (``POST /api/orchestrate?wait=``), with ``--flow poll`` by
long polling ``GET /api/requests/{id}?wait=`` after a 202: the time counted is everything a
caller would see.
The orchestrator's peak RSS is sampled from its process while it runs; its CPU seconds are
read with those of the whole machine, by process, over the same window: on a machine that holds
the client, the worker and the servers too, what they all spend per round trip bounds the
throughput (``cores / CPU seconds per round trip``), whatever the orchestrator does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import httpx
import psutil
import uvloop

from enginedge.domain.model import TERMINAL_NAMES
from enginedge.entrypoints.processes import stop_process

Mode = Literal["embedded", "distributed", "external"]
# How a caller learns the outcome: the submit waits for it (``POST ...?wait=``), or the
# submit answers 202 at once and the caller long-polls ``GET /api/requests/{id}?wait=``.
Flow = Literal["submit-wait", "poll"]
WAIT_SECONDS = 30


class BenchError(Exception):
    """The bench could not run (a service that does not start, a bad option)."""


@dataclass(frozen=True, slots=True)
class BenchConfig:
    mode: Mode = "embedded"
    requests: int = 5000
    concurrency: int = 64
    warmup: int = 200
    url: str | None = None  # external mode: a running service
    api_key: str | None = None
    database_url: str | None = None
    kafka_brokers: str | None = None
    redis_url: str | None = None
    worker_capacity: int = 256
    log_dir: Path | None = None
    flow: Flow = "submit-wait"


@dataclass(slots=True)
class BenchReport:
    mode: str
    flow: str
    requests: int
    concurrency: int
    completed: int
    errors: int
    seconds: float
    throughput: float
    latency_ms: dict[str, float]
    orchestrator_cpu_seconds: float | None
    orchestrator_peak_rss_mb: float | None
    # Busy CPU seconds of the whole machine over the measured window, its cores, and the
    # same seconds by process (client, orchestrator, worker, else the process's name).
    machine_cpu_seconds: float = 0.0
    machine_cores: int = 0
    cpu_seconds_by_process: dict[str, float] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _quantile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def summarise(latencies: list[float]) -> dict[str, float]:
    """p50/p95/p99/max/mean of latencies given in seconds, in milliseconds."""
    ordered = sorted(latencies)
    ms = [v * 1000 for v in ordered]
    return {
        "p50": round(_quantile(ms, 0.50), 3),
        "p95": round(_quantile(ms, 0.95), 3),
        "p99": round(_quantile(ms, 0.99), 3),
        "max": round(ms[-1], 3) if ms else 0.0,
        "mean": round(statistics.fmean(ms), 3) if ms else 0.0,
    }


class _PeakRss:
    """Peak RSS of a process, sampled in the background (its CPU time is in
    :class:`MachineCpu`'s figures, by role)."""

    def __init__(self, pid: int | None) -> None:
        self._process = psutil.Process(pid) if pid else None
        self.peak_rss = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _PeakRss:
        if self._process is not None:
            self._task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        assert self._process is not None
        while True:
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def peak_rss_mb(self) -> float | None:
        return round(self.peak_rss / 2**20, 1) if self._process is not None else None


def _busy_seconds() -> float:
    """CPU seconds the machine spent not idle (all cores) since boot."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def _cpu_by_pid() -> dict[int, tuple[str, float]]:
    """Every process's name and CPU seconds (user and system) so far."""
    seen: dict[int, tuple[str, float]] = {}
    for process in psutil.process_iter(["name", "cpu_times"]):
        times = process.info["cpu_times"]
        if times is not None:
            seen[process.pid] = (process.info["name"] or "?", times.user + times.system)
    return seen


class MachineCpu:
    """The machine's busy CPU seconds over a window, and by process: what the client, the
    orchestrator, the worker and every server spent (a process that ended within the
    window is missed, hence the total as its own figure)."""

    def __init__(self, roles: dict[int, str]) -> None:
        self._roles = roles
        self._start: dict[int, tuple[str, float]] = {}
        self._busy_start = 0.0
        self.seconds = 0.0
        # Every role's and process name's CPU seconds over the window, however small.
        self.spent: dict[str, float] = {}

    def __enter__(self) -> MachineCpu:
        self._start = _cpu_by_pid()
        self._busy_start = _busy_seconds()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = round(_busy_seconds() - self._busy_start, 3)
        totals: dict[str, float] = {}
        for pid, (name, cpu) in _cpu_by_pid().items():
            spent = cpu - self._start.get(pid, (name, 0.0))[1]
            if spent > 0:
                role = self._roles.get(pid, name)
                totals[role] = totals.get(role, 0.0) + spent
        self.spent = totals

    @property
    def by_process(self) -> dict[str, float]:
        """The roles, and the processes by name that spent at least 10 ms, most first."""
        named = set(self._roles.values())
        return {
            role: round(spent, 3)
            for role, spent in sorted(self.spent.items(), key=lambda item: -item[1])
            if spent >= 0.01 or role in named  # the long tail of other processes is left out
        }


class _Failed(Exception):
    """One round trip that did not end ``COMPLETED`` with its payload echoed."""


async def _one(session: aiohttp.ClientSession, url: str, i: int, flow: Flow) -> float:
    """Submit one echo task and wait for its terminal status; the seconds it took."""
    start = time.perf_counter()
    params = {"wait": WAIT_SECONDS} if flow == "submit-wait" else {}
    async with session.post(
        f"{url}/api/orchestrate", json={"taskType": "echo", "payload": {"n": i}}, params=params
    ) as response:
        if response.status not in (200, 202):
            raise _Failed(f"submit answered {response.status}: {(await response.text())[:200]}")
        body = await response.json()
    status_url = f"/api/requests/{body['requestId']}"
    while body["status"] not in TERMINAL_NAMES:
        async with session.get(f"{url}{status_url}", params={"wait": WAIT_SECONDS}) as answer:
            if answer.status != 200:
                raise _Failed(f"status answered {answer.status}: {(await answer.text())[:200]}")
            body = await answer.json()
    if body["status"] != "COMPLETED" or body.get("result") != {"n": i}:
        raise _Failed(f"request ended {body['status']}: {body.get('error')}")
    return time.perf_counter() - start


async def drive(
    url: str,
    api_key: str,
    total: int,
    concurrency: int,
    flow: Flow = "submit-wait",
    on_done: Callable[[], None] = lambda: None,
) -> tuple[list[float], list[str], float]:
    """``total`` round trips from ``concurrency`` callers: latencies, errors, wall seconds.

    aiohttp rather than httpx: the client shares the machine with what it measures, and
    httpx spent more CPU per round trip than the orchestrator did.
    """
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(total))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=WAIT_SECONDS + 30)
    async with aiohttp.ClientSession(
        headers={"X-API-Key": api_key}, connector=connector, timeout=timeout
    ) as session:

        async def caller() -> None:
            for i in counter:
                try:
                    latencies.append(await _one(session, url, i, flow))
                except (_Failed, aiohttp.ClientError, TimeoutError) as exc:
                    errors.append(str(exc) or type(exc).__name__)
                on_done()

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        return latencies, errors, time.perf_counter() - start


@dataclass
class _Service:
    url: str
    api_key: str
    pid: int | None
    processes: list[subprocess.Popen[bytes]]
    # What each process the bench started is, by PID (the orchestrator, the worker).
    roles: dict[int, str] = field(default_factory=dict)


@contextlib.contextmanager
def _service(config: BenchConfig) -> Iterator[_Service]:
    """The orchestrator (and worker) the bench drives, stopped afterwards by their PIDs."""
    if config.mode == "external":
        if not config.url or not config.api_key:
            raise BenchError("--mode external needs --url and --api-key")
        yield _Service(config.url.rstrip("/"), config.api_key, None, [])
        return
    key = config.api_key or secrets.token_urlsafe(24)
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="enginedge-bench-") as tmp:
        logs = config.log_dir or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            API_KEYS=key,
            PORT=str(port),
            HOST="127.0.0.1",
            ENGINEDGE_DATA_DIR=tmp,
            LOG_LEVEL="warn",
            RATE_LIMIT_REQUESTS="100000000",
            BUILTIN_WORKER_CAPACITY=str(config.worker_capacity),
        )
        for name in ("DATABASE_URL", "KAFKA_BROKERS", "REDIS_URL"):
            env.pop(name, None)
        if config.mode == "distributed":
            if not config.database_url or not config.kafka_brokers:
                raise BenchError(
                    "--mode distributed needs --database-url and --kafka-brokers "
                    "(or DATABASE_URL and KAFKA_BROKERS)"
                )
            env.update(DATABASE_URL=config.database_url, KAFKA_BROKERS=config.kafka_brokers)
            if config.redis_url:
                env["REDIS_URL"] = config.redis_url
        processes: list[subprocess.Popen[bytes]] = []
        roles: dict[int, str] = {}

        def spawn(args: list[str], name: str) -> subprocess.Popen[bytes]:
            with open(logs / f"{name}.log", "ab") as log:
                process = subprocess.Popen(  # noqa: S603 - our own command
                    [sys.executable, "-m", "enginedge", *args],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            processes.append(process)
            roles[process.pid] = name
            return process

        try:
            orchestrator = spawn(["serve"], "orchestrator")
            if config.mode == "distributed":
                spawn(
                    [
                        "worker",
                        "--type",
                        "data-processing",
                        "--capacity",
                        str(config.worker_capacity),
                    ],
                    "worker",
                )
            url = f"http://127.0.0.1:{port}"
            wait_ready(url, key, orchestrator, logs / "orchestrator.log")
            yield _Service(url, key, orchestrator.pid, processes, roles)
        finally:
            for process in reversed(processes):
                stop_process(process, timeout=30)


def wait_ready(url: str, key: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Until the service is ready and a worker for ``echo`` is healthy."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"the orchestrator exited; its log:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                items = httpx.get(
                    f"{url}/api/workers", headers={"X-API-Key": key}, timeout=2
                ).json()["items"]
                if any(w["status"] == "HEALTHY" and "echo" in w["capabilities"] for w in items):
                    return
        time.sleep(0.2)
    raise BenchError(f"the service was not ready in 90 s; its log:\n{log.read_text()[-2000:]}")


async def _measure(
    service: _Service, config: BenchConfig, on_done: Callable[[], None]
) -> BenchReport:
    if config.warmup:
        await drive(service.url, service.api_key, config.warmup, config.concurrency, config.flow)
    # In external mode the orchestrator is not ours to name: no CPU figure of its own.
    orchestrator_cpu = 0.0 if service.pid else None
    with MachineCpu({os.getpid(): "client", **service.roles}) as machine:
        async with _PeakRss(service.pid) as rss:
            latencies, errors, seconds = await drive(
                service.url,
                service.api_key,
                config.requests,
                config.concurrency,
                config.flow,
                on_done,
            )
    by_process = machine.by_process
    return BenchReport(
        mode=config.mode,
        flow=config.flow,
        requests=config.requests,
        concurrency=config.concurrency,
        completed=len(latencies),
        errors=len(errors),
        seconds=round(seconds, 3),
        throughput=round(len(latencies) / seconds, 1) if seconds else 0.0,
        latency_ms=summarise(latencies),
        orchestrator_cpu_seconds=by_process.get("orchestrator", orchestrator_cpu),
        orchestrator_peak_rss_mb=rss.peak_rss_mb(),
        machine_cpu_seconds=machine.seconds,
        machine_cores=psutil.cpu_count() or 1,
        cpu_seconds_by_process=by_process,
        error_samples=sorted(set(errors))[:5],
    )


def run_bench(config: BenchConfig, on_done: Callable[[], None] = lambda: None) -> BenchReport:
    """Start what ``config`` asks for, measure, stop it all; the figures."""
    if config.requests < 1 or config.concurrency < 1 or config.warmup < 0:
        raise BenchError("--requests and --concurrency must be at least 1, --warmup at least 0")
    if config.flow not in ("submit-wait", "poll"):
        raise BenchError("--flow must be submit-wait or poll")
    # SIGTERM unwinds like Ctrl-C, so that the processes the bench started are stopped.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        with _service(config) as service:
            return uvloop.run(_measure(service, config, on_done))
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)
