"""Run a real service (uvicorn on a free port, in the test's event loop) and talk to it."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from enginedge.adapters.http.serving import serving
from enginedge.config import Settings
from enginedge.entrypoints.asgi import build_app
from enginedge.service import Service
from enginedge.worker import WorkerApp
from tests.support.servers import free_port

API_KEY = "test-key-0123456789"
OTHER_KEY = "other-key-0123456789"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}
# The reasons of enginedge_redispatches_total.
REDISPATCH = ("worker_lost", "result_lost", "abandoned", "restart")


def fast_settings(data_dir: Path, database_url: str | None = None, **overrides: Any) -> Settings:
    """Settings with short timings, so that timeouts and lost workers show within seconds."""
    base = Settings(
        environment="test",
        database_url=database_url,
        api_keys=f"{API_KEY},{OTHER_KEY}",
        data_dir=data_dir,
        data_root=data_dir,
        sweep_interval=0.1,
        worker_heartbeat_interval=0.2,
        worker_heartbeat_ttl=1.0,
        retry_backoff=0.05,
        db_connect_retries=0,
        log_level="warn",
    )
    return replace(base, **overrides)


@dataclass
class Running:
    url: str
    app: FastAPI
    client: httpx.AsyncClient
    server: uvicorn.Server

    @property
    def service(self) -> Service:
        service: Service = self.app.state.service
        return service

    async def submit(
        self,
        task_type: str,
        payload: dict[str, Any],
        *,
        metadata: dict[str, Any] | None = None,
        key: str = API_KEY,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        body: dict[str, Any] = {"taskType": task_type, "payload": payload}
        if metadata is not None:
            body["metadata"] = metadata
        return await self.client.post(
            "/api/orchestrate", json=body, headers={"X-API-Key": key, **(headers or {})}
        )

    async def get(self, request_id: str) -> dict[str, Any]:
        response = await self.client.get(
            f"/api/requests/{request_id}", headers={"X-API-Key": API_KEY}
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    async def wait_for(
        self, request_id: str, predicate: Callable[[dict[str, Any]], bool], timeout: float = 15.0
    ) -> dict[str, Any]:
        """Poll the public API until ``predicate`` holds for the request."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            body = await self.get(request_id)
            if predicate(body):
                return body
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"request never matched; last seen: {body}")
            await asyncio.sleep(0.02)

    def redispatches(self) -> dict[str, float]:
        """Attempts dispatched again so far, by reason (only the reasons that happened)."""
        value = self.service.metrics.registry.get_sample_value
        counts = {r: value("enginedge_redispatches_total", {"reason": r}) for r in REDISPATCH}
        return {r: n for r, n in counts.items() if n}

    async def wait_terminal(self, request_id: str, timeout: float = 15.0) -> dict[str, Any]:
        return await self.wait_for(request_id, lambda b: b["status"] in TERMINAL, timeout)


@contextlib.asynccontextmanager
async def run_service(
    settings: Settings, workers: list[WorkerApp] | None = None, port: int | None = None
) -> AsyncIterator[Running]:
    """Start the whole service (lifespan, loops, workers) on ``port`` (else a free one);
    stop it after."""
    app = build_app(settings, workers)
    service: Service = app.state.service
    port = port or free_port()
    async with (
        serving(
            app, "127.0.0.1", port, lifespan="on", on_shutdown=service.begin_shutdown
        ) as server,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
    ):
        yield Running(f"http://127.0.0.1:{port}", app, client, server)


def unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def wait_worker(
    url: str,
    http: httpx.AsyncClient,
    worker_id: str,
    status: str = "HEALTHY",
    *,
    timeout: float = 60,
    headers: dict[str, str] | None = None,
) -> None:
    """Until the registry shows ``worker_id`` with ``status``: a worker back from a fault,
    say, heartbeats again and passes a health check before it is HEALTHY, and until then
    new work is refused. ``headers`` authenticate (default: this harness's API key)."""
    deadline = time.monotonic() + timeout
    body: dict[str, Any] = {}
    while time.monotonic() < deadline:
        answer = await http.get(
            f"{url}/api/workers/{worker_id}", headers=headers or {"X-API-Key": API_KEY}
        )
        assert answer.status_code != 401, answer.text  # the wrong key: no use waiting
        body = answer.json()
        if body.get("status") == status:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"worker {worker_id} not {status} within {timeout:g}s: {body}")


async def until(what: str, check: Callable[[], Awaitable[Any]], timeout: float = 20.0) -> None:
    """Poll the coroutine function ``check`` until it returns true."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
