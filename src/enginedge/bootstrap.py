"""The composition root: the one place that picks an adapter for each port and runs the
orchestrator's background loops (outbox relay, bus consumer, sweeper, built-in workers)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from enginedge.adapters.bus.inprocess import InProcessBus
from enginedge.adapters.cache.inprocess import (
    InProcessCache,
    InProcessEventStream,
    InProcessRateLimiter,
    InProcessRegistry,
)
from enginedge.adapters.store.engine import PoolSettings, connect_with_retries, create_engine
from enginedge.adapters.store.migrate import head_revision, upgrade
from enginedge.adapters.store.sql import SqlStore
from enginedge.adapters.telemetry.metrics import PrometheusMetrics
from enginedge.application.context import Context, Policy
from enginedge.application.inbox import ORCHESTRATOR_TOPICS, handle_message, send_to_dlq
from enginedge.application.maintenance import recover_in_flight, sweep
from enginedge.application.outbox import relay_outbox
from enginedge.application.ports import BusMessage, MessageBus, Subscription
from enginedge.config import ConfigError, Settings
from enginedge.domain.errors import ServiceUnavailable
from enginedge.domain.messages import ORCHESTRATOR_GROUP
from enginedge.worker import WorkerApp, WorkerRuntime
from enginedge.worker.builtin.data_processing import data_processing_worker

log = logging.getLogger(__name__)

RELAY_POLL_SECONDS = 0.5
CONSUMER_BATCH = 500
# A message whose handling keeps raising (not a malformed one: those go to the DLQ at once)
# is retried this many times, then dead-lettered so that it cannot block its partition.
MAX_HANDLING_TRIES = 20


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def policy_from(settings: Settings) -> Policy:
    return Policy(
        request_timeout=timedelta(seconds=settings.request_timeout),
        max_attempts=settings.max_attempts,
        heartbeat_ttl=timedelta(seconds=settings.worker_heartbeat_ttl),
        dispatch_timeout=timedelta(seconds=settings.dispatch_timeout),
        retry_backoff=timedelta(seconds=settings.retry_backoff),
        rate_limit=settings.rate_limit_requests,
        rate_limit_window_seconds=settings.rate_limit_window,
    )


def pool_from(settings: Settings) -> PoolSettings:
    return PoolSettings(
        size=settings.db_pool_size,
        connect_retries=settings.db_connect_retries,
        retry_delay=settings.db_retry_delay,
        acquire_timeout=settings.db_acquire_timeout,
        idle_timeout=settings.db_idle_timeout,
    )


def builtin_worker_apps(settings: Settings) -> list[WorkerApp]:
    apps = []
    for name in settings.builtin_worker_list:
        if name == "data-processing":
            apps.append(
                data_processing_worker(settings.data_root, settings.builtin_worker_capacity)
            )
    return apps


def create_bus(settings: Settings) -> MessageBus:
    if settings.kafka_brokers:
        raise ConfigError(
            "KAFKA_BROKERS is set, but this build has only the in-process bus; "
            "unset it to run embedded"
        )
    return InProcessBus()


@dataclass
class Service:
    """One orchestrator process: its context, its engine and its background loops."""

    settings: Settings
    ctx: Context
    metrics: PrometheusMetrics
    extra_workers: list[WorkerApp] = field(default_factory=list)
    workers: list[WorkerRuntime] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    @property
    def store(self) -> SqlStore:
        assert isinstance(self.ctx.store, SqlStore)
        return self.ctx.store

    async def start(self) -> None:
        """Reach the database, migrate, recover, then start every loop."""
        self.ctx.wake_relay = self._wake.set
        self.ctx.started_at = self.ctx.clock.now()
        await connect_with_retries(self.store.engine, pool_from(self.settings))
        if self.settings.migrate_on_start:
            await upgrade(self.store.engine)
        # Subscribe before anything is published, so that no heartbeat or result is missed.
        subscription = await self.ctx.bus.subscribe(ORCHESTRATOR_TOPICS, ORCHESTRATOR_GROUP)
        self._spawn("consumer", self._consume(subscription))
        for app in [*builtin_worker_apps(self.settings), *self.extra_workers]:
            runtime = WorkerRuntime(
                app, self.ctx.bus, heartbeat_interval=self.settings.worker_heartbeat_interval
            )
            await runtime.start()
            self.workers.append(runtime)
        await self._wait_for_registration()
        self._spawn("dispatcher", self._recover_then_dispatch())
        log.info(
            "orchestrator started",
            extra={
                "database": self.store.engine.dialect.name,
                "bus": type(self.ctx.bus).__name__,
                "builtinWorkers": [w.app.type for w in self.workers],
            },
        )

    async def stop(self) -> None:
        """Stop workers (draining them), publish what the outbox still holds, then exit."""
        self._stopping = True
        for runtime in self.workers:
            await runtime.stop(drain=True)
        with contextlib.suppress(Exception):
            while await relay_outbox(self.ctx):
                pass
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.ctx.bus.close()
        await self.store.engine.dispose()

    async def _wait_for_registration(self, timeout: float = 5.0) -> None:
        """Let the in-process workers' first heartbeats land, so that the service does not
        answer NO_ELIGIBLE_WORKERS for its own built-in workers right after start-up."""
        deadline = asyncio.get_running_loop().time() + timeout
        expected = {runtime.id for runtime in self.workers}
        while asyncio.get_running_loop().time() < deadline:
            known = {w.id for w in await self.ctx.registry.all()}
            if expected <= known:
                return
            await asyncio.sleep(0.01)
        log.warning(
            "built-in workers not registered yet; they will be once their heartbeats are consumed"
        )

    async def _recover_then_dispatch(self) -> None:
        """Recover what the last process left in flight, then relay and sweep.

        In the background and retried, so that a service whose schema is still being
        migrated by someone else starts, answers /live, and becomes ready by itself.
        """
        failures = 0
        while True:
            try:
                await recover_in_flight(self.ctx)
                break
            except Exception as exc:
                failures += 1
                log.warning(
                    "cannot recover in-flight requests yet; will retry",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
        self._spawn("relay", self._relay())
        self._spawn("sweeper", self._every(self.settings.sweep_interval, self._sweep))

    def _spawn(self, name: str, coro: Awaitable[None]) -> None:
        self._tasks.append(asyncio.create_task(coro, name=name))  # type: ignore[arg-type]

    async def _relay(self) -> None:
        failures = 0
        while True:
            try:
                sent = await relay_outbox(self.ctx)
                failures = 0
            except Exception as exc:
                failures += 1
                log.warning(
                    "outbox relay failed; will retry",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
                await asyncio.sleep(min(0.2 * 2**failures, 5.0))
                continue
            if sent == 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RELAY_POLL_SECONDS)

    async def _consume(self, subscription: Subscription) -> None:
        while True:
            try:
                batch = await subscription.next_batch(CONSUMER_BATCH, RELAY_POLL_SECONDS)
            except Exception as exc:
                log.warning(
                    "cannot read from the bus; will retry",
                    extra={"error": f"{type(exc).__name__}: {exc}"},
                )
                await asyncio.sleep(1.0)
                continue
            for message in batch:
                await self._handle(message)
            if batch:
                await subscription.commit()

    async def _handle(self, message: BusMessage) -> None:
        attempt = 0
        while attempt < MAX_HANDLING_TRIES:
            try:
                await handle_message(self.ctx, message)
                return
            except ServiceUnavailable as exc:
                # The store is down: wait for it however long it takes; skipping the message
                # would lose a result.
                log.warning(
                    "store unavailable while handling a message; will retry",
                    extra={"topic": message.topic, "error": exc.message},
                )
                await asyncio.sleep(1.0)
            except Exception as exc:
                attempt += 1
                log.warning(
                    "message handling failed; will retry",
                    extra={
                        "topic": message.topic,
                        "attempt": attempt,
                        "error": f"{type(exc).__name__}: {exc}",
                    },
                )
                await asyncio.sleep(min(0.1 * 2**attempt, 5.0))
        await send_to_dlq(self.ctx, message, f"handling failed {MAX_HANDLING_TRIES} times")

    async def _sweep(self) -> None:
        await sweep(self.ctx)

    async def _every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await job()
            except Exception as exc:
                log.warning(
                    "periodic job failed; will retry",
                    extra={
                        "job": getattr(job, "__name__", "job"),
                        "error": f"{type(exc).__name__}: {exc}",
                    },
                )


class StartupError(RuntimeError):
    """The service cannot start; the message says why in one line, with no secret in it."""


async def preflight(settings: Settings) -> None:
    """Reach the database (with the configured retries) and migrate it, before serving.

    Run by ``enginedge serve`` ahead of the server so that the common start-up failures
    are one clear line, not a traceback from inside the ASGI lifespan.
    """
    engine = create_engine(settings.effective_database_url, pool_from(settings))
    where = engine.url.render_as_string(hide_password=True)
    try:
        try:
            await connect_with_retries(engine, pool_from(settings))
        except Exception as exc:
            raise StartupError(
                f"cannot reach the database at {where}: {type(exc).__name__}: {exc}"
            ) from None
        if settings.migrate_on_start:
            try:
                await upgrade(engine)
            except Exception as exc:
                raise StartupError(
                    f"cannot migrate the database at {where}: {type(exc).__name__}: {exc}"
                ) from None
    finally:
        await engine.dispose()


def build_service(settings: Settings, extra_workers: list[WorkerApp] | None = None) -> Service:
    """Wire the adapters that ``settings`` select into a :class:`Service`."""
    if settings.redis_url:
        raise ConfigError(
            "REDIS_URL is set, but this build has only the in-process cache; "
            "unset it to run embedded"
        )
    engine = create_engine(settings.effective_database_url, pool_from(settings))
    metrics = PrometheusMetrics()
    ctx = Context(
        store=SqlStore(engine, head_revision()),
        bus=create_bus(settings),
        registry=InProcessRegistry(),
        events=InProcessEventStream(retention_seconds=settings.event_retention),
        limiter=InProcessRateLimiter(),
        cache=InProcessCache(),
        metrics=metrics,
        clock=SystemClock(),
        policy=policy_from(settings),
    )
    return Service(
        settings=settings, ctx=ctx, metrics=metrics, extra_workers=list(extra_workers or [])
    )
