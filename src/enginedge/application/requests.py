"""Use cases a caller drives through the API: submit, get, list, cancel."""

from __future__ import annotations

import asyncio
import base64
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from enginedge.application.context import Context
from enginedge.application.events import status_event
from enginedge.application.outbox import cancel_message, finish, finished
from enginedge.application.ports import IdempotencyKeyTaken, RequestQuery
from enginedge.application.tenancy import Principal
from enginedge.application.waiters import Waiter
from enginedge.domain.errors import (
    CannotCancel,
    InvalidTaskType,
    NoEligibleWorkers,
    RateLimitExceeded,
    RequestNotFound,
)
from enginedge.domain.messages import new_traceparent, valid_traceparent
from enginedge.domain.model import TERMINAL_NAMES, Request, RequestEvent, Worker
from enginedge.domain.routing import choose_worker
from enginedge.domain.tasks import BUILTIN_TASKS, check_payload, check_task_type, parse_metadata

MAX_PAGE = 500


@dataclass(frozen=True, slots=True)
class SubmitCommand:
    task_type: str
    payload: dict[str, Any]
    caller: str
    metadata: dict[str, Any] = field(default_factory=dict)
    idempotency_key: str | None = None
    traceparent: str | None = None
    request_id: uuid.UUID = field(default_factory=uuid.uuid4)


@dataclass(frozen=True, slots=True)
class Submission:
    request: Request
    created: bool
    estimated_duration: float | None


async def check_rate(ctx: Context, caller: str) -> None:
    """Count one call by ``caller``; raise when it is over the limit."""
    retry_after = await ctx.limiter.hit(
        caller, ctx.policy.rate_limit, ctx.policy.rate_limit_window_seconds, ctx.clock.now()
    )
    if retry_after is not None:
        raise RateLimitExceeded(retry_after)


def known_task_types(workers: list[Worker]) -> set[str]:
    known = set(BUILTIN_TASKS)
    for worker in workers:
        known.update(worker.capabilities)
    return known


async def submit(ctx: Context, cmd: SubmitCommand) -> Submission:
    """Accept a task: validate, route, persist with its dispatch in one transaction."""
    check_task_type(cmd.task_type)
    meta = parse_metadata(cmd.metadata)
    if cmd.idempotency_key is not None:
        async with ctx.store.transaction() as tx:
            existing = await tx.find_by_idempotency_key(cmd.caller, cmd.idempotency_key)
        if existing is not None:
            return _replay(ctx, existing)
    now = ctx.clock.now()
    worker = await _route(ctx, cmd, now)
    await _check_queue_room(ctx, cmd.caller)
    timeout = timedelta(seconds=meta.timeout) if meta.timeout else ctx.policy.request_timeout
    request = Request(
        id=cmd.request_id,
        task_type=cmd.task_type,
        payload=cmd.payload,
        metadata=cmd.metadata,
        worker_type=worker.type,
        created_at=now,
        updated_at=now,
        deadline=now + timeout,
        max_attempts=ctx.policy.max_attempts,
        priority=meta.priority,
        correlation_id=meta.correlation_id,
        idempotency_key=cmd.idempotency_key,
        caller=cmd.caller,
        traceparent=valid_traceparent(cmd.traceparent) or new_traceparent(),
    )
    try:
        await ctx.writer.add(request)
    except IdempotencyKeyTaken:
        assert cmd.idempotency_key is not None
        async with ctx.store.transaction() as tx:
            existing = await tx.find_by_idempotency_key(cmd.caller, cmd.idempotency_key)
        if existing is None:  # pragma: no cover - the winner cannot vanish
            raise
        return _replay(ctx, existing)
    ctx.wake_scheduler()
    ctx.metrics.request_accepted(request.task_type, request.worker_type)
    return Submission(request, True, ctx.durations.get(request.task_type))


