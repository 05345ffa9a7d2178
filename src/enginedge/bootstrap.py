"""The composition root: the one place that picks an adapter for each port.

Each backing service is chosen by its own variable (SPEC §1): ``DATABASE_URL`` (else SQLite;
``DATABASE_READ_URL`` adds a read replica), ``KAFKA_BROKERS`` (else the in-process bus),
``REDIS_URL`` (else in-process caches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from enginedge.adapters.bus.inprocess import InProcessBus
from enginedge.adapters.bus.kafka import KafkaBus, KafkaSettings
from enginedge.adapters.cache import redis as r
from enginedge.adapters.cache.fallback import (
    FallbackEvents,
    FallbackLimiter,
    FallbackRegistry,
    FallbackRequestCache,
    StoreRegistry,
)
from enginedge.adapters.cache.inprocess import (
    InProcessCache,
    InProcessEventStream,
    InProcessRateLimiter,
    InProcessRegistry,
    InProcessRequestCache,
)
from enginedge.adapters.cache.snapshot import SnapshotRegistry
from enginedge.adapters.store.console import SqlConsoleStore
from enginedge.adapters.store.engine import (
    PoolSettings,
    connect_with_retries,
    create_engine,
    create_sqlite_reader,
)
from enginedge.adapters.store.memory import MemoryStore
from enginedge.adapters.store.migrate import head_revision, upgrade
from enginedge.adapters.store.replica import ReplicaReader
from enginedge.adapters.store.sql import SqlStore
from enginedge.adapters.telemetry.metrics import PrometheusMetrics
from enginedge.adapters.telemetry.tracing import DEFAULT_SERVICE, TracedBus, configure_tracing
from enginedge.adapters.workers.probe import HttpWorkerProber
from enginedge.application.context import Context, Policy
from enginedge.application.inbox import ORCHESTRATOR_TOPICS
from enginedge.application.ports import (
    Cache,
    Clock,
    EventStream,
    MessageBus,
    RateLimiter,
    RequestCache,
    RequestReader,
    WorkerRegistry,
)
from enginedge.config import Settings
from enginedge.domain.messages import CONTROL_TOPIC, DISPATCH_DLQ_TOPIC, dlq_topic
from enginedge.domain.scheduling import SchedulingRules
from enginedge.service import Job, Service
from enginedge.worker import WorkerApp
from enginedge.worker.builtin import builtin_app


class SystemClock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def policy_from(settings: Settings) -> Policy:
    return Policy(
        request_timeout=timedelta(seconds=settings.request_timeout),
        max_attempts=settings.max_attempts,
        heartbeat_ttl=timedelta(seconds=settings.worker_heartbeat_ttl),
        retry_backoff=timedelta(seconds=settings.retry_backoff),
        rate_limit=settings.rate_limit_requests,
        rate_limit_window_seconds=settings.rate_limit_window,
        worker_check_timeout=settings.worker_health_check_timeout,
        scheduling=SchedulingRules(
            aging=timedelta(seconds=settings.priority_aging),
            tenant_max_running=settings.tenant_max_running,
        ),
        tenant_max_queued=settings.tenant_max_queued,
    )


def pool_from(settings: Settings) -> PoolSettings:
    return PoolSettings(
        size=settings.db_pool_size,
        connect_retries=settings.db_connect_retries,
        retry_delay=settings.db_retry_delay,
        acquire_timeout=settings.db_acquire_timeout,
        idle_timeout=settings.db_idle_timeout,
        pgbouncer=settings.db_pgbouncer,
    )


def kafka_settings(settings: Settings) -> KafkaSettings:
    assert settings.kafka_brokers is not None
    return KafkaSettings(
        brokers=settings.kafka_brokers,
        username=settings.kafka_username,
        password=settings.kafka_password,
        partitions=settings.kafka_partitions,
    )


def create_bus(settings: Settings) -> MessageBus:
    if settings.kafka_brokers:
        return KafkaBus(kafka_settings(settings))
    return InProcessBus()


def builtin_worker_apps(settings: Settings) -> list[WorkerApp]:
    return [builtin_app(name, settings) for name in settings.builtin_worker_list]


def orchestrator_topics() -> list[str]:
    """Every topic the orchestrator produces to or consumes, created at start-up."""
    topics = [*ORCHESTRATOR_TOPICS, CONTROL_TOPIC]
    return [*topics, *map(dlq_topic, topics), DISPATCH_DLQ_TOPIC]


@dataclass
class CacheAdapters:
    registry: WorkerRegistry
    events: EventStream
    limiter: RateLimiter
    cache: Cache
    request_cache: RequestCache
    closers: list[Job]


def create_cache(settings: Settings, store: SqlStore) -> CacheAdapters:
    retention = settings.event_retention
    if not settings.redis_url:
        return CacheAdapters(
            registry=InProcessRegistry(),
            events=InProcessEventStream(retention_seconds=retention),
            limiter=InProcessRateLimiter(),
            cache=InProcessCache(),
            request_cache=InProcessRequestCache(),
            closers=[],
        )
    client = r.connect(settings.redis_url)
    blocking = r.connect(settings.redis_url, blocking=True)
    # A worker silent for ten TTLs is forgotten by the registry (it is UNHEALTHY long before).
    registry_ttl = timedelta(seconds=settings.worker_heartbeat_ttl * 10)
    return CacheAdapters(
        registry=SnapshotRegistry(
            FallbackRegistry(r.RedisRegistry(client, registry_ttl), StoreRegistry(store))
        ),
        events=FallbackEvents(
            r.RedisEventStream(client, blocking, retention),
            InProcessEventStream(retention_seconds=retention),
        ),
        limiter=FallbackLimiter(r.RedisRateLimiter(client), InProcessRateLimiter()),
        cache=r.RedisCache(client),
        request_cache=FallbackRequestCache(r.RedisRequestCache(client)),
        closers=[client.aclose, blocking.aclose],
    )


def memory_context(clock: Clock, policy: Policy | None = None, **overrides: Any) -> Context:
    """The use cases wired to adapters that live in memory (the store too), on ``clock``:
    what tests of the application's rules run against. Any port can be replaced by its
    field name (``store=...``, ``bus=...``)."""
    ctx = Context(
        store=MemoryStore(),
        bus=InProcessBus(),
        registry=InProcessRegistry(),
        events=InProcessEventStream(retention_seconds=3600),
        limiter=InProcessRateLimiter(),
        cache=InProcessCache(),
        request_cache=InProcessRequestCache(),
        metrics=PrometheusMetrics(),
        clock=clock,
        policy=policy or Policy(),
    )
    return dataclasses.replace(ctx, **overrides) if overrides else ctx


def _async(call: Callable[[], None]) -> Job:
    async def run() -> None:
        call()

    return run


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
    tracing = configure_tracing(DEFAULT_SERVICE)
    engine = create_engine(settings.effective_database_url, pool_from(settings))
    store = SqlStore(engine, head_revision(), tracing)
    # DATABASE_READ_URL: status, list and console reads go to a read replica.
    read_engine = (
        create_engine(settings.database_read_url, pool_from(settings))
        if settings.database_read_url
        else None
    )
    reader: RequestReader | None = None
    if read_engine is not None:
        reader = ReplicaReader(SqlStore(read_engine, head_revision(), tracing), store)
    elif engine.dialect.name == "sqlite":
        # Embedded: reads on connections of their own, never queued behind a flush.
        read_engine = create_sqlite_reader(settings.effective_database_url, pool_from(settings))
        reader = SqlStore(read_engine, head_revision(), tracing)
    caches = create_cache(settings, store)
    metrics = PrometheusMetrics()
    prober = HttpWorkerProber()
    ctx = Context(
        store=store,
        bus=TracedBus(create_bus(settings), tracing) if tracing.enabled else create_bus(settings),
        registry=caches.registry,
        events=caches.events,
        limiter=caches.limiter,
        cache=caches.cache,
        request_cache=caches.request_cache,
        metrics=metrics,
        clock=SystemClock(),
        policy=policy_from(settings),
        prober=prober,
        console=SqlConsoleStore(engine, read_engine),
        reader=reader,
    )

    async def prepare_store() -> None:
        await connect_with_retries(engine, pool_from(settings))
        if settings.migrate_on_start:
            await upgrade(engine)

    return Service(
        ctx=ctx,
        metrics=metrics,
        prepare_store=prepare_store,
        topics=orchestrator_topics(),
        sweep_interval=settings.sweep_interval,
        worker_apps=[*builtin_worker_apps(settings), *(extra_workers or [])],
        heartbeat_interval=settings.worker_heartbeat_interval,
        health_check_interval=settings.health_check_interval,
        closers=[
            *caches.closers,
            prober.close,
            engine.dispose,
            *([read_engine.dispose] if read_engine is not None else []),
            _async(tracing.shutdown),
        ],
        tracing=tracing,
    )
