"""The uvicorn server of the service, and serving an ASGI app from inside a running event
loop (worker health, tests)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal

import uvicorn


class Server(uvicorn.Server):
    """A uvicorn server that tells the app the moment it starts shutting down.

    uvicorn waits for open requests before the app's lifespan hears of the shutdown; a
    long-polling caller would hold it until uvicorn's grace ran out, then get a 500.
    ``on_shutdown`` runs first, so that such callers are answered at once.
    """

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_shutdown = on_shutdown

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._on_shutdown()
        await super().shutdown(sockets)


@contextlib.asynccontextmanager
async def serving(
    app: Any,
    host: str,
    port: int,
    *,
    lifespan: Literal["on", "off"] = "off",
    on_shutdown: Callable[[], None] = lambda: None,
) -> AsyncIterator[uvicorn.Server]:
    """Serve ``app`` on ``host:port`` for as long as the block runs (``on_shutdown`` as for
    :class:`Server`). Signals stay with the caller's process: uvicorn does not take SIGTERM
    or SIGINT here."""
    config = uvicorn.Config(
        app, host=host, port=port, log_config=None, access_log=False, lifespan=lifespan
    )
    server = Server(config, on_shutdown)
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