async def submit_and_wait(ctx: Context, cmd: SubmitCommand, timeout: float) -> Submission:
    """Accept a task as :func:`submit` does, then wait up to ``timeout`` seconds for its
    outcome: the submission holds the request as it is then (terminal if it finished)."""
    deadline = asyncio.get_running_loop().time() + timeout
    # Watching before the request exists: its outcome cannot come between the commit and
    # the wait unseen.
    with ctx.waiters.watch(cmd.request_id) as waiter:
        submission = await submit(ctx, cmd)
        if not submission.created:
            left = deadline - asyncio.get_running_loop().time()
            request = await wait_for_request(ctx, submission.request.id, max(left, 0.0))
        else:
            request = await _outcome(ctx, waiter, deadline)
    return Submission(request, submission.created, submission.estimated_duration)


# What a tenant over its queue limit is told to wait before trying again: about one
# scheduling turn of a busy fleet.
QUEUE_FULL_RETRY_AFTER = 1


async def _check_queue_room(ctx: Context, tenant: str) -> None:
    """429 for a tenant that already has ``TENANT_MAX_QUEUED`` requests waiting. Counted
    before the write: replicas accepting the same tenant's requests at the same instant may
    each let one more in."""
    limit = ctx.policy.tenant_max_queued
    if limit is not None and await ctx.store.count_waiting(tenant) >= limit:
        raise RateLimitExceeded(
            QUEUE_FULL_RETRY_AFTER, f"Too many requests waiting: at most {limit} per API key"
        )


async def _route(ctx: Context, cmd: SubmitCommand, now: datetime) -> Worker:
    """The worker (type) to send the task to. The fleet may come from a local copy a moment
    old: a "no" is checked once more against the registry itself before the caller hears it."""
    try:
        return _choose(ctx, cmd, now, await ctx.registry.all())
    except (InvalidTaskType, NoEligibleWorkers):
        return _choose(ctx, cmd, now, await ctx.registry.all(fresh=True))


def _choose(ctx: Context, cmd: SubmitCommand, now: datetime, workers: list[Worker]) -> Worker:
    if cmd.task_type not in known_task_types(workers):
        raise InvalidTaskType(f"Unknown task type {cmd.task_type}: no worker has announced it")
    check_payload(cmd.task_type, cmd.payload)
    return choose_worker(workers, cmd.task_type, now, ctx.policy.heartbeat_ttl)


def _replay(ctx: Context, request: Request) -> Submission:
    return Submission(request, False, ctx.durations.get(request.task_type))


def _not_found(request_id: uuid.UUID) -> RequestNotFound:
    # The one answer for an unknown id and for another tenant's request alike.
    return RequestNotFound(f"Request {request_id} not found")


def _visible(request: Request, viewer: Principal | None) -> Request:
    """``request`` if ``viewer`` may see it (None: no restriction), else not found."""
    if viewer is not None and not viewer.sees(request.caller):
        raise _not_found(request.id)
    return request


async def get_request(
    ctx: Context,
    request_id: uuid.UUID,
    *,
    primary: bool = False,
    viewer: Principal | None = None,
) -> Request:
    """A request by id: finished ones from the cache, running ones from the store (its read
    replica, if any, unless ``primary``). Another tenant's request than ``viewer``'s is not
    found, exactly as an unknown id."""
    request = await ctx.request_cache.get(request_id)
    if request is not None:
        return _visible(request, viewer)
    request = await (ctx.store if primary else ctx.reads).get_request(request_id)
    if request is None:
        raise _not_found(request_id)
    if request.terminal:
        await ctx.request_cache.put_all([request])
    return _visible(request, viewer)


