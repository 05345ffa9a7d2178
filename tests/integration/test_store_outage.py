"""PostgreSQL going away: clear 503s (never a 500 or a hang), nothing lost, recovery alone."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.harness import API_KEY, fast_settings, run_service
from tests.support.servers import postgres_server
from tests.support.workers import Probe, worker_for_tests

H = {"X-API-Key": API_KEY}


async def test_database_down_is_503_then_recovers(tmp_path: Path) -> None:
    with postgres_server() as pg:
        settings = fast_settings(tmp_path, pg.url, builtin_workers="none")
        async with run_service(settings, [worker_for_tests(Probe())]) as svc:
            before = (await svc.submit("test.echo", {"n": 1})).json()["requestId"]
            assert (await svc.wait_terminal(before))["status"] == "COMPLETED"

            pg.stop()
            submitted = await svc.submit("test.echo", {"n": 2})
            assert submitted.status_code == 503, submitted.text
            assert submitted.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            assert submitted.headers["Retry-After"]
            # A finished request is still answered, from the cache; a listing needs the store.
            cached = await svc.client.get(f"/api/requests/{before}", headers=H)
            assert cached.status_code == 200
            assert cached.json()["status"] == "COMPLETED"
            listing = await svc.client.get("/api/requests", headers=H)
            assert listing.status_code == 503
            assert listing.json()["error"]["code"] == "SERVICE_UNAVAILABLE"
            ready = await svc.client.get("/ready")
            assert ready.status_code == 503
            assert ready.json()["components"]["database"]["status"] == "down"
            assert (await svc.client.get("/live")).status_code == 200

            await asyncio.to_thread(pg.restart)
            for _ in range(100):
                if (await svc.client.get("/ready")).status_code == 200:
                    break
                await asyncio.sleep(0.1)
            after = await svc.submit("test.echo", {"n": 3})
            assert after.status_code == 202, after.text
            assert (await svc.wait_terminal(after.json()["requestId"]))["status"] == "COMPLETED"
