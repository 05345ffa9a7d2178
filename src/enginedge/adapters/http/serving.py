"""Serving an ASGI app from inside a running event loop (worker health, tests)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Literal

import uvicorn


@contextlib.asynccontextmanager
async def serving(
    app: Any, host: str, port: int, *, lifespan: Literal["on", "off"] = "off"
) -> AsyncIterator[uvicorn.Server]:
    """Serve ``app`` on ``host:port`` for as long as the block runs. Signals stay with the
    caller's process: uvicorn does not take SIGTERM or SIGINT here."""
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan=lifespan
    )
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve(), name=f"serve-{port}")
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError(f"could not serve on {host}:{port}")
            await asyncio.sleep(0.01)
        yield server
    finally:
        server.should_exit = True
        await asyncio.gather(task, return_exceptions=True)
