"""A worker's own ``/health`` endpoint, which the orchestrator checks actively."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from enginedge.adapters.http.serving import serving
from enginedge.domain.model import WorkerStatus
from enginedge.worker.runtime import WorkerRuntime


def health_app(runtime: WorkerRuntime) -> Starlette:
    """200 while the worker is HEALTHY or DRAINING, 503 while it says it is UNHEALTHY."""

    async def health(request: Request) -> JSONResponse:
        unhealthy = runtime.status is WorkerStatus.UNHEALTHY
        body = {
            "status": runtime.status.value,
            "workerId": runtime.id,
            "type": runtime.app.type,
            "active": runtime.active,
            "capacity": runtime.app.capacity,
            "reason": runtime.reason if unhealthy else None,
        }
        return JSONResponse(body, status_code=503 if unhealthy else 200)

    return Starlette(routes=[Route("/health", health)])


@contextlib.asynccontextmanager
async def serving_health(runtime: WorkerRuntime, host: str, port: int) -> AsyncIterator[None]:
    """Serve ``/health`` on ``host:port`` for as long as the block runs."""
    async with serving(health_app(runtime), host, port):
        yield
