"""The worker SDK: what a worker node runs to join the fleet (SPEC §5).

A worker declares its type and one handler per task type::

    from enginedge.worker import WorkerApp, Task

    app = WorkerApp("text", capacity=4)

    @app.task("text.upper")
    async def upper(task: Task) -> dict:
        return {"text": task.payload["text"].upper()}

and :class:`WorkerRuntime` does the rest over any message bus: heartbeats, bounded
concurrency, progress, cancellation, deadlines and graceful drain.
"""

from enginedge.worker.app import Handler, Task, TaskFailed, WorkerApp
from enginedge.worker.runtime import WorkerRuntime

__all__ = ["Handler", "Task", "TaskFailed", "WorkerApp", "WorkerRuntime"]
