"""The ports of the hexagon: what the use cases need from the outside world.

Each is a ``typing.Protocol``; ``adapters/`` holds an embedded and a distributed
implementation of each, and ``bootstrap`` picks one per port.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from enginedge.domain.model import Request, RequestEvent, RequestStatus, Result, Worker
from enginedge.domain.scheduling import Waiting


class IdempotencyKeyTaken(Exception):
    """Another request with the same caller and ``Idempotency-Key`` committed first."""


class Clock(Protocol):
    def now(self) -> datetime:
        """The current time, timezone-aware UTC."""
        ...


# --------------------------------------------------------------------------- store


@dataclass(slots=True)
class OutboxMessage:
    """A message written in the same transaction as the state change that causes it."""

    topic: str
    key: str
    value: bytes
    headers: dict[str, str] = field(default_factory=dict)
    available_at: datetime | None = None
    id: int | None = None


@dataclass(frozen=True, slots=True)
class RunningCounts:
    """Requests handed to a worker and not finished (DISPATCHED or PROCESSING)."""

    by_worker: dict[str, int] = field(default_factory=dict)
    by_tenant: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TenantCounts:
    waiting: int = 0
    running: int = 0


@dataclass(frozen=True, slots=True)
class RequestQuery:
    """Filters and a page position for listing requests, newest first."""

    statuses: Sequence[RequestStatus] = ()
    task_type: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    caller: str | None = None
    limit: int = 50
    cursor: tuple[datetime, uuid.UUID] | None = None


class StoreTransaction(Protocol):
    """Reads and writes that commit or roll back together."""

    async def add_requests(self, requests: Sequence[Request]) -> None:
        """Insert new requests in one statement; any conflict fails them all, with
        ``IdempotencyKeyTaken`` if one of them has an idempotency key."""
        ...

    async def find_by_idempotency_key(self, caller: str, key: str) -> Request | None: ...

    async def lock_request(self, request_id: uuid.UUID) -> Request | None:
        """Read a request and hold it against concurrent changes until commit."""
        ...

    async def lock_requests(self, request_ids: Sequence[uuid.UUID]) -> list[Request]:
        """:meth:`lock_request` for many at once (those that exist), in a fixed order."""
        ...

    async def save_requests(self, requests: Sequence[Request]) -> None:
        """Write what changes over the requests' lives (status, attempt, worker, times), in
        one statement."""
        ...

    async def add_results(self, results: Sequence[Result]) -> None:
        """Keep each finished request's one result row, in one statement."""
        ...

    async def enqueue(self, messages: Sequence[OutboxMessage]) -> None: ...

    async def claim_outbox(self, now: datetime, limit: int) -> list[OutboxMessage]:
        """Due outbox messages, oldest first, that no other relay holds."""
        ...

    async def delete_outbox(self, ids: Sequence[int]) -> None: ...

    async def lock_scheduling(self) -> None:
        """Hold the one scheduling lock of the whole deployment until commit: two replicas
        that counted the same free slot would both fill it."""
        ...

    async def running_counts(self) -> RunningCounts:
        """Requests in flight, per worker and per tenant."""
        ...

    async def queue_heads(
        self, worker_types: Sequence[str], per_tenant: int, now: datetime
    ) -> list[Waiting]:
        """For each worker type named, priority and tenant, its first ``per_tenant``
        waiting requests in FIFO order: PENDING, and due (no backoff left)."""
        ...

    async def mark_dispatched(
        self, assignments: Sequence[tuple[uuid.UUID, int, str]], now: datetime
    ) -> None:
        """Move PENDING requests, ``(id, attempt, worker id)``, whose current attempt was
        handed to that worker to DISPATCHED (any other is left as it is). The caller holds
        their locks (:meth:`lock_requests`) and knows which ones move."""
        ...

    async def lock_overdue(self, now: datetime, limit: int) -> list[Request]:
        """Non-terminal requests whose deadline has passed."""
        ...

    async def lock_in_flight(
        self,
        worker_ids: Sequence[str] | None = None,
        limit: int = 1000,
        started_before: datetime | None = None,
    ) -> list[Request]:
        """DISPATCHED or PROCESSING requests, of the given workers if named, dispatched
        before the given time if one is."""
        ...

    async def save_worker(self, worker: Worker) -> None: ...


