"""Running one attempt of a request: the handler, its deadline, and what it reports.

Each attempt reports ``progress`` seq 0 when it starts (unless it ends or reports sooner),
any partial results, then ``completed`` or ``failed``, through a :class:`ResultReporter`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from enginedge.application.ports import BusMessage, MessageBus
from enginedge.domain.messages import RESULTS_TOPIC, ResultKind, ResultMessage
from enginedge.worker.app import JSON, Task, TaskFailed, WorkerApp
from enginedge.worker.threads import run_in_daemon_thread

log = logging.getLogger(__name__)
# How long a task runs before the worker says it started (see AttemptRunner.run).
START_REPORT_DELAY = 0.02

Headers = Mapping[str, str]


class ResultReporter:
    """Publishes one worker's reports on ``worker.results``."""

    def __init__(self, bus: MessageBus, worker_id: str, clock: Callable[[], datetime]) -> None:
        self._bus = bus
        self._worker_id = worker_id
        self._clock = clock

    def _message(
        self, task: Task, kind: ResultKind, seq: int, headers: Headers, **fields: Any
    ) -> BusMessage:
        message = ResultMessage(
            request_id=task.request_id,
            attempt=task.attempt,
            worker_id=self._worker_id,
            kind=kind,
            seq=seq,
            **fields,
        )
        return BusMessage(RESULTS_TOPIC, str(task.request_id), message.to_json(), dict(headers))

    async def progress(self, task: Task, seq: int, headers: Headers, chunk: Any) -> None:
        """Partial results are best effort: a lost one never fails the task."""
        try:
            await self._bus.publish([self._message(task, "progress", seq, headers, chunk=chunk)])
        except Exception:
            log.warning("progress not sent", extra={"requestId": str(task.request_id)})

    async def outcome(
        self,
        task: Task,
        seq: int,
        headers: Headers,
        *,
        result: JSON | None = None,
        error: str | None = None,
        processing_time: int,
    ) -> None:
        """Publish the outcome, retrying while the bus is down, until the request's deadline
        (after it the orchestrator has timed the request out and would ignore it)."""
        kind: ResultKind = "completed" if error is None else "failed"
        try:
            message = self._message(
                task,
                kind,
                seq,
                headers,
                result=result,
                error=error,
                processing_time_ms=processing_time,
            )
        except (TypeError, ValueError) as exc:  # e.g. an integer over 64 bits, a set
            message = self._message(
                task,
                "failed",
                seq,
                headers,
                error=f"the handler's result cannot be sent as JSON: {exc}",
                processing_time_ms=processing_time,
            )
        delay = 0.1
        while True:
            try:
                await self._bus.publish([message])
                return
            except Exception as exc:
                if self._clock() >= task.deadline:
                    log.warning(
                        "outcome not delivered before the deadline",
                        extra={"requestId": str(task.request_id), "error": str(exc)},
                    )
                    return
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)


class Attempt:
    """An attempt in progress, as the runtime tracks it."""

    def __init__(self, task: Task) -> None:
        self.task = task
        self.job: asyncio.Task[None] | None = None
        self.seq = 0
        # Stopped on purpose (cancelled, or given up): its outcome is not reported.
        self.stopped = False
        self.last_progress = time.monotonic()

    def stop(self) -> None:
        self.stopped = True
        if self.job is not None:
            self.job.cancel()


class AttemptRunner:
    """Runs attempts of one worker app's handlers and reports them."""

    def __init__(
        self,
        app: WorkerApp,
        worker_id: str,
        reporter: ResultReporter,
        clock: Callable[[], datetime],
    ) -> None:
        self._app = app
        self._worker_id = worker_id
        self._reporter = reporter
        self._clock = clock

    async def run(self, attempt: Attempt, headers: Headers) -> None:
        task = attempt.task
        started = time.perf_counter()
        # A task that ends (or reports progress) within START_REPORT_DELAY says nothing
        # else first: its first message starts it at the orchestrator too, one message
        # where there were two for every short task.
        announce = asyncio.create_task(self._announce(task, headers))

        async def report(chunk: Any) -> None:
            attempt.last_progress = time.monotonic()
            if chunk is None:  # task.heartbeat(): alive, nothing to show
                return
            announce.cancel()
            attempt.seq += 1
            await self._reporter.progress(task, attempt.seq, headers, chunk)

        task.reporter = report
        try:
            try:
                result = await self._call(task)
            finally:
                announce.cancel()  # what comes next tells the outcome
        except asyncio.CancelledError:
            task.interrupt()
            if not attempt.stopped:
                raise  # the runtime is being killed: report nothing, as a crash would
            return  # cancelled by the orchestrator, which has already recorded it
        except TimeoutError:
            task.interrupt()  # past the deadline the orchestrator has timed it out
            return
        except Exception as exc:
            error = str(exc) if isinstance(exc, TaskFailed) else f"{type(exc).__name__}: {exc}"
            await self._reporter.outcome(
                task, attempt.seq + 1, headers, error=error, processing_time=_ms(started)
            )
            return
        elapsed = _ms(started)
        await self._reporter.outcome(
            task, attempt.seq + 1, headers, result=result, processing_time=elapsed
        )
        log.info(
            "request processed",
            extra={
                "requestId": str(task.request_id),
                "workerType": self._app.type,
                "processingTime": elapsed,
                "correlationId": headers.get("correlation-id"),
                "workerId": self._worker_id,
            },
        )

    async def _call(self, task: Task) -> JSON:
        spec = self._app.handlers.get(task.task_type)
        if spec is None:
            raise TaskFailed(
                f"worker type {self._app.type} cannot handle task type {task.task_type}"
            )
        remaining = max((task.deadline - self._clock()).total_seconds(), 0.001)
        call = (
            run_in_daemon_thread(spec.handler, task, f"{self._app.type}-{task.request_id}")
            if spec.blocking
            else spec.handler(task)
        )
        async with asyncio.timeout(remaining):
            result = await call  # type: ignore[misc]
        if not isinstance(result, dict):
            raise TaskFailed(f"the handler returned {type(result).__name__}, not an object")
        return result

    async def _announce(self, task: Task, headers: Headers) -> None:
        await asyncio.sleep(START_REPORT_DELAY)
        await self._reporter.progress(task, 0, headers, None)  # "started"


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
