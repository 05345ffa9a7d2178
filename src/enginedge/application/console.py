"""The operator console's use cases: the fleet as the router sees it, recent activity as
chartable series, and the dead-letter queue.

Everything is read from shared state (the store and the worker registry), never from this
process's memory, so that any replica serves the same console.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson

from enginedge.application.context import Context
from enginedge.application.ports import (
    BusMessage,
    ConsoleStore,
    DeadLetter,
    RequestTiming,
    Subscription,
)
from enginedge.application.tenancy import Principal
from enginedge.domain.errors import ServiceUnavailable
from enginedge.domain.model import Worker, WorkerStatus

log = logging.getLogger(__name__)

# Requests read to draw the charts, at most, of each kind (finished / not finished).
MAX_TIMINGS = 5000
# Buckets drawn across the chosen window.
BUCKETS = 60
DEAD_LETTER_RETENTION = timedelta(days=30)
DEAD_LETTERS_GROUP = "main-hexagon.dead-letters"


def _require_store(ctx: Context) -> ConsoleStore:
    if ctx.console is None:
        raise ServiceUnavailable("the console store is not configured")
    return ctx.console


# --------------------------------------------------------------------------- fleet


async def fleet(ctx: Context) -> list[tuple[Worker, WorkerStatus]]:
    """Every known worker with the status the router uses, by type then id."""
    now = ctx.clock.now()
    workers = await ctx.registry.all() or await ctx.store.list_workers()
    return [
        (w, w.effective_status(now, ctx.policy.heartbeat_ttl))
        for w in sorted(workers, key=lambda w: (w.type, w.id))
    ]


# --------------------------------------------------------------------------- activity


@dataclass(slots=True)
class Series:
    """One worker type's points, one per bucket."""

    throughput: list[int]
    p50: list[float | None]
    p95: list[float | None]
    queue_depth: list[int]


@dataclass(slots=True)
class Activity:
    """Throughput, latency quantiles and queue depth per worker type over recent buckets."""

    start: datetime
    bucket_seconds: float
    buckets: list[datetime]
    series: dict[str, Series] = field(default_factory=dict)
    truncated: bool = False


def _quantile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank quantile, as the Prometheus summary computes it."""
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(
    timings: Sequence[RequestTiming], now: datetime, window: timedelta, buckets: int = BUCKETS
) -> Activity:
    """Cut ``window`` (ending ``now``) into ``buckets`` and, per worker type, count requests
    finished in each bucket, their latency quantiles (acceptance to terminal state, seconds)
    and how many waited for a worker at each bucket's end."""
    width = window / buckets
    start = now - window
    ends = [start + width * (i + 1) for i in range(buckets)]
    finished: dict[str, list[list[float]]] = {}
    waiting: dict[str, list[int]] = {}
    for t in timings:
        latencies = finished.setdefault(t.worker_type, [[] for _ in range(buckets)])
        depth = waiting.setdefault(t.worker_type, [0] * buckets)
        if t.finished_at is not None and start <= t.finished_at <= now:
            index = min(buckets - 1, int((t.finished_at - start) / width))
            latencies[index].append((t.finished_at - t.created_at).total_seconds())
        for i, end in enumerate(ends):
            started_by_then = t.started_at is not None and t.started_at <= end
            done_by_then = t.finished_at is not None and t.finished_at <= end
            if t.created_at <= end and not started_by_then and not done_by_then:
                depth[i] += 1
    activity = Activity(start=start, bucket_seconds=width.total_seconds(), buckets=ends)
    for worker_type in sorted(finished):
        per_bucket = [sorted(values) for values in finished[worker_type]]
        activity.series[worker_type] = Series(
            throughput=[len(v) for v in per_bucket],
            p50=[_quantile(v, 0.5) for v in per_bucket],
            p95=[_quantile(v, 0.95) for v in per_bucket],
            queue_depth=waiting[worker_type],
        )
    return activity