class RequestReader(Protocol):
    """The reads that may be a little stale (status and list pages): served by a read
    replica when one is configured, else by the :class:`RequestStore` itself."""

    async def get_request(self, request_id: uuid.UUID) -> Request | None: ...

    async def list_requests(self, query: RequestQuery) -> list[Request]: ...


class RequestStore(Protocol):
    """Durable home of requests, results, workers and the outbox."""

    def transaction(self, *, durable: bool = True) -> AbstractAsyncContextManager[StoreTransaction]:
        """A transaction. One that is not ``durable`` may be lost by a crash after it
        committed: only for bookkeeping whose loss repeats work (the relay's), never loses
        it."""
        ...

    async def get_request(self, request_id: uuid.UUID) -> Request | None: ...

    async def list_requests(self, query: RequestQuery) -> list[Request]: ...

    async def list_workers(self) -> list[Worker]: ...

    async def outbox_backlog(self) -> int: ...

    async def queue_depth(self) -> dict[tuple[str, int], int]:
        """Requests waiting for a worker (PENDING), per worker type and priority."""
        ...

    async def tenant_counts(self) -> dict[str, TenantCounts]:
        """Waiting and running requests per tenant that has any."""
        ...

    async def any_waiting(self, now: datetime) -> bool:
        """Whether any request is waiting and due (PENDING, its backoff passed): a cheap
        read, without the scheduling lock."""
        ...

    async def count_waiting(self, tenant: str) -> int:
        """Requests of ``tenant`` waiting for a worker (PENDING)."""
        ...

    async def queue_position(self, request: Request) -> int | None:
        """How many waiting requests of its worker type go before ``request`` by priority
        and age (1: it is next but for fair shares); None once it is not waiting."""
        ...

    async def ping(self) -> None:
        """Raise if the store cannot be reached or its schema is not current."""
        ...


# --------------------------------------------------------------------------- bus


@dataclass(frozen=True, slots=True)
class BusMessage:
    topic: str
    key: str
    value: bytes
    headers: Mapping[str, str] = field(default_factory=dict)


class Subscription(Protocol):
    async def next_batch(self, max_messages: int, timeout: float) -> list[BusMessage]:
        """Up to ``max_messages``, waiting at most ``timeout`` seconds for the first.

        With ``max_messages`` 0 the consumer takes nothing (the messages stay in the bus for
        the group's other members) but stays a live member of its group.
        """
        ...

    async def commit(self) -> None:
        """Mark everything returned so far as processed."""
        ...

    async def close(self) -> None: ...


