"""One orchestrator process at run time: its background loops around the use cases.

Scheduler, outbox relay, bus consumer, sweeper and any in-process workers. Every loop survives the
failure of a backing service: it logs, backs off and tries again, so the process recovers by
itself when the service returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from enginedge.adapters.telemetry.metrics import PrometheusMetrics
from enginedge.adapters.telemetry.tracing import Tracing
from enginedge.application.console import DEAD_LETTERS_GROUP, record_dead_letters
from enginedge.application.context import Context
from enginedge.application.fleet import check_worker_health
from enginedge.application.inbox import (
    ORCHESTRATOR_TOPICS,
    handle_batch,
    handle_message,
    send_to_dlq,
)
from enginedge.application.maintenance import recover_in_flight, sweep
from enginedge.application.outbox import relay_outbox
from enginedge.application.ports import BusMessage, Subscription
from enginedge.application.scheduler import schedule
from enginedge.domain.errors import ServiceUnavailable
from enginedge.domain.messages import ORCHESTRATOR_GROUP, RESULTS_TOPIC
from enginedge.worker import WorkerApp, WorkerRuntime

log = logging.getLogger(__name__)

RELAY_POLL_SECONDS = 0.5
RELAY_BATCH = 500
CONSUMER_BATCH = 500
# A message whose handling keeps raising (not a malformed one: those go to the DLQ at once,
# nor a store outage: that is waited out) is retried this many times, then dead-lettered so
# that it cannot block its partition.
MAX_HANDLING_TRIES = 20

Job = Callable[[], Awaitable[None]]


def _error(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"[:500]}


async def retry_until_done(what: str, job: Job, max_delay: float = 5.0) -> None:
    """Run ``job`` until it succeeds, backing off between failures."""
    failures = 0
    while True:
        try:
            await job()
            return
        except Exception as exc:
            failures += 1
            log.warning(f"{what} failed; will retry", extra=_error(exc))
            await asyncio.sleep(min(0.1 * 2**failures, max_delay))


@dataclass
class Service:
    """The orchestrator's loops and in-process workers over a wired :class:`Context`."""

    ctx: Context
    metrics: PrometheusMetrics
    prepare_store: Job
    topics: Sequence[str]
    sweep_interval: float
    worker_apps: list[WorkerApp] = field(default_factory=list)
    heartbeat_interval: float = 5.0
    health_check_interval: float = 30.0
    closers: list[Job] = field(default_factory=list)
    tracing: Tracing = field(default_factory=Tracing)
    workers: list[WorkerRuntime] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _wake_scheduler: asyncio.Event = field(default_factory=asyncio.Event)
    _scheduler: asyncio.Task[None] | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _consumer: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Reach and migrate the store, then start every loop and in-process worker."""
        self.ctx.wake_relay = self._wake.set
        self.ctx.wake_scheduler = self._wake_scheduler.set
        self.ctx.started_at = self.ctx.clock.now()
        await self.prepare_store()
        # Subscribe before anything is published, so that no heartbeat or result is missed.
        subscription = await self.ctx.bus.subscribe(ORCHESTRATOR_TOPICS, ORCHESTRATOR_GROUP)
        self._consumer = asyncio.create_task(self._consume(subscription), name="consumer")
        for app in self.worker_apps:
            runtime = WorkerRuntime(
                app, self.ctx.bus, heartbeat_interval=self.heartbeat_interval, tracing=self.tracing
            )
            await runtime.start()
            self.workers.append(runtime)
        await self._wait_for_registration()
        self._spawn("dispatcher", self._recover_then_dispatch())
        self._spawn("finished-feed", self._follow_finished())
        log.info(
            "orchestrator started",
            extra={
                "bus": type(self.ctx.bus).__name__,
                "builtinWorkers": [w.app.type for w in self.workers],
            },
        )

    def begin_shutdown(self) -> None:
        """The server stops taking requests: answer the long-polling callers now, with
        their requests as they are, so that they do not hold the shutdown."""
        self.ctx.waiters.close()

    async def stop(self, grace: float = 10.0) -> None:
        """Stop scheduling, stop workers (draining them), let the consumer finish and commit
        its batch, publish what the outbox holds, then close."""
        if self._scheduler is not None:
            self._scheduler.cancel()
            await asyncio.gather(self._scheduler, return_exceptions=True)
        for runtime in self.workers:
            # Over the in-process bus, the restart gives what is left a new attempt
            # (recover_in_flight); giving it back now as well would cost it a second one.
            await runtime.stop(drain=True, give_back=self.ctx.bus.durable)
        self._stopping.set()
        if self._consumer is not None:
            try:
                async with asyncio.timeout(grace):
                    await asyncio.shield(self._consumer)
            except (TimeoutError, Exception):
                self._consumer.cancel()
                await asyncio.gather(self._consumer, return_exceptions=True)
        with contextlib.suppress(Exception):
            while await relay_outbox(self.ctx, RELAY_BATCH):
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.ctx.bus.close()
        for close in self.closers:
            with contextlib.suppress(Exception):
                await close()

    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))  # type: ignore[arg-type]

    async def _follow_finished(self) -> None:
        """Wake this replica's long-polling callers whose requests finished elsewhere."""
        waiters = self.ctx.waiters
        async for ids in self.ctx.events.finished_feed():
            if ids is None:
                waiters.wake_all()
            else:
                waiters.wake(ids)

    async def _wait_for_registration(self, timeout: float = 5.0) -> None:
        """Let the in-process workers' first heartbeats land, so that the service does not
        answer NO_ELIGIBLE_WORKERS for its own built-in workers right after start-up."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        expected = {runtime.id for runtime in self.workers}
        while expected and loop.time() < deadline:
            with contextlib.suppress(Exception):
                if expected <= {w.id for w in await self.ctx.registry.all()}:
                    return
            await asyncio.sleep(0.01)
        if expected:
            log.warning(
                "built-in workers not registered yet; they will be once their "
                "heartbeats are consumed"
            )

    async def _recover_then_dispatch(self) -> None:
        """Create the topics and recover what the last process left in flight, then relay
        and sweep. In the background and retried, so that a service whose broker or schema
        is not there yet starts, answers /live, and becomes ready by itself."""
        await retry_until_done("creating topics", lambda: self.ctx.bus.prepare(self.topics))

        async def recover() -> None:
            await recover_in_flight(self.ctx)

        await retry_until_done("recovering in-flight requests", recover)
        self._spawn("relay", self._when_woken("outbox relay", self._wake, self._relay_once))
        self._scheduler = asyncio.create_task(
            self._when_woken("scheduler", self._wake_scheduler, self._schedule_once),
            name="scheduler",
        )
        self._tasks.append(self._scheduler)
        self._spawn("sweeper", self._every(self.sweep_interval, self._sweep))
        self._spawn("worker-checks", self._every(self.health_check_interval, self._check))
        self._spawn("dead-letters", self._record_dead_letters())

    async def _record_dead_letters(self) -> None:
        """Keep what lands on the dead-letter topics for the console; one consumer group for
        every replica, so that each letter is kept once."""
        topics = [t for t in self.topics if t.endswith(".dlq")]
        if not topics or self.ctx.console is None:
            return
        subscriptions: list[Subscription] = []

        async def subscribe() -> None:
            subscriptions.append(
                await self.ctx.bus.subscribe(topics, DEAD_LETTERS_GROUP, urgent=False)
            )

        await retry_until_done("subscribing to the dead-letter topics", subscribe)
        await record_dead_letters(self.ctx, subscriptions[0])

    async def _relay_once(self) -> bool:
        # A full batch may have left due messages behind: read again at once.
        return await relay_outbox(self.ctx, RELAY_BATCH) >= RELAY_BATCH

    async def _schedule_once(self) -> bool:
        return (await schedule(self.ctx)).more

    async def _when_woken(
        self, what: str, wake: asyncio.Event, job: Callable[[], Awaitable[bool]]
    ) -> None:
        """Run ``job`` whenever ``wake`` is set, at once again while it says there is more,
        and at least every poll (for retries coming due and other replicas' leftovers)."""
        failures = 0
        while True:
            # Cleared before the job reads, not after: whatever comes while it runs sets it
            # again, so the loop never sleeps on work it missed.
            wake.clear()
            try:
                more = await job()
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning(f"{what} failed; will retry", extra=_error(exc))
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
                continue
            if not more:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RELAY_POLL_SECONDS):
                        await wake.wait()

    async def _consume(self, subscription: Subscription) -> None:
        while not self._stopping.is_set():
            try:
                batch = await subscription.next_batch(CONSUMER_BATCH, RELAY_POLL_SECONDS)
            except Exception as exc:
                log.warning("cannot read from the bus; will retry", extra=_error(exc))
                await asyncio.sleep(1.0)
                continue
            if batch:
                await self._handle_batch(batch)
            if batch:
                try:
                    await subscription.commit()
                except Exception as exc:  # they will come again: recording is idempotent
                    log.warning("offsets not committed", extra=_error(exc))

    def _record_span(self, message: BusMessage) -> contextlib.AbstractContextManager[object]:
        """Recording a result joins its request's trace."""
        return self.tracing.span(
            f"record {message.topic}",
            message.headers.get("traceparent"),
            kind="consumer",
            attributes={"messaging.message.id": message.key},
        )

    async def _handle_batch(self, batch: list[BusMessage]) -> None:
        """The whole batch in one go; one message at a time if that fails otherwise than
        by the store being down (so that one bad message is retried, then dead-lettered,
        on its own)."""
        try:
            await self._until_the_store_answers(
                lambda: handle_batch(self.ctx, batch, self._record_span), {"messages": len(batch)}
            )
        except Exception as exc:
            log.warning("batch handling failed; one by one now", extra=_error(exc))
            for message in batch:
                await self._handle(message)

    async def _until_the_store_answers(
        self, job: Callable[[], Awaitable[None]], about: dict[str, Any]
    ) -> None:
        """Run ``job``; while the store is down, wait for it however long it takes (skipping
        would lose results) and run it again. Any other failure is raised."""
        while True:
            try:
                await job()
                return
            except ServiceUnavailable as exc:
                log.warning(
                    "store unavailable while handling messages; will retry",
                    extra={**about, "error": exc.message},
                )
                await asyncio.sleep(1.0)

    async def _handle(self, message: BusMessage) -> None:
        async def apply() -> None:
            # Results join their request's trace; heartbeats would only add noise.
            traced = message.topic == RESULTS_TOPIC
            with self._record_span(message) if traced else contextlib.nullcontext():
                await handle_message(self.ctx, message)

        attempt = 0
        while attempt < MAX_HANDLING_TRIES:
            try:
                await self._until_the_store_answers(apply, {"topic": message.topic})
                return
            except Exception as exc:
                attempt += 1
                log.warning(
                    "message handling failed; will retry",
                    extra={"topic": message.topic, "attempt": attempt, **_error(exc)},
                )
                await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        await retry_until_done(
            "dead-lettering a message",
            lambda: send_to_dlq(self.ctx, message, f"handling failed {MAX_HANDLING_TRIES} times"),
        )

    async def _sweep(self) -> None:
        await sweep(self.ctx)

    async def _check(self) -> None:
        await check_worker_health(self.ctx)

    async def _every(self, seconds: float, job: Job) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception as exc:
                log.warning("periodic job failed; will retry", extra=_error(exc))
