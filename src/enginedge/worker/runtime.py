"""Running a :class:`WorkerApp` against a message bus.

The loop pulls dispatches only while it has a free slot, so a busy worker leaves the rest in
the bus for its peers. Each attempt reports ``progress`` seq 0 when it starts, any partial
results, then ``completed`` or ``failed``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from enginedge.adapters.telemetry.tracing import Tracing
from enginedge.application.ports import BusMessage, MessageBus, Subscription
from enginedge.domain.messages import (
    CONTROL_TOPIC,
    HEARTBEATS_TOPIC,
    RESULTS_TOPIC,
    ControlMessage,
    DispatchMessage,
    HeartbeatMessage,
    MalformedMessage,
    ResultMessage,
    dead_letter,
    dlq_topic,
    new_traceparent,
    requests_topic,
    worker_group,
)
from enginedge.worker.app import JSON, Task, TaskFailed, WorkerApp
from enginedge.worker.threads import run_in_daemon_thread

log = logging.getLogger(__name__)
# How long a task runs before the worker says it started (see WorkerRuntime._handle).
START_REPORT_DELAY = 0.02
# Seconds a stalled worker sits out beyond its bus's rebalance: it leaves its group only on
# the consume loop's next turn (a poll timeout, or a slow LeaveGroup), not at the stall.
REBALANCE_MARGIN = 1.0


def _now() -> datetime:
    return datetime.now(UTC)


class _Running:
    """An attempt in progress."""

    def __init__(self, task: Task, job: asyncio.Task[None]) -> None:
        self.task = task
        self.job = job
        self.seq = 0
        self.cancelled = False
        self.last_progress = time.monotonic()


class WorkerRuntime:
    """Runs one worker process's (or one embedded worker's) share of the fleet."""

    def __init__(
        self,
        app: WorkerApp,
        bus: MessageBus,
        *,
        worker_id: str | None = None,
        endpoint: str | None = None,
        heartbeat_interval: float = 5.0,
        poll_timeout: float = 0.5,
        drain_timeout: float = 30.0,
        clock: Callable[[], datetime] = _now,
        tracing: Tracing | None = None,
    ) -> None:
        self.app = app
        self.bus = bus
        self.id = worker_id or str(uuid.uuid4())
        self.endpoint = endpoint or f"inprocess://{self.id}"
        self.heartbeat_interval = heartbeat_interval
        self.poll_timeout = poll_timeout
        self.drain_timeout = drain_timeout
        self._clock = clock
        self._tracing = tracing or Tracing()
        self._running: dict[uuid.UUID, _Running] = {}
        self._slot_freed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._status = "HEALTHY"
        # Why this worker says it is unhealthy, and until when (monotonic seconds).
        self.reason: str | None = None
        self._unhealthy_until = 0.0
        # Attempts given up without an outcome, told in every heartbeat until the cool-down
        # ends: request id -> (attempt, monotonic deadline).
        self._abandoned: dict[str, tuple[int, float]] = {}
        self._last_poll = time.monotonic()
        # Since when polls with free slots have brought nothing (None: not so now).
        self._empty_since: float | None = None
        self._requests: Subscription | None = None
        self._control: Subscription | None = None
        self.max_active = 0  # highest concurrency seen, for tests and the health endpoint

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        """Free slots, and polls have brought nothing for a while: every dispatch meant
        for this worker has been read (what the orchestrator needs to tell a lost dispatch
        from a queued one)."""
        since = self._empty_since
        return since is not None and time.monotonic() - since >= max(1.0, 2 * self.poll_timeout)

    async def start(self) -> None:
        """Announce the worker and start consuming."""
        self._requests = await self._subscribe_requests()
        # Control messages reach every worker: each one is its own group.
        self._control = await self.bus.subscribe(
            [CONTROL_TOPIC], f"worker-control.{self.id}", urgent=False
        )
        try:
            await self.heartbeat()
        except Exception:  # the heartbeat loop keeps trying; the bus may come up later
            log.warning("first heartbeat not sent", exc_info=True, extra={"workerId": self.id})
        self._tasks = [
            asyncio.create_task(self._consume(), name=f"worker-{self.id}-consume"),
            asyncio.create_task(self._listen_control(), name=f"worker-{self.id}-control"),
            asyncio.create_task(self._beat(), name=f"worker-{self.id}-heartbeat"),
        ]
        log.info(
            "worker started",
            extra={
                "workerId": self.id,
                "workerType": self.app.type,
                "capabilities": self.app.capabilities,
                "capacity": self.app.capacity,
            },
        )

    async def heartbeat(self) -> None:
        message = HeartbeatMessage(
            worker_id=self.id,
            type=self.app.type,
            endpoint=self.endpoint,
            capabilities=self.app.capabilities,
            capacity=self.app.capacity,
            active=self.active,
            status=self.status,
            ts=self._clock(),
            reason=self.reason if self.status == "UNHEALTHY" else None,
            in_flight=[str(r) for r, run in self._running.items() if not run.cancelled],
            idle=self.idle,
            abandoned=self._still_abandoned(),
        )
        headers = {"traceparent": new_traceparent(), "correlation-id": self.id}
        await self.bus.publish([BusMessage(HEARTBEATS_TOPIC, self.id, message.to_json(), headers)])

    def _still_abandoned(self) -> dict[str, int]:
        now = time.monotonic()
        self._abandoned = {r: a for r, a in self._abandoned.items() if a[1] > now}
        return {r: attempt for r, (attempt, _) in self._abandoned.items()}

    @property
    def status(self) -> str:
        """HEALTHY, DRAINING (stopping), or UNHEALTHY (stalled, or cooling down after a
        stall); an unhealthy worker takes no new work."""
        if self._status != "HEALTHY":
            return self._status
        return "UNHEALTHY" if time.monotonic() < self._unhealthy_until else "HEALTHY"

    def check_stalls(self) -> None:
        """Declare this worker unhealthy if a task made no progress within the app's stall
        timeout, or the consumer stopped polling; stalled tasks are abandoned (cancelled,
        not reported) so that the orchestrator gives them to another worker."""
        now = time.monotonic()
        stall = self.app.stall_timeout
        stalled = [r for r in self._running.values() if now - r.last_progress > stall]
        if stalled:
            self._unhealthy(
                f"request {stalled[0].task.request_id} made no progress for {stall:g}s", now
            )
            for running in stalled:
                self._abandon(running, self._unhealthy_until)
        elif now - self._last_poll > max(stall, 30 * self.poll_timeout):
            self._unhealthy("the consumer stopped polling", now)

    def _abandon(self, running: _Running, until: float) -> None:
        """Cancel an attempt without a word of its outcome, and name it in the heartbeats
        until ``until`` so that the orchestrator gives it to another worker at once."""
        running.cancelled = True
        running.job.cancel()
        task = running.task
        self._abandoned[str(task.request_id)] = (task.attempt, until)

    def _unhealthy(self, reason: str, now: float) -> None:
        if self.status != "UNHEALTHY":
            log.warning("worker unhealthy", extra={"workerId": self.id, "reason": reason})
        self.reason = reason
        # Out of rotation long enough for the orchestrator to hear it (two heartbeats), for
        # the abandoned work to go to another worker (a stall timeout's cool-down), and for
        # the rebalance that hands this worker's partitions to the others to end: a worker
        # that joins its group again sooner is part of that rebalance, gets its partitions
        # back, and with them the retry of what it abandoned (same key, same partition).
        self._unhealthy_until = now + max(
            2.5 * self.heartbeat_interval,
            self.app.stall_timeout,
            self.bus.rebalance_seconds + REBALANCE_MARGIN,
        )

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self.check_stalls()
            try:
                await self.heartbeat()
            except Exception:
                log.warning("heartbeat not sent", exc_info=True, extra={"workerId": self.id})

    async def _consume(self) -> None:
        """Take at most as many dispatches as there are free slots; when full, take none
        (they stay in the bus for the other workers) but stay in the consumer group; while
        unhealthy, leave it."""
        while not self._stopping.is_set():
            self._last_poll = time.monotonic()
            free = self.app.capacity - self.active if self.status == "HEALTHY" else 0
            try:
                if self.status == "UNHEALTHY":
                    await self._sit_out()
                    continue
                if self._requests is None:
                    self._requests = await self._subscribe_requests()
                if free <= 0:
                    self._empty_since = None
                    await self._requests.next_batch(0, 0)
                    self._slot_freed.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self.poll_timeout):
                            await self._slot_freed.wait()
                    continue
                batch = await self._requests.next_batch(free, self.poll_timeout)
            except Exception:
                log.warning("cannot read dispatches; retrying", exc_info=True)
                await asyncio.sleep(self.poll_timeout)
                continue
            if not batch:
                self._empty_since = self._empty_since or time.monotonic()
            else:
                self._empty_since = None
            for message in batch:
                await self._start(message)
            if batch:
                try:
                    await self._requests.commit()
                except Exception:  # redelivered later: the orchestrator ignores duplicates
                    log.warning("dispatch offsets not committed", exc_info=True)

    async def _sit_out(self) -> None:
        """Leave the type's consumer group while unhealthy: a member that stays would keep
        its partitions, and every dispatch on them (the abandoned attempt's retry too,
        which has the same key) would wait for this worker's cool-down."""
        self._empty_since = None
        if self._requests is not None:
            subscription, self._requests = self._requests, None
            await subscription.close()
        await asyncio.sleep(self.poll_timeout)

    async def _subscribe_requests(self) -> Subscription:
        topic = requests_topic(self.app.type)
        return await self.bus.subscribe([topic], worker_group(self.app.type))

    async def _start(self, message: BusMessage) -> None:
        try:
            dispatch = DispatchMessage.from_json(message.value)
        except MalformedMessage as exc:
            await self._dead_letter(message, str(exc))
            return
        # A dispatch of a request this worker already finished is run again: the orchestrator
        # sends one again only when no outcome reached it (a lost result), and it ignores a
        # second outcome of the same attempt.
        if dispatch.request_id in self._running or dispatch.deadline <= self._clock():
            return  # already running here (a redelivery), or too late to matter
        task = Task(
            request_id=dispatch.request_id,
            attempt=dispatch.attempt,
            task_type=dispatch.task_type,
            payload=dispatch.payload,
            metadata=dispatch.metadata,
            deadline=dispatch.deadline,
        )
        job = asyncio.create_task(self._run(task, message.headers))
        self._running[task.request_id] = _Running(task, job)
        self.max_active = max(self.max_active, self.active)

    async def _run(self, task: Task, headers: Any) -> None:
        # The handling is a span of the request's trace; what it sends on carries the span.
        with self._tracing.span(
            f"process {task.task_type}",
            headers.get("traceparent"),
            kind="consumer",
            attributes={
                "enginedge.request_id": str(task.request_id),
                "enginedge.attempt": task.attempt,
                "enginedge.worker_type": self.app.type,
            },
        ) as traceparent:
            if traceparent:
                headers = {**headers, "traceparent": traceparent}
            await self._handle(task, headers)

    async def _handle(self, task: Task, headers: Any) -> None:
        running = self._running[task.request_id]
        started = time.perf_counter()

        # A task that ends (or reports progress) within START_REPORT_DELAY says nothing
        # else first: its first message starts it at the orchestrator too, one message
        # where there were two for every short task.
        announce = asyncio.create_task(self._announce(task, headers))

        async def report(chunk: Any) -> None:
            running.last_progress = time.monotonic()
            if chunk is None:  # task.heartbeat(): alive, nothing to show
                return
            announce.cancel()
            running.seq += 1
            await self._progress(task, running.seq, headers, chunk)

        task._report = report
        try:
            try:
                try:
                    result = await self._call(task)
                finally:
                    announce.cancel()  # what comes next tells the outcome
            except asyncio.CancelledError:
                _interrupt(task)
                if not running.cancelled:
                    raise  # the runtime is being killed: report nothing, as a crash would
                return  # cancelled by the orchestrator, which has already recorded it
            except TimeoutError:
                _interrupt(task)  # past the deadline the orchestrator has timed it out
                return
            except Exception as exc:
                error = str(exc) if isinstance(exc, TaskFailed) else f"{type(exc).__name__}: {exc}"
                await self._outcome(
                    task, running.seq + 1, headers, error=error, processing_time=_ms(started)
                )
                return
            elapsed = _ms(started)
            await self._outcome(
                task, running.seq + 1, headers, result=result, processing_time=elapsed
            )
            log.info(
                "request processed",
                extra={
                    "requestId": str(task.request_id),
                    "workerType": self.app.type,
                    "processingTime": elapsed,
                    "correlationId": headers.get("correlation-id"),
                    "workerId": self.id,
                },
            )
        finally:
            self._running.pop(task.request_id, None)
            self._slot_freed.set()

    async def _call(self, task: Task) -> JSON:
        spec = self.app.handlers.get(task.task_type)
        if spec is None:
            raise TaskFailed(
                f"worker type {self.app.type} cannot handle task type {task.task_type}"
            )
        remaining = max((task.deadline - self._clock()).total_seconds(), 0.001)
        call = (
            run_in_daemon_thread(spec.handler, task, f"{self.app.type}-{task.request_id}")
            if spec.blocking
            else spec.handler(task)
        )
        async with asyncio.timeout(remaining):
            result = await call  # type: ignore[misc]
        if not isinstance(result, dict):
            raise TaskFailed(f"the handler returned {type(result).__name__}, not an object")
        return result

    def _result(self, task: Task, kind: str, seq: int, headers: Any, **fields: Any) -> BusMessage:
        message = ResultMessage(
            request_id=task.request_id,
            attempt=task.attempt,
            worker_id=self.id,
            kind=kind,  # type: ignore[arg-type]
            seq=seq,
            **fields,
        )
        return BusMessage(RESULTS_TOPIC, str(task.request_id), message.to_json(), dict(headers))

    async def _announce(self, task: Task, headers: Any) -> None:
        await asyncio.sleep(START_REPORT_DELAY)
        await self._progress(task, 0, headers, None)  # "started"

    async def _progress(self, task: Task, seq: int, headers: Any, chunk: Any) -> None:
        """Partial results are best effort: a lost one never fails the task."""
        try:
            await self.bus.publish([self._result(task, "progress", seq, headers, chunk=chunk)])
        except Exception:
            log.warning("progress not sent", extra={"requestId": str(task.request_id)})

    async def _outcome(
        self,
        task: Task,
        seq: int,
        headers: Any,
        *,
        result: JSON | None = None,
        error: str | None = None,
        processing_time: int,
    ) -> None:
        """Publish the outcome, retrying while the bus is down, until the request's deadline
        (after it the orchestrator has timed the request out and would ignore it)."""
        kind = "completed" if error is None else "failed"
        try:
            message = self._result(
                task,
                kind,
                seq,
                headers,
                result=result,
                error=error,
                processing_time_ms=processing_time,
            )
        except (TypeError, ValueError) as exc:  # e.g. an integer over 64 bits, a set
            message = self._result(
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
                await self.bus.publish([message])
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

    async def _listen_control(self) -> None:
        assert self._control is not None
        while not self._stopping.is_set():
            try:
                batch = await self._control.next_batch(100, self.poll_timeout)
            except Exception:
                log.warning("cannot read control messages; retrying", exc_info=True)
                await asyncio.sleep(self.poll_timeout)
                continue
            for message in batch:
                if message.key not in (self.id, "*"):
                    continue
                try:
                    control = ControlMessage.from_json(message.value)
                except MalformedMessage as exc:
                    await self._dead_letter(message, str(exc))
                    continue
                self.cancel(control.request_id)
            if batch:
                await self._control.commit()

    def cancel(self, request_id: uuid.UUID) -> bool:
        """Interrupt the handler running ``request_id``; False if it is not running here."""
        running = self._running.get(request_id)
        if running is None:
            return False
        running.cancelled = True
        running.job.cancel()
        log.info(
            "request cancelled on the worker",
            extra={"requestId": str(request_id), "workerType": self.app.type},
        )
        return True

    async def _dead_letter(self, message: BusMessage, reason: str) -> None:
        log.warning(
            "message sent to the dead-letter queue",
            extra={"topic": message.topic, "reason": reason},
        )
        await self.bus.publish(
            [
                BusMessage(
                    dlq_topic(message.topic),
                    message.key,
                    dead_letter(message.value, reason, self._clock()),
                    dict(message.headers),
                )
            ]
        )

    async def stop(self, drain: bool = True, give_back: bool = True) -> None:
        """Stop taking work; with ``drain``, let running handlers finish (up to the drain
        timeout), then tell the orchestrator this worker is gone, and with ``give_back``
        which attempts it gave up, so that they are dispatched again at once."""
        self._stopping.set()
        self._status = "DRAINING"
        consume = self._tasks[0] if self._tasks else None
        if consume is not None:
            consume.cancel()
        if drain and self._running:
            with contextlib.suppress(Exception):
                await self.heartbeat()
            jobs = [r.job for r in self._running.values()]
            await asyncio.wait(jobs, timeout=self.drain_timeout)
        if give_back:  # named in the last heartbeat
            for running in list(self._running.values()):
                self._abandon(running, math.inf)
        await self._cancel_all()
        self._status = "UNHEALTHY"
        with contextlib.suppress(Exception):
            await self.heartbeat()
        for subscription in (self._requests, self._control):
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.close()

    async def kill(self) -> None:
        """Stop at once without a word to the orchestrator, as a crash would (for tests)."""
        self._stopping.set()
        await self._cancel_all()

    async def _cancel_all(self) -> None:
        jobs = [r.job for r in self._running.values()]
        for task in [*self._tasks, *jobs]:
            task.cancel()
        await asyncio.gather(*self._tasks, *jobs, return_exceptions=True)
        self._tasks = []


def _interrupt(task: Task) -> None:
    for callback in task._on_cancel:
        with contextlib.suppress(Exception):
            callback()


def _ms(started: float) -> int:
    return int((time.perf_counter() - started) * 1000)
