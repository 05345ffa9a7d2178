"""The scenarios of docs/performance.md: `enginedge bench` runs, medians of several.

Run from the repository root; it starts its own servers for distributed mode (PostgreSQL
with its durable defaults, the tansu Kafka-protocol broker, Redis), as the tests do:

    .venv/bin/python -m benchmarks.run                       # every scenario, 3 runs each
    .venv/bin/python -m benchmarks.run --runs 5 --requests 10000
    .venv/bin/python -m benchmarks.run --scenario distributed-64

Each run is a separate `enginedge bench --json` process (the client), which starts the
orchestrator (and in distributed mode one worker process) itself. The figures of every run
and their medians go to benchmarks/results/<timestamp>.json and a Markdown table to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.conftest import create_database
from tests.support.servers import Restartable, kafka_broker, postgres_server, redis_server

# name: (mode, requests in flight, flow). "submit-wait": the submit answers with the
# outcome (POST /api/orchestrate?wait=); "poll": a 202, then GET /api/requests/{id}?wait=.
SCENARIOS = {
    "embedded-64": ("embedded", 64, "submit-wait"),
    "embedded-1": ("embedded", 1, "submit-wait"),
    "distributed-64": ("distributed", 64, "submit-wait"),
    "distributed-1": ("distributed", 1, "submit-wait"),
    "distributed-64-poll": ("distributed", 64, "poll"),
}
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Servers:
    """The servers of distributed mode, each on a free port."""

    admin_url: str
    brokers: str
    redis_url: str
    broker: Restartable

    def fresh_run(self) -> str:
        """A new database, and an empty broker, for the next run: tansu keeps its log in
        memory and slows down as it grows, so without it each run would start behind the
        last. Its URL."""
        self.broker.restart()
        return asyncio.run(create_database(self.admin_url))


@contextlib.contextmanager
def distributed_servers() -> Iterator[Servers]:
    """PostgreSQL (durable commits), the broker and Redis, each on a free port."""
    with postgres_server(durable=True) as pg, kafka_broker() as broker, redis_server() as redis:
        yield Servers(
            admin_url=pg.url,
            brokers=f"127.0.0.1:{broker.port}",
            redis_url=f"redis://127.0.0.1:{redis.port}/0",
            broker=broker,
        )


def bench(mode: str, concurrency: int, flow: str, requests: int, servers: Servers | None) -> Any:
    """One `enginedge bench` run; its JSON report."""
    args = [sys.executable, "-m", "enginedge", "bench", "--json", "--mode", mode, "--flow", flow]
    args += ["--concurrency", str(concurrency), "--requests", str(requests)]
    if mode == "distributed":
        assert servers is not None
        database = servers.fresh_run()
        args += ["--database-url", database, "--kafka-brokers", servers.brokers]
        args += ["--redis-url", servers.redis_url]
    done = subprocess.run(args, capture_output=True, text=True, check=False)  # noqa: S603
    # A run with errors still prints its figures (and exits 3): they are counted in the table.
    if done.returncode != 0 and not done.stdout.strip():
        raise SystemExit(f"bench failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout)


def median_of(runs: list[Any]) -> dict[str, Any]:
    """Medians of the figures that matter, over ``runs``."""
    return {
        "throughput": statistics.median(r["throughput"] for r in runs),
        **{
            f"latency_{q}_ms": statistics.median(r["latency_ms"][q] for r in runs)
            for q in ("p50", "p95", "p99", "max")
        },
        "orchestrator_cpu_ms_per_request": statistics.median(
            1000 * r["orchestrator_cpu_seconds"] / r["completed"] for r in runs
        ),
        "orchestrator_peak_rss_mb": statistics.median(r["orchestrator_peak_rss_mb"] for r in runs),
        # Everything on the machine (client, worker, servers) per round trip, and the
        # throughput its cores would carry at that cost.
        "machine_cpu_ms_per_request": statistics.median(
            1000 * r["machine_cpu_seconds"] / r["completed"] for r in runs
        ),
        "cpu_bound_throughput": statistics.median(
            r["machine_cores"] * r["completed"] / r["machine_cpu_seconds"] for r in runs
        ),
        "cpu_ms_per_request_by_process": {
            name: statistics.median(
                1000 * r["cpu_seconds_by_process"].get(name, 0.0) / r["completed"] for r in runs
            )
            for name in {name for r in runs for name in r["cpu_seconds_by_process"]}
        },
        "errors": sum(r["errors"] for r in runs),
    }


def table(medians: dict[str, dict[str, Any]]) -> str:
    lines = [
        "| scenario | round trips/s | p50 ms | p95 ms | p99 ms | max ms | CPU ms/request "
        "| peak RSS MB | machine CPU ms/request | all cores would carry /s | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in medians.items():
        lines.append(
            f"| {name} | {m['throughput']:.0f} | {m['latency_p50_ms']:.1f} "
            f"| {m['latency_p95_ms']:.1f} | {m['latency_p99_ms']:.1f} | {m['latency_max_ms']:.1f} "
            f"| {m['orchestrator_cpu_ms_per_request']:.2f} | {m['orchestrator_peak_rss_mb']:.0f} "
            f"| {m['machine_cpu_ms_per_request']:.2f} | {m['cpu_bound_throughput']:.0f} "
            f"| {m['errors']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--scenario", choices=sorted(SCENARIOS), action="append")
    options = parser.parse_args()
    chosen = options.scenario or list(SCENARIOS)
    runs: dict[str, list[Any]] = {}
    with contextlib.ExitStack() as stack:
        servers = None
        if any(SCENARIOS[name][0] == "distributed" for name in chosen):
            servers = stack.enter_context(distributed_servers())
        for name in chosen:
            mode, concurrency, flow = SCENARIOS[name]
            # One at a time is slow by nature: fewer round trips give the same quantiles.
            count = options.requests if concurrency > 1 else max(options.requests // 5, 200)
            runs[name] = []
            for i in range(options.runs):
                report = bench(mode, concurrency, flow, count, servers)
                runs[name].append(report)
                print(
                    f"{name} run {i + 1}: {report['throughput']} round trips/s, "
                    f"p50 {report['latency_ms']['p50']} ms",
                    file=sys.stderr,
                )
    medians = {name: median_of(r) for name, r in runs.items()}
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{stamp}.json").write_text(
        json.dumps({"runs": runs, "medians": medians}, indent=2) + "\n"
    )
    print(table(medians))


if __name__ == "__main__":
    main()
