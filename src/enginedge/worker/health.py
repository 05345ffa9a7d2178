"""A worker's own ``/health`` endpoint, which the orchestrator checks actively."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from enginedge.worker.runtime import WorkerRuntime


def health_app(runtime: WorkerRuntime) -> Starlette:
    """200 while the worker is HEALTHY or DRAINING, 503 while it says it is UNHEALTHY."""

    async def health(request: Request) -> JSONResponse:
        body = {
            "status": runtime.status,
            "workerId": runtime.id,
            "type": runtime.app.type,
            "active": runtime.active,
            "capacity": runtime.app.capacity,
            "reason": runtime.reason if runtime.status == "UNHEALTHY" else None,
        }
        return JSONResponse(body, status_code=503 if runtime.status == "UNHEALTHY" else 200)

    return Starlette(routes=[Route("/health", health)])


@contextlib.asynccontextmanager
async def serving_health(runtime: WorkerRuntime, host: str, port: int) -> AsyncIterator[None]:
    """Serve ``/health`` on ``host:port`` for as long as the block runs."""
    config = uvicorn.Config(
        health_app(runtime), host=host, port=port, log_config=None, access_log=False, lifespan="off"
    )
    server = uvicorn.Server(config)
    # The worker process owns SIGTERM (it drains); uvicorn must not take the signals.
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(), name="worker-health")
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError(f"the health endpoint could not listen on {host}:{port}")
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
