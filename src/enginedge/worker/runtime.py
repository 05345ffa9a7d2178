"""Running a :class:`WorkerApp` against a message bus: the worker's loops.

The orchestrator's scheduler decides what this worker runs: it sends a dispatch to this
process's own inbox topic only when the worker has a free slot. The runtime reads its inbox
(in no consumer group: nothing waits on a rebalance), runs each attempt
(:mod:`enginedge.worker.attempts`), listens for cancels, and tells the fleet how it is in
heartbeats (:mod:`enginedge.worker.condition`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime

from enginedge.adapters.telemetry.tracing import Tracing
from enginedge.application.ports import BusMessage, MessageBus, Subscription
from enginedge.domain.messages import (
    CONTROL_TOPIC,
    DISPATCH_DLQ_TOPIC,
    HEARTBEATS_TOPIC,
    ControlMessage,
    DispatchMessage,
    HeartbeatMessage,
    MalformedMessage,
    dead_letter,
    dlq_topic,
    inbox_topic,
    new_traceparent,
)
from enginedge.domain.model import WorkerStatus
from enginedge.worker.app import Task, WorkerApp
from enginedge.worker.attempts import Attempt, AttemptRunner, ResultReporter
from enginedge.worker.condition import Condition

log = logging.getLogger(__name__)


def _now() -> datetime:
    return datetime.now(UTC)


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
        # A topic of this process's own: a restart under the same id reads none of the last
        # run's dispatches (the orchestrator gave them back to the queue).
        self.inbox = inbox_topic(app.type, self.id, secrets.token_hex(4))
        self.heartbeat_interval = heartbeat_interval
        self.poll_timeout = poll_timeout
        self.drain_timeout = drain_timeout
        self._clock = clock
        self._tracing = tracing or Tracing()
        self.condition = Condition(self.id, heartbeat_interval, app.stall_timeout)
        self._runner = AttemptRunner(app, self.id, ResultReporter(bus, self.id, clock), clock)
        self._running: dict[uuid.UUID, Attempt] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._last_poll = time.monotonic()
        self._inbox: Subscription | None = None
        self._control: Subscription | None = None
        self.max_active = 0  # highest concurrency seen, for tests and the health endpoint

    @property
    def active(self) -> int:
        return len(self._running)

    @property
    def status(self) -> WorkerStatus:
        """HEALTHY, DRAINING (stopping), or UNHEALTHY (stalled, or cooling down after a
        stall); an unhealthy worker gets no new work."""
        return self.condition.status

    @property
    def reason(self) -> str | None:
        return self.condition.reason

    async def start(self) -> None:
        """Open the inbox, announce the worker and start its loops."""
        self._inbox = await self.bus.subscribe([self.inbox], None)
        # Control messages reach every worker: each one reads them on its own.
        self._control = await self.bus.subscribe([CONTROL_TOPIC], None, urgent=False)
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
                "inbox": self.inbox,
            },
        )

    async def heartbeat(self) -> None:
        status = self.status
        message = HeartbeatMessage(
            worker_id=self.id,
            type=self.app.type,
            endpoint=self.endpoint,
            capabilities=self.app.capabilities,
            capacity=self.app.capacity,
            active=self.active,
            status=status.value,
            ts=self._clock(),
            reason=self.reason if status is WorkerStatus.UNHEALTHY else None,
            in_flight=[str(r) for r, a in self._running.items() if not a.stopped],
            inbox=self.inbox,
            abandoned=self.condition.abandoned(),
        )
        headers = {"traceparent": new_traceparent(), "correlation-id": self.id}
        await self.bus.publish([BusMessage(HEARTBEATS_TOPIC, self.id, message.to_json(), headers)])

    def check_stalls(self) -> None:
        """Declare this worker unhealthy if a task made no progress within the app's stall
        timeout, or the inbox stopped being read; stalled tasks are given up (cancelled, not
        reported) so that the orchestrator gives them to another worker."""
        now = time.monotonic()
        stall = self.app.stall_timeout
        stalled = [a for a in self._running.values() if now - a.last_progress > stall]
        if stalled:
            until = self.condition.unhealthy(
                f"request {stalled[0].task.request_id} made no progress for {stall:g}s"
            )
            for attempt in stalled:
                self._give_up(attempt, until)
        elif now - self._last_poll > max(stall, 30 * self.poll_timeout):
            self.condition.unhealthy("the consumer stopped polling")

    def _give_up(self, attempt: Attempt, until: float) -> None:
        """Stop an attempt without a word of its outcome, and name it in the heartbeats
        until ``until`` so that the orchestrator gives it to another worker at once."""
        attempt.stop()
        self.condition.abandon(str(attempt.task.request_id), attempt.task.attempt, until)

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            self.check_stalls()
            try:
                await self.heartbeat()
            except Exception:
                log.warning("heartbeat not sent", exc_info=True, extra={"workerId": self.id})

    async def _consume(self) -> None:
        """Read the inbox: the scheduler sends no more than there are free slots, but a
        dispatch that comes while the worker is full (its slot count at the orchestrator
        was a moment behind) waits here, unread, until a slot frees."""
        assert self._inbox is not None
        while not self._stopping.is_set():
            self._last_poll = time.monotonic()
            free = self.app.capacity - self.active
            try:
                if free <= 0:
                    await asyncio.sleep(min(self.poll_timeout, 0.05))
                    continue
                batch = await self._inbox.next_batch(free, self.poll_timeout)
            except Exception:
                log.warning("cannot read dispatches; retrying", exc_info=True)
                await asyncio.sleep(self.poll_timeout)
                continue
            for message in batch:
                await self._start(message)

    async def _start(self, message: BusMessage) -> None:
        try:
            dispatch = DispatchMessage.from_json(message.value)
        except MalformedMessage as exc:
            await self._dead_letter(message, str(exc), DISPATCH_DLQ_TOPIC)
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
        attempt = Attempt(task)
        if self.status is not WorkerStatus.HEALTHY:
            # Sent before the orchestrator heard this worker is out of rotation: give it
            # back at once rather than keep it waiting for the cool-down.
            self.condition.abandon(
                str(task.request_id), task.attempt, self.condition.cool_down_ends
            )
            return
        self._running[task.request_id] = attempt
        attempt.job = asyncio.create_task(self._run(attempt, message.headers))
        self.max_active = max(self.max_active, self.active)

    async def _run(self, attempt: Attempt, headers: Mapping[str, str]) -> None:
        task = attempt.task
        try:
            # The handling is a span of the request's trace; what it sends carries the span.
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
                await self._runner.run(attempt, headers)
        finally:
            self._running.pop(task.request_id, None)

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
                    await self._dead_letter(message, str(exc), dlq_topic(message.topic))
                    continue
                self.cancel(control.request_id)

    def cancel(self, request_id: uuid.UUID) -> bool:
        """Interrupt the handler running ``request_id``; False if it is not running here."""
        attempt = self._running.get(request_id)
        if attempt is None:
            return False
        attempt.stop()
        log.info(
            "request cancelled on the worker",
            extra={"requestId": str(request_id), "workerType": self.app.type},
        )
        return True

    async def _dead_letter(self, message: BusMessage, reason: str, topic: str) -> None:
        log.warning(
            "message sent to the dead-letter queue",
            extra={"topic": message.topic, "reason": reason},
        )
        await self.bus.publish(
            [
                BusMessage(
                    topic,
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
        self.condition.draining()
        consume = self._tasks[0] if self._tasks else None
        if consume is not None:
            consume.cancel()
        if drain and self._running:
            with contextlib.suppress(Exception):
                await self.heartbeat()
            jobs = [a.job for a in self._running.values() if a.job is not None]
            await asyncio.wait(jobs, timeout=self.drain_timeout)
        if give_back:  # named in the last heartbeat
            for attempt in list(self._running.values()):
                self._give_up(attempt, float("inf"))
        await self._cancel_all()
        self.condition.stopped()
        with contextlib.suppress(Exception):
            await self.heartbeat()
        for subscription in (self._inbox, self._control):
            if subscription is not None:
                with contextlib.suppress(Exception):
                    await subscription.close()

    async def kill(self) -> None:
        """Stop at once without a word to the orchestrator, as a crash would (for tests)."""
        self._stopping.set()
        await self._cancel_all()

    async def _cancel_all(self) -> None:
        jobs = [a.job for a in self._running.values() if a.job is not None]
        for task in [*self._tasks, *jobs]:
            task.cancel()
        await asyncio.gather(*self._tasks, *jobs, return_exceptions=True)
        self._tasks = []
