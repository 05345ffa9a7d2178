"""What a lone request costs in distributed mode, against an idle fleet (docs/performance.md).

One orchestrator and one worker process on the servers of `benchmarks.run` (PostgreSQL with
its durable defaults, tansu, Redis). Three phases, each reporting the share of one core that
every process used, and the CPU milliseconds per round trip above the idle share:

- idle: nothing submitted;
- trickle: one round trip every 0.2 s, so that nothing is ever batched;
- one at a time: round trips back to back (the bench's `--concurrency 1`).

It also counts PostgreSQL's committed transactions per round trip (`pg_stat_database`).

    .venv/bin/python -m benchmarks.lone
    .venv/bin/python -m benchmarks.lone --seconds 20 --requests 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import psutil
from benchmarks.replicas import KEY, cluster
from benchmarks.run import distributed_servers

from enginedge.entrypoints.bench import MachineCpu, drive

TRICKLE_GAP_SECONDS = 0.2
# What is reported: our processes by role, the servers by their processes' names (as
# MachineCpu names them).
WATCHED = {
    "orchestrator": ("orchestrator",),
    "worker": ("worker",),
    "tansu": ("tansu",),
    "postgres": ("postgres",),
    "redis": ("valkey-server", "redis-server"),
}


def _roles() -> dict[int, str]:
    """The orchestrator's and the worker's PIDs, by their commands; the servers go by name."""
    roles = {}
    for child in psutil.Process().children():
        command = " ".join(child.cmdline())
        for role, marker in (("orchestrator", "enginedge serve"), ("worker", "enginedge worker")):
            if marker in command:
                roles[child.pid] = role
    return roles


async def _transactions(database_url: str) -> int:
    connection = await asyncpg.connect(database_url)
    try:
        return int(
            await connection.fetchval(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            )
        )
    finally:
        await connection.close()


def _phase(
    name: str,
    roles: dict[int, str],
    run: Callable[[], int],
    database_url: str,
    idle: dict[str, float] | None,
) -> dict[str, Any]:
    """Run ``run`` (it returns the round trips it made); each watched process's share of a
    core."""
    commits = asyncio.run(_transactions(database_url))
    with MachineCpu(roles) as machine:
        start = time.monotonic()
        round_trips = run()
        seconds = time.monotonic() - start
    # The statistics collector publishes a backend's counts when its transaction ends.
    time.sleep(1.0)
    commits = asyncio.run(_transactions(database_url)) - commits
    share = {
        label: sum(machine.spent.get(n, 0.0) for n in names) / seconds
        for label, names in WATCHED.items()
    }
    report: dict[str, Any] = {
        "phase": name,
        "seconds": round(seconds, 1),
        "round_trips": round_trips,
        "core_percent": {p: round(100 * s, 1) for p, s in share.items()},
    }
    if round_trips and idle is not None:
        rate = round_trips / seconds
        report["cpu_ms_per_round_trip_above_idle"] = {
            p: round(1000 * (share[p] - idle[p]) / rate, 2) for p in WATCHED
        }
        report["transactions_per_round_trip"] = round(commits / round_trips, 2)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10, help="of idle, and of trickle")
    parser.add_argument("--requests", type=int, default=500, help="one at a time")
    options = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="enginedge-lone-") as tmp,
        distributed_servers() as servers,
        cluster(1, servers, Path(tmp)) as (urls, database_url),
    ):
        url = urls[0]
        asyncio.run(drive(url, KEY, 100, 1))  # warm-up: connections, prepared statements
        roles = _roles()

        def idle() -> int:
            time.sleep(options.seconds)
            return 0

        async def trickle() -> int:
            made, deadline = 0, time.monotonic() + options.seconds
            while time.monotonic() < deadline:
                made += len((await drive(url, KEY, 1, 1))[0])
                await asyncio.sleep(TRICKLE_GAP_SECONDS)
            return made

        def back_to_back() -> int:
            return len(asyncio.run(drive(url, KEY, options.requests, 1))[0])

        first = _phase("idle", roles, idle, database_url, None)
        print(json.dumps(first), flush=True)
        share = {role: p / 100 for role, p in first["core_percent"].items()}
        for name, run in (
            ("trickle", lambda: asyncio.run(trickle())),
            ("one at a time", back_to_back),
        ):
            print(json.dumps(_phase(name, roles, run, database_url, share)), flush=True)


if __name__ == "__main__":
    main()
