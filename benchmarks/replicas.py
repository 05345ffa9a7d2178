"""One orchestrator replica against two, on this one machine (docs/performance.md).

Distributed mode, 64 requests in flight in all: with two replicas, one `enginedge bench
--mode external` client per replica with half the requests in flight each. The same servers
(PostgreSQL with its durable defaults, tansu emptied before each run, Redis) and one worker
process serve each run, alternating one and two replicas:

    .venv/bin/python -m benchmarks.replicas                 # 1, 2, 1, 2 replicas
    .venv/bin/python -m benchmarks.replicas --requests 4000 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.run import Servers, distributed_servers
from tests.support.servers import free_port

from enginedge.entrypoints.bench import wait_ready
from enginedge.entrypoints.processes import stop_process

KEY = "bench-replicas-key"
IN_FLIGHT = 64


def _enginedge(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(  # noqa: S603 - our own command
            [sys.executable, "-m", "enginedge", *args], env=env, stdout=out, stderr=out
        )


@contextlib.contextmanager
def cluster(replicas: int, servers: Servers, logs: Path) -> Iterator[tuple[list[str], str]]:
    """``replicas`` orchestrators and one worker on a fresh database and broker; their URLs,
    and the database's."""
    database_url = servers.fresh_run()
    env = dict(
        os.environ,
        DATABASE_URL=database_url,
        KAFKA_BROKERS=servers.brokers,
        REDIS_URL=servers.redis_url,
        API_KEYS=KEY,
        HOST="127.0.0.1",
        LOG_LEVEL="warn",
        RATE_LIMIT_REQUESTS="100000000",
        ENGINEDGE_DATA_DIR=str(logs),
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        replicas_at: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
        for i in range(replicas):
            port, log = free_port(), logs / f"o{i}.log"
            processes.append(_enginedge(["serve"], {**env, "PORT": str(port)}, log))
            replicas_at[f"http://127.0.0.1:{port}"] = (processes[-1], log)
        worker = ["worker", "--type", "data-processing", "--capacity", "256"]
        processes.append(_enginedge(worker, env, logs / "worker.log"))
        for url, (process, log) in replicas_at.items():
            wait_ready(url, KEY, process, log)
        yield list(replicas_at), database_url
    finally:
        for process in processes:
            stop_process(process, timeout=60)


def measure(replicas: int, requests: int, servers: Servers, logs: Path) -> dict[str, Any]:
    """Round trips/s of ``replicas`` replicas driven at once, and the machine's CPU."""
    with cluster(replicas, servers, logs) as (urls, _):
        clients = [
            subprocess.Popen(  # noqa: S603 - our own command
                [
                    *(sys.executable, "-m", "enginedge", "bench", "--mode", "external", "--json"),
                    *("--url", url, "--api-key", KEY),
                    *("--concurrency", str(IN_FLIGHT // replicas)),
                    *("--requests", str(requests // replicas)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
            )
            for url in urls
        ]
        reports = [json.loads(client.communicate()[0]) for client in clients]
    completed = sum(r["completed"] for r in reports)
    # The clients ran side by side: each saw the whole machine over (nearly) the same window.
    machine = max(r["machine_cpu_seconds"] for r in reports)
    return {
        "replicas": replicas,
        "throughput": round(sum(r["throughput"] for r in reports)),
        "latency_p50_ms": [r["latency_ms"]["p50"] for r in reports],
        "errors": sum(r["errors"] for r in reports),
        "machine_cpu_ms_per_request": round(1000 * machine / completed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--rounds", type=int, default=2, help="each one replica, then two")
    options = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="enginedge-replicas-") as tmp,
        distributed_servers() as servers,
    ):
        for _ in range(options.rounds):
            for replicas in (1, 2):
                print(json.dumps(measure(replicas, options.requests, servers, Path(tmp))))


if __name__ == "__main__":
    main()
