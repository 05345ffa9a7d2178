"""How much the request-status cache spares PostgreSQL: database transactions per status read.

Run from the repository root (it starts its own PostgreSQL and Redis, as the tests do):

    .venv/bin/python -m benchmarks.status_cache            # or --reads 20000 --concurrency 64

For each cache mode, one service (uvicorn in this process, the built-in data-processing
worker, the service's default timings) gets ``--requests`` ``echo`` requests and waits for
them to finish; then ``--concurrency`` callers send ``--reads`` ``GET /api/requests/{id}``
over those finished requests. The figure is PostgreSQL's own count of committed and
rolled-back transactions in the service's database (``pg_stat_database``) during the reads,
minus what the service does on its own while idle for as long (sweeps, heartbeats, relay),
per status read. Modes:

- ``off``: no request cache at all (a pass-through put in place of the in-process one);
- ``in-process``: no ``REDIS_URL``, each replica keeps finished requests in its memory;
- ``redis``: ``REDIS_URL`` set, finished requests are shared by every replica.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
from tests.support.harness import API_KEY, run_service
from tests.support.servers import postgres_server, redis_server

from enginedge.config import Settings
from enginedge.domain.model import Request

# PostgreSQL 15 backends report their counters at most every second, and idle ones within
# ten: wait this long before reading them.
STATS_DELAY = 11.0


class NoRequestCache:
    """A request cache that keeps nothing: every status read goes to the store."""

    async def get(self, request_id: uuid.UUID) -> Request | None:
        return None

    async def put(self, request: Request) -> None:
        return None


async def transactions(admin_url: str, database: str) -> int:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        value = await conn.fetchval(
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            database,
        )
        return int(value)
    finally:
        await conn.close()


async def measure(
    mode: str, admin_url: str, redis_url: str, requests: int, reads: int, concurrency: int
) -> dict[str, float]:
    database = f"bench_{mode.replace('-', '_')}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await conn.execute(f'CREATE DATABASE "{database}"')
    finally:
        await conn.close()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            environment="test",
            database_url=admin_url.rsplit("/", 1)[0] + "/" + database,
            redis_url=redis_url if mode == "redis" else None,
            api_keys=API_KEY,
            data_dir=Path(tmp),
            data_root=Path(tmp),
            log_level="warn",
            rate_limit_requests=10_000_000,
        )
        async with run_service(settings) as svc:
            if mode == "off":
                svc.service.ctx.request_cache = NoRequestCache()
            headers = {"X-API-Key": API_KEY}
            ids = []
            for i in range(requests):
                response = await svc.client.post(
                    "/api/orchestrate",
                    json={"taskType": "echo", "payload": {"i": i}},
                    headers=headers,
                )
                response.raise_for_status()
                ids.append(response.json()["requestId"])
            for rid in ids:  # long polling: back when finished
                await svc.client.get(f"/api/requests/{rid}?wait=30", headers=headers)

            await asyncio.sleep(STATS_DELAY)
            before = await transactions(admin_url, database)
            started = time.monotonic()
            queue = [ids[i % len(ids)] for i in range(reads)]

            async def caller(client: httpx.AsyncClient) -> None:
                while queue:
                    rid = queue.pop()
                    response = await client.get(f"/api/requests/{rid}", headers=headers)
                    response.raise_for_status()

            async with httpx.AsyncClient(base_url=svc.url, timeout=30) as client:
                await asyncio.gather(*(caller(client) for _ in range(concurrency)))
            elapsed = time.monotonic() - started
            await asyncio.sleep(STATS_DELAY)
            during = await transactions(admin_url, database)
            # The same span again with nothing to do: what the service does by itself.
            await asyncio.sleep(elapsed + STATS_DELAY)
            idle = await transactions(admin_url, database)
    load = (during - before) - (idle - during)
    return {
        "reads": reads,
        "seconds": round(elapsed, 2),
        "reads_per_second": round(reads / elapsed),
        "transactions": max(load, 0),
        "transactions_per_read": round(max(load, 0) / reads, 3),
        "background_transactions": idle - during,
    }


@contextlib.contextmanager
def servers() -> Iterator[tuple[str, str]]:
    with postgres_server() as pg, redis_server() as redis:
        yield pg.url, f"redis://127.0.0.1:{redis.port}/0"


async def main(args: argparse.Namespace) -> None:
    with servers() as (admin_url, redis_url):
        print(
            f"{args.requests} finished requests, {args.reads} status reads by "
            f"{args.concurrency} concurrent callers"
        )
        print("| cache | reads/s | PostgreSQL transactions | per status read |")
        print("|---|---|---|---|")
        for mode in ("off", "in-process", "redis"):
            r = await measure(
                mode, admin_url, redis_url, args.requests, args.reads, args.concurrency
            )
            print(
                f"| {mode} | {r['reads_per_second']} | {r['transactions']} "
                f"| {r['transactions_per_read']} |",
                flush=True,
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--reads", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=32)
    asyncio.run(main(parser.parse_args()))