class MessageBus(Protocol):
    """Topics with consumer groups (SPEC §6)."""

    @property
    def durable(self) -> bool:
        """Whether published messages outlive this process (Kafka yes, in-process no)."""
        ...

    async def publish(self, messages: Sequence[BusMessage]) -> None:
        """Return once the bus holds every message; raise if it cannot take them."""
        ...

    async def subscribe(
        self, topics: Sequence[str], group: str | None, *, urgent: bool = True
    ) -> Subscription:
        """A member of consumer ``group`` reading ``topics``; with no group, a reader of its
        own that takes every message of the topics from their start, in no group (so no
        rebalance ever waits on it or on anyone else) and commits nothing. A subscription
        that is not ``urgent`` (control messages, dead letters) may ask the broker less
        often."""
        ...

    async def prepare(self, topics: Sequence[str]) -> None:
        """Make sure the topics exist (created with the configured partitions if not)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- cache


class WorkerRegistry(Protocol):
    """The live view of the fleet, fed by heartbeats."""

    async def upsert(self, worker: Worker) -> None: ...

    async def get(self, worker_id: str) -> Worker | None: ...

    async def all(self, *, fresh: bool = False) -> list[Worker]:
        """Every known worker; ``fresh`` bypasses any local copy of a shared registry."""
        ...


class EventStream(Protocol):
    """Each request's ordered events, kept for reconnecting SSE clients."""

    async def append(self, event: RequestEvent) -> RequestEvent:
        """Store ``event`` and return it with its id."""
        ...

    async def append_all(self, events: Sequence[RequestEvent]) -> None:
        """Store ``events`` in order, in as few round trips as the adapter can."""
        ...

    async def history(self, request_id: uuid.UUID, after: str | None) -> list[RequestEvent]:
        """The stored events after ``after`` (all if None), without waiting."""
        ...

    def follow(
        self, request_id: uuid.UUID, after: str | None, idle_timeout: float
    ) -> AbstractAsyncContextManager[AsyncIterator[RequestEvent | None]]:
        """Every event after ``after`` (all if None), then new ones as they come; ``None``
        after each ``idle_timeout`` seconds without one."""
        ...

    def finished_feed(self) -> AsyncIterator[Sequence[uuid.UUID] | None]:
        """The ids of requests that finished on any replica, as their terminal events are
        stored, for as long as it is iterated; ``None`` when some may have been missed
        (a reconnect). Requests finished by this process need not be announced to it."""
        ...


class RateLimiter(Protocol):
    async def hit(self, key: str, limit: int, window_seconds: int, now: datetime) -> int | None:
        """Count one call; ``None`` if allowed, else the seconds until the window resets."""
        ...


class RequestCache(Protocol):
    """Finished requests by id, to answer status reads without the store."""

    async def get(self, request_id: uuid.UUID) -> Request | None: ...

    async def put_all(self, requests: Sequence[Request]) -> None:
        """Keep those of ``requests`` that are terminal (they never change again)."""
        ...


class WorkerProber(Protocol):
    """Active health checks of a worker's own endpoint."""

    async def probe(self, endpoint: str, timeout: float) -> str | None:
        """None if ``endpoint``'s /health answers healthy within ``timeout``, else why not."""
        ...


class Cache(Protocol):
    """Health check of the cache backend (the embedded one is always up)."""

    async def ping(self) -> None: ...


# --------------------------------------------------------------------------- telemetry


class Metrics(Protocol):
    def request_accepted(self, task_type: str, worker_type: str) -> None: ...

    def request_finished(self, status: RequestStatus, duration_seconds: float) -> None: ...

    def dispatched(self, worker_type: str, latency_seconds: float) -> None: ...

    def redispatched(self, reason: str) -> None: ...

    def result_ignored(self, reason: str) -> None: ...

    def dead_lettered(self, topic: str) -> None: ...


# --------------------------------------------------------------------------- console


@dataclass(frozen=True, slots=True)
class RequestTiming:
    """The timestamps of one request, enough to chart throughput, latency and queue depth."""

    worker_type: str
    status: RequestStatus
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that landed on a dead-letter topic, and why."""

    id: str
    topic: str
    key: str
    reason: str
    failed_at: datetime
    message: dict[str, object]
    request_id: str | None = None


class ConsoleStore(Protocol):
    """What the operator console reads beyond the request store: kept in the SQL store, so
    that every replica serves the same view."""

    async def request_timings(
        self, since: datetime, limit: int, caller: str | None = None
    ) -> list[RequestTiming]:
        """Requests that finished at or after ``since``, plus those not finished yet (at
        most ``limit`` of each, newest first); only ``caller``'s if one is named."""
        ...

    async def add_dead_letter(self, letter: DeadLetter, keep_after: datetime) -> None:
        """Keep ``letter`` (once: the same id again is ignored) and forget those that failed
        before ``keep_after``."""
        ...

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""
        ...
