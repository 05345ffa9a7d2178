"""What every use case is given: the ports, the clock and the operating policy."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from enginedge.application.batching import RequestWriter
from enginedge.application.events import status_event
from enginedge.application.ports import (
    Cache,
    Clock,
    ConsoleStore,
    EventStream,
    MessageBus,
    Metrics,
    RateLimiter,
    RequestCache,
    RequestReader,
    RequestStore,
    WorkerProber,
    WorkerRegistry,
)
from enginedge.application.tenancy import Tenants
from enginedge.application.waiters import Waiters
from enginedge.domain.model import Request
from enginedge.domain.scheduling import SchedulingRules


@dataclass(frozen=True, slots=True)
class Policy:
    """Operating rules, from configuration."""

    request_timeout: timedelta = timedelta(seconds=300)
    max_attempts: int = 3
    heartbeat_ttl: timedelta = timedelta(seconds=15)
    retry_backoff: timedelta = timedelta(seconds=1)
    retry_backoff_max: timedelta = timedelta(seconds=30)
    rate_limit: int = 6000
    rate_limit_window_seconds: int = 60
    probe_timeout: float = 2.0
    worker_check_timeout: float = 10.0
    scheduling: SchedulingRules = field(default_factory=SchedulingRules)
    # Waiting requests one tenant may have; beyond it a submit answers 429 (None: no limit).
    tenant_max_queued: int | None = None

    def backoff(self, attempt: int) -> timedelta:
        """Delay before dispatching ``attempt`` (2 and up): doubling, capped."""
        doubled: timedelta = self.retry_backoff * (2 ** max(attempt - 2, 0))
        return min(doubled, self.retry_backoff_max)


@dataclass(slots=True)
class Context:
    """The ports wired by ``bootstrap``, shared by the use cases of one process."""

    store: RequestStore
    bus: MessageBus
    registry: WorkerRegistry
    events: EventStream
    limiter: RateLimiter
    cache: Cache
    request_cache: RequestCache
    metrics: Metrics
    clock: Clock
    policy: Policy = field(default_factory=Policy)
    prober: WorkerProber | None = None
    # Called after a commit that wrote outbox messages, so the relay need not wait to poll.
    wake_relay: Callable[[], None] = lambda: None
    # Called when work may be handed out: a request queued, a slot freed, a worker arrived.
    wake_scheduler: Callable[[], None] = lambda: None
    started_at: datetime | None = None
    # Moving average of processing time per task type, for the estimate given at submit.
    durations: dict[str, float] = field(default_factory=dict)
    # When this replica last wrote each worker's heartbeat to the store.
    worker_persisted_at: dict[str, datetime] = field(default_factory=dict)
    # Each tenant's latest scheduling turn, for the round robin among tenants running as many
    # (kept per replica: with several, replicas take turns and each goes round its own way).
    tenant_turns: dict[str, int] = field(default_factory=dict)
    # Running requests whose worker, though alive, stopped listing them, since when.
    unheld_since: dict[uuid.UUID, datetime] = field(default_factory=dict)
    # Dead letters and recent timings for the operator console (None: no console data).
    console: ConsoleStore | None = None
    # Writes accepted requests, many per commit under load (see application.batching).
    writer: RequestWriter = field(init=False)
    # Where status and list reads go (a read replica); None: the store itself.
    reader: RequestReader | None = None
    # Callers of this process waiting for outcomes (long polling).
    waiters: Waiters = field(default_factory=Waiters)
    # The names operators gave their keys, for logs and metrics (set with the keys).
    tenants: Tenants = field(default_factory=Tenants)

    @property
    def reads(self) -> RequestReader:
        """The store for reads that may be a little stale: status by id and list pages.

        Anything that decides a state change reads inside ``store.transaction()`` instead.
        """
        return self.reader if self.reader is not None else self.store

    def observe_duration(self, task_type: str, seconds: float) -> None:
        previous = self.durations.get(task_type)
        self.durations[task_type] = seconds if previous is None else 0.8 * previous + 0.2 * seconds

    def __post_init__(self) -> None:
        self.writer = RequestWriter(lambda: self.store, self._accepted)

    async def _accepted(self, requests: list[Request]) -> None:
        await self.events.append_all([status_event(r) for r in requests])
