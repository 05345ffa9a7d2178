"""Workers written with the SDK, for tests that need slow, hanging or chatty tasks."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from enginedge.worker import Task, WorkerApp


@dataclass
class Probe:
    """What the test workers saw, for assertions."""

    started: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    completed: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


def worker_for_tests(
    probe: Probe, capacity: int = 4, worker_type: str = "testing", stall_timeout: float = 600.0
) -> WorkerApp:
    app = WorkerApp(worker_type, capacity=capacity, stall_timeout=stall_timeout)

    async def tracked(task: Task, body: Any) -> dict[str, Any]:
        probe.started.append(str(task.request_id))
        try:
            result: dict[str, Any] = await body
        except asyncio.CancelledError:
            probe.cancelled.append(str(task.request_id))
            raise
        probe.completed.append(str(task.request_id))
        return result

    @app.task("test.echo")
    async def echo(task: Task) -> dict[str, Any]:
        return await tracked(task, asyncio.sleep(0, {"echo": task.payload}))

    @app.task("test.unsendable")
    async def unsendable(task: Task) -> dict[str, Any]:
        return await tracked(task, asyncio.sleep(0, {"n": 2**70}))

    @app.task("test.sleep")
    async def sleep(task: Task) -> dict[str, Any]:
        seconds = float(task.payload.get("seconds", 1))
        return await tracked(task, asyncio.sleep(seconds, {"slept": seconds}))

    @app.task("test.hang")
    async def hang(task: Task) -> dict[str, Any]:
        async def wait() -> dict[str, Any]:
            await probe.release.wait()
            return {"released": True}

        return await tracked(task, wait())

    @app.task("test.hang_first")
    async def hang_first(task: Task) -> dict[str, Any]:
        """Hangs on the first attempt only: a stuck handler that a retry gets past."""
        if task.attempt == 1:
            return await tracked(task, asyncio.Event().wait())  # type: ignore[arg-type]
        return await tracked(task, asyncio.sleep(0, {"attempt": task.attempt}))

    @app.task("test.stream")
    async def stream(task: Task) -> dict[str, Any]:
        count = int(task.payload.get("chunks", 5))
        for i in range(count):
            await task.progress({"text": f"t{i} "})
            await asyncio.sleep(0.01)
        return {"chunks": count}

    return app
