"""Declaring a worker: its type, capacity and handlers."""

from __future__ import annotations

import contextlib
import inspect
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

JSON = dict[str, Any]


class TaskFailed(Exception):
    """Raise from a handler to fail the request with exactly this message."""


# Told of a task's partial results; ``None`` only says the task is alive.
Reporter = Callable[[Any], Awaitable[None]]


@dataclass(slots=True)
class Task:
    """One attempt of a request, as a handler sees it. The runtime gives it a ``reporter``
    for what the handler reports; a task without one (a unit test's) reports nowhere."""

    request_id: uuid.UUID
    attempt: int
    task_type: str
    payload: JSON
    metadata: JSON
    deadline: datetime
    reporter: Reporter | None = field(default=None, repr=False)
    _on_cancel: list[Callable[[], None]] = field(default_factory=list, repr=False)

    async def progress(self, chunk: Any) -> None:
        """Send a partial result (e.g. a few LLM tokens) to whoever follows the request."""
        if self.reporter is not None and chunk is not None:
            await self.reporter(chunk)

    async def heartbeat(self) -> None:
        """Say the task is alive without a partial result. A task that goes longer than its
        worker's ``stall_timeout`` without ``progress`` or ``heartbeat`` counts as stuck."""
        if self.reporter is not None:
            await self.reporter(None)

    def on_cancel(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` if the request is cancelled or times out (e.g. to interrupt a
        query running in a thread, which asyncio cannot interrupt by itself)."""
        self._on_cancel.append(callback)

    def interrupt(self) -> None:
        """Run the ``on_cancel`` callbacks (the runtime does, when it stops the attempt);
        one that raises does not keep the others from running."""
        for callback in self._on_cancel:
            with contextlib.suppress(Exception):
                callback()


Handler = Callable[[Task], Awaitable[JSON]] | Callable[[Task], JSON]


@dataclass(frozen=True, slots=True)
class TaskSpec:
    handler: Handler
    blocking: bool  # a plain function: run it in a thread so the event loop stays free


class WorkerApp:
    """A worker type and its handlers; run it with :class:`WorkerRuntime`."""

    def __init__(
        self, worker_type: str, *, capacity: int = 4, stall_timeout: float = 600.0
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.type = worker_type
        self.capacity = capacity
        self.stall_timeout = stall_timeout
        self.handlers: dict[str, TaskSpec] = {}

    def task(self, task_type: str) -> Callable[[Handler], Handler]:
        """Register the decorated function (async, or plain for blocking work) for a type."""

        def register(handler: Handler) -> Handler:
            self.handlers[task_type] = TaskSpec(
                handler, blocking=not inspect.iscoroutinefunction(handler)
            )
            return handler

        return register

    @property
    def capabilities(self) -> list[str]:
        return sorted(self.handlers)