async def wait_for_request(
    ctx: Context, request_id: uuid.UUID, timeout: float, *, viewer: Principal | None = None
) -> Request:
    """A request once it is terminal, or as it is after ``timeout`` seconds (long polling).

    A waiting caller costs nothing while it waits: it is woken when its request finishes
    (see application.waiters) and reads the outcome from the request cache, where it is put
    as it is recorded. The store is read only for a request without events (unknown, or its
    events expired), for the answer of a wait that ran out, and on a cache miss; and once
    up front for a ``viewer`` limited to its own tenant, so that another tenant's request
    is not found at once, as an unknown id is, instead of after the wait.
    """
    if timeout <= 0 or ctx.waiters.closed:
        return await get_request(ctx, request_id, viewer=viewer)
    deadline = asyncio.get_running_loop().time() + timeout
    with ctx.waiters.watch(request_id) as waiter:
        history = await ctx.events.history(request_id, None)
        if any(_is_terminal(e) for e in history):
            return await get_request(ctx, request_id, primary=True, viewer=viewer)
        if not history or (viewer is not None and viewer.scope is not None):
            # 404 for an unknown id, or another tenant's
            request = await get_request(ctx, request_id, viewer=viewer)
            if request.terminal:
                return request
        return await _outcome(ctx, waiter, deadline, viewer=viewer)


async def _outcome(
    ctx: Context, waiter: Waiter, deadline: float, *, viewer: Principal | None = None
) -> Request:
    """The request ``waiter`` watches, once terminal, at ``deadline`` (loop time), or as
    soon as this process starts shutting down."""
    while not ctx.waiters.closed:
        try:
            async with asyncio.timeout_at(deadline):
                await waiter.woken.wait()
        except TimeoutError:
            break
        if waiter.outcome is not None:
            return _visible(waiter.outcome, viewer)
        # Finished elsewhere, or an announcement may have been missed: look. A read
        # replica may not have the outcome yet, the primary has.
        waiter.woken.clear()
        request = await get_request(ctx, waiter.request_id, primary=True, viewer=viewer)
        if request.terminal:
            return request
    # The primary: a request accepted a moment ago may not be on a replica yet.
    return await get_request(ctx, waiter.request_id, primary=True, viewer=viewer)


def _is_terminal(event: RequestEvent) -> bool:
    return event.type == "status" and event.data.get("status") in TERMINAL_NAMES


async def list_requests(
    ctx: Context, query: RequestQuery, *, viewer: Principal | None = None
) -> tuple[list[Request], str | None]:
    """A page of requests, newest first, and the cursor of the next page (None at the end).
    A ``viewer`` limited to its own tenant lists only its own requests, whatever
    ``query.caller`` says."""
    limit = max(1, min(query.limit, MAX_PAGE))
    caller = query.caller
    if viewer is not None and viewer.scope is not None:
        if caller is not None and caller != viewer.scope:
            return [], None
        caller = viewer.scope
    rows = await ctx.reads.list_requests(
        RequestQuery(
            statuses=query.statuses,
            task_type=query.task_type,
            created_after=query.created_after,
            created_before=query.created_before,
            caller=caller,
            limit=limit + 1,
            cursor=query.cursor,
        )
    )
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at, last.id)


def encode_cursor(created_at: datetime, request_id: uuid.UUID) -> str:
    """An opaque, URL-safe page position: the last row's creation time and id."""
    raw = f"{created_at.isoformat()}~{request_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, uuid.UUID] | None:
    """The position a cursor names, or None if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, sep, ident = raw.partition("~")
        if not sep:
            return None
        return datetime.fromisoformat(created), uuid.UUID(ident)
    except ValueError:  # binascii.Error and UnicodeDecodeError are ValueErrors
        return None


async def cancel(
    ctx: Context, request_id: uuid.UUID, *, viewer: Principal | None = None
) -> Request:
    """Cancel a request that has not finished; the worker holding it is told to stop.
    Another tenant's request than ``viewer``'s is not found, exactly as an unknown id."""
    now = ctx.clock.now()
    async with ctx.store.transaction() as tx:
        request = await tx.lock_request(request_id)
        if request is None:
            raise _not_found(request_id)
        _visible(request, viewer)
        if request.terminal:
            raise CannotCancel(
                f"Request {request_id} is already {request.status.value} and cannot be cancelled"
            )
        request.cancel(now)
        await finish(ctx, tx, request, now)
        await tx.enqueue([cancel_message(request)])
    ctx.wake_relay()
    finished(ctx, request)
    await ctx.events.append(status_event(request))
    return request