async def activity(ctx: Context, minutes: int, viewer: Principal | None = None) -> Activity:
    """The last ``minutes`` of activity, read from the store's request timestamps: of the
    ``viewer``'s own requests only, unless it is an operator (or None)."""
    store = _require_store(ctx)
    now = ctx.clock.now()
    window = timedelta(minutes=minutes)
    scope = viewer.scope if viewer is not None else None
    timings = await store.request_timings(now - window, MAX_TIMINGS, scope)
    result = summarize(timings, now, window)
    result.truncated = len(timings) >= MAX_TIMINGS
    # Every worker type of the fleet gets a series, idle ones too.
    for worker_type in {w.type for w, _ in await fleet(ctx)}:
        result.series.setdefault(
            worker_type,
            Series([0] * BUCKETS, [None] * BUCKETS, [None] * BUCKETS, [0] * BUCKETS),
        )
    return result


# --------------------------------------------------------------------------- dead letters


def dead_letter_of(message: BusMessage, now: datetime) -> DeadLetter:
    """Read a message from a dead-letter topic: the original fields plus ``error`` and
    ``failedAt`` (see :func:`enginedge.domain.messages.dead_letter`). Its id is a digest of
    topic and bytes, so that the same message delivered twice is kept once. ``now`` stands
    in for a missing or unreadable ``failedAt``."""
    digest = hashlib.sha256(message.topic.encode() + b"\0" + message.value).hexdigest()[:32]
    try:
        body = orjson.loads(message.value)
    except orjson.JSONDecodeError:
        body = None
    if not isinstance(body, dict):
        body = {"original": message.value.decode("utf-8", errors="replace")}
    reason = str(body.pop("error", None) or "no reason given")
    try:
        failed_at: datetime | None = datetime.fromisoformat(str(body.pop("failedAt", None)))
    except ValueError:
        failed_at = None
    if failed_at is not None and failed_at.tzinfo is None:
        failed_at = failed_at.replace(tzinfo=UTC)
    request_id = body.get("requestId")
    return DeadLetter(
        id=digest,
        topic=message.topic,
        key=message.key[:255],
        reason=reason[:2000],
        failed_at=failed_at or now,
        message=body,
        request_id=str(request_id)[:64] if request_id is not None else None,
    )


async def record_dead_letter(ctx: Context, message: BusMessage) -> DeadLetter:
    """Keep a dead letter in the console store (idempotently)."""
    store = _require_store(ctx)
    now = ctx.clock.now()
    letter = dead_letter_of(message, now)
    await store.add_dead_letter(letter, now - DEAD_LETTER_RETENTION)
    return letter


async def record_dead_letters(ctx: Context, subscription: Subscription) -> None:
    """Consume the dead-letter topics for ever, keeping each message in the console store.
    A message is retried until kept; a batch is committed once all of it is kept."""
    failures = 0
    while True:
        try:
            batch = await subscription.next_batch(100, 1.0)
            failures = 0
        except Exception as exc:
            failures = await _backoff("cannot read the dead-letter topics", exc, failures)
            continue
        for message in batch:
            while True:
                try:
                    await record_dead_letter(ctx, message)
                    failures = 0
                    break
                except Exception as exc:
                    failures = await _backoff("cannot record a dead letter", exc, failures)
        if batch:
            with contextlib.suppress(Exception):  # they come again; keeping them is idempotent
                await subscription.commit()


async def _backoff(what: str, exc: Exception, failures: int) -> int:
    log.warning(f"{what}; will retry", extra={"error": f"{type(exc).__name__}: {exc}"[:300]})
    await asyncio.sleep(min(0.2 * 2**failures, 5.0))
    return failures + 1


async def dead_letters(
    ctx: Context, limit: int, viewer: Principal | None = None
) -> list[DeadLetter]:
    """The most recent dead letters, newest first. Only operators (or no ``viewer``) see
    them: a dead letter holds any tenant's message as it was sent."""
    if viewer is not None and not viewer.admin:
        return []
    store = _require_store(ctx)
    return await store.dead_letters(limit)
