"""The embedded service as an operator runs it: `enginedge serve` as its own process, the
CLI against it, and a crash right after a 202."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from enginedge.entrypoints.processes import stop_process
from tests.support.servers import free_port

KEY = "cli-test-key-0123456789"
SLOW_SQL = "SELECT count(*) AS n FROM range(1000000000) t(i) WHERE i % 7 = 3"
SUMS_SQL = {
    "sql": "SELECT sum(x) AS s, max(x) AS m FROM t",
    "tables": {"t": [{"x": 3}, {"x": 4}, {"x": 5}]},
}


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    url: str
    env: dict[str, str]
    log: Path


def _env(data_dir: Path, port: int, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DATABASE_URL", "KAFKA_BROKERS", "REDIS_URL", "API_KEYS")
    }
    env.update(
        ENGINEDGE_DATA_DIR=str(data_dir),
        PORT=str(port),
        HOST="127.0.0.1",
        LOG_LEVEL="info",
        ENGINEDGE_URL=f"http://127.0.0.1:{port}",
        WORKER_HEARTBEAT_INTERVAL="0.5",
        SWEEP_INTERVAL="0.2",
        **extra,
    )
    return env


def serve(data_dir: Path, port: int, **extra: str) -> Served:
    env = _env(data_dir, port, **extra)
    log = data_dir / f"serve-{time.monotonic_ns()}.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [sys.executable, "-m", "enginedge", "serve"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        if process.poll() is not None:
            raise AssertionError(f"serve exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return Served(process, url, env, log)
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            stop_process(process, signal.SIGKILL)
            raise AssertionError(f"never ready:\n{log.read_text()}")
        time.sleep(0.1)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = serve(tmp_path / "data", free_port(), API_KEYS=KEY)
    try:
        yield s
    finally:
        stop_process(s.process)


def cli(served: Served, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "enginedge", *args],
        env=served.env,
        input=stdin.decode() if stdin else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_submit_wait_prints_the_computed_result(served: Served) -> None:
    done = cli(served, "submit", "data.sql", orjson.dumps(SUMS_SQL).decode(), "--wait")
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout) == {"columns": ["s", "m"], "rows": [[12, 5]]}


def test_submit_from_stdin_status_and_workers(served: Served) -> None:
    accepted = cli(served, "submit", "data.sql", "-", "--json", stdin=orjson.dumps(SUMS_SQL))
    assert accepted.returncode == 0, accepted.stderr
    rid = orjson.loads(accepted.stdout)["requestId"]
    for _ in range(100):
        status = cli(served, "status", rid)
        assert status.returncode == 0
        if orjson.loads(status.stdout)["status"] == "COMPLETED":
            break
        time.sleep(0.05)
    assert orjson.loads(status.stdout)["result"]["rows"] == [[12, 5]]
    workers = cli(served, "workers", "--json")
    assert [w["type"] for w in orjson.loads(workers.stdout)] == ["data-processing"]


def test_failed_request_exits_1_with_the_reason(served: Served) -> None:
    done = cli(
        served, "submit", "data.sql", '{"sql": "SELEC", "tables": {"t": [{"a": 1}]}}', "--wait"
    )
    assert done.returncode == 1
    assert "FAILED" in done.stderr and "SQL error" in done.stderr


def test_cancel_from_the_cli(served: Served) -> None:
    accepted = cli(
        served,
        "submit",
        "data.sql",
        "--json",
        orjson.dumps({"sql": SLOW_SQL, "tables": {"t": [{"a": 1}]}}).decode(),
    )
    rid = orjson.loads(accepted.stdout)["requestId"]
    cancelled = cli(served, "cancel", rid)
    assert cancelled.returncode == 0, cancelled.stderr
    assert "CANCELLED" in cancelled.stdout
    again = cli(served, "cancel", rid)
    assert again.returncode == 3
    assert "CANNOT_CANCEL" in again.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["submit", "data.sql", "{not json"], 2, "not valid JSON"),
        (["submit", "data.sql"], 2, "a payload is needed"),
        (["submit", "Bad Type", "{}"], 3, "INVALID_TASK_TYPE"),
        (["status", "nope"], 3, "REQUEST_NOT_FOUND"),
        (["status", "x", "--api-key", "wrong-key-123"], 3, "INVALID_API_KEY"),
        (["workers", "--url", "http://127.0.0.1:9"], 3, "cannot reach"),
    ],
)
def test_cli_errors_are_clear_with_exit_codes(
    served: Served, args: list[str], code: int, message: str
) -> None:
    done = cli(served, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_without_a_key_the_api_says_401(served: Served) -> None:
    response = httpx.post(
        f"{served.url}/api/orchestrate", json={"taskType": "data.sql", "payload": SUMS_SQL}
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "INVALID_API_KEY"


def test_production_without_its_services_refuses_to_start(tmp_path: Path) -> None:
    env = _env(tmp_path, free_port(), ENVIRONMENT="production")
    done = subprocess.run(
        [sys.executable, "-m", "enginedge", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert (
        "ENVIRONMENT=production needs DATABASE_URL, KAFKA_BROKERS, REDIS_URL, API_KEYS"
        in done.stderr
    )
    assert "Traceback" not in done.stderr


def test_an_accepted_request_survives_a_crash_and_completes_after_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    port = free_port()
    first = serve(data_dir, port, API_KEYS=KEY)
    try:
        response = httpx.post(
            f"{first.url}/api/orchestrate",
            headers={"X-API-Key": KEY},
            json={
                "taskType": "data.sql",
                "payload": {"sql": SLOW_SQL, "tables": {"t": [{"a": 1}]}},
            },
        )
        assert response.status_code == 202
    finally:
        stop_process(first.process, signal.SIGKILL)  # a crash, right after the 202
    rid = response.json()["requestId"]
    with sqlite3.connect(data_dir / "enginedge.db") as db:
        (status,) = db.execute(
            "SELECT status FROM requests WHERE id = ?", (rid.replace("-", ""),)
        ).fetchone()
    assert status in ("PENDING", "DISPATCHED", "PROCESSING")
    second = serve(data_dir, port, API_KEYS=KEY)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            body = httpx.get(f"{second.url}/api/requests/{rid}", headers={"X-API-Key": KEY}).json()
            if body["status"] == "COMPLETED":
                break
            assert body["status"] not in ("FAILED", "TIMEOUT", "CANCELLED"), body
            time.sleep(0.2)
        assert body["status"] == "COMPLETED", body
        assert body["result"] == {"columns": ["n"], "rows": [[142857143]]}
    finally:
        assert stop_process(second.process) == 0  # SIGTERM: a clean exit


def _bench(tmp_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`enginedge bench` with ``args``, in a process of its own with the test's settings."""
    return subprocess.run(
        [sys.executable, "-m", "enginedge", "bench", *args],
        env=_env(tmp_path, free_port()),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_bench_short_form_reports_every_round_trip(tmp_path: Path) -> None:
    """`enginedge bench` starts its own service, drives it and reports; no timing asserted."""
    result = _bench(
        tmp_path,
        *("--requests", "60", "--concurrency", "4", "--warmup", "5", "--json"),
        *("--log-dir", str(tmp_path / "logs")),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    report = orjson.loads(result.stdout)
    assert (report["completed"], report["errors"], report["mode"]) == (60, 0, "embedded")
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert report["throughput"] > 0
    assert report["orchestrator_cpu_seconds"] > 0
    assert report["orchestrator_peak_rss_mb"] > 10
    # The machine's CPU holds the orchestrator's and the client's, each named.
    by_process = report["cpu_seconds_by_process"]
    assert by_process["orchestrator"] > 0 and by_process["client"] > 0
    assert report["machine_cpu_seconds"] >= by_process["orchestrator"] * 0.9
    assert report["machine_cores"] >= 1
    assert (tmp_path / "logs" / "orchestrator.log").exists()


def test_bench_refuses_distributed_mode_without_its_services(tmp_path: Path) -> None:
    result = _bench(tmp_path, "--mode", "distributed")
    assert result.returncode == 3
    assert "needs --database-url and --kafka-brokers" in result.stderr
    assert "Traceback" not in result.stderr


def test_bench_with_failed_round_trips_exits_non_zero_also_with_json(tmp_path: Path) -> None:
    """Every round trip fails (nothing listens there): the figures still come, with the
    errors counted and named, and the exit code says the run failed, as the table's does."""
    result = _bench(
        tmp_path,
        *("--mode", "external", "--json", "--api-key", "bench-key-1"),
        *("--url", f"http://127.0.0.1:{free_port()}"),
        *("--requests", "5", "--concurrency", "2", "--warmup", "0"),
    )
    assert result.returncode == 3, result.stderr
    report = orjson.loads(result.stdout)
    assert (report["completed"], report["errors"]) == (0, 5)
    assert any("Cannot connect" in sample for sample in report["error_samples"])
    assert "Traceback" not in result.stderr
