"""Plain-function handlers, each on a daemon thread of its own.

Not ``asyncio.to_thread``: the loop's default executor has ``min(32, cores + 4)`` threads (six
on a 2-core machine), fewer than a worker's capacity may be, and a handler stuck in one of them
keeps the process from exiting, since ``asyncio.run`` joins the executor's threads at the end
and so does the interpreter. A thread cannot be stopped from outside; a daemon one at least
never holds the process open after its worker was told to stop. anyio's worker threads are not
daemon threads either.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import threading
from collections.abc import Callable
from typing import TypeVar

A = TypeVar("A")
R = TypeVar("R")


async def run_in_daemon_thread(function: Callable[[A], R], argument: A, name: str) -> R:
    """``function(argument)`` on a new daemon thread, in a copy of the caller's context.

    Cancelling the caller abandons the thread: it runs on until ``function`` returns, and
    what it returns then is dropped.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[R] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: R | None, error: BaseException | None) -> None:
        if future.done():  # the caller was cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result, error = context.run(function, argument), None
        except BaseException as exc:  # handed to the caller, which decides
            result, error = None, exc
        # The loop may be closed by the time an abandoned handler returns.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
