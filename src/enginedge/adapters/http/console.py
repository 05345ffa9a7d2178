"""The operator console: a static web page at ``/console`` and the JSON and SSE endpoints
it reads under ``/api/console``.

The page is plain HTML, CSS and JavaScript shipped in the package (``console/``): no build
step, nothing fetched from elsewhere. It calls the API with the key in the ``X-API-Key``
header (kept in the browser's sessionStorage, never in a URL), and reads the live feed with
``fetch`` and a stream reader, since ``EventSource`` cannot send headers.

What a key sees is what the API shows it (SPEC §3): a tenant's key its own requests and
activity, an operator's key (``ADMIN_API_KEYS``) every tenant's, with a tenant column, and
the dead letters; every key sees the fleet.

The live feed is pushed by the server, which reads the shared store and worker registry
every second and sends what changed. Reading shared state (rather than following one
replica's in-memory events) is what lets any replica serve the console: a request's changes
are recorded by whichever replica consumed its result.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.params import Depends
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from pydantic import Field
from sse_starlette import EventSourceResponse, ServerSentEvent

from enginedge.adapters.http.auth import Caller, tenants_of
from enginedge.adapters.http.params import context_of, parse_statuses
from enginedge.adapters.http.schemas import ErrorBody, Model, WorkerView
from enginedge.application import console as use
from enginedge.application import requests as requests_use
from enginedge.application.context import Context
from enginedge.application.ports import DeadLetter, RequestQuery
from enginedge.application.tenancy import Principal, Tenants
from enginedge.domain.model import Request as DomainRequest

ASSETS = Path(__file__).parent / "console"
FEED_INTERVAL_SECONDS = 1.0
# Activity and dead letters change slowly and cost more to read: every this many ticks.
SLOW_EVERY_TICKS = 3
FEED_PAGE = 100
# A feed ends after this long and the page reconnects: no stream outlives a deploy by much.
FEED_MAX_SECONDS = 120.0
# The page may only load what the service itself serves.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


class RequestSummary(Model):
    """A row of the console's request table."""

    requestId: str
    tenant: str | None = Field(
        description="Whose request: its key's name, else the key's tenant hash"
    )
    taskType: str
    status: str
    workerType: str
    workerId: str | None
    attempts: int
    createdAt: datetime
    updatedAt: datetime
    finishedAt: datetime | None
    processingTime: int | None = Field(description="Milliseconds the worker spent on it")
    error: str | None

    @classmethod
    def of(cls, r: DomainRequest, tenant: str | None = None) -> RequestSummary:
        """The summary of a request; ``tenant`` is how to call its tenant (default: hash)."""
        return cls(
            requestId=str(r.id),
            tenant=tenant if tenant is not None else r.caller,
            taskType=r.task_type,
            status=r.status.value,
            workerType=r.worker_type,
            workerId=r.worker_id,
            attempts=r.attempts,
            createdAt=r.created_at,
            updatedAt=r.updated_at,
            finishedAt=r.finished_at,
            processingTime=r.processing_time_ms,
            error=(r.error or "")[:300] or None,
        )


class SeriesView(Model):
    """One worker type's points, one per bucket."""

    throughput: list[int] = Field(description="Requests finished in each bucket")
    latencyP50: list[float | None] = Field(
        description="Median seconds from acceptance to a terminal state (null: none finished)"
    )
    latencyP95: list[float | None]
    queueDepth: list[int] = Field(description="Requests waiting for a worker at bucket end")


class ActivityView(Model):
    """Recent activity per worker type, derived from the stored request timestamps."""

    start: datetime
    bucketSeconds: float
    buckets: list[datetime] = Field(description="The end of each bucket")
    series: dict[str, SeriesView]
    truncated: bool = Field(description="More requests than the console reads; partial")


class DeadLetterView(Model):
    """A message that landed on a dead-letter topic."""

    id: str
    topic: str
    key: str
    reason: str
    failedAt: datetime
    requestId: str | None
    message: dict[str, Any] = Field(description="The original message")

    @classmethod
    def of(cls, d: DeadLetter) -> DeadLetterView:
        """The view of a dead letter."""
        return cls(
            id=d.id,
            topic=d.topic,
            key=d.key,
            reason=d.reason,
            failedAt=d.failed_at,
            requestId=d.request_id,
            message=dict(d.message),
        )


class DeadLetterList(Model):
    """Dead letters, newest first."""

    items: list[DeadLetterView]


class SessionView(Model):
    """Who the console is signed in as."""

    tenant: str = Field(description="The key's name, else its tenant hash")
    admin: bool = Field(
        description="An operator's key: every tenant's requests, and the dead letters"
    )


def _activity_view(activity: use.Activity) -> ActivityView:
    return ActivityView(
        start=activity.start,
        bucketSeconds=activity.bucket_seconds,
        buckets=activity.buckets,
        series={
            k: SeriesView(
                throughput=s.throughput,
                latencyP50=s.p50,
                latencyP95=s.p95,
                queueDepth=s.queue_depth,
            )
            for k, s in activity.series.items()
        },
        truncated=activity.truncated,
    )


async def _workers_payload(ctx: Context) -> dict[str, Any]:
    return {
        "items": [
            WorkerView.of(w, status.value).model_dump(mode="json")
            for w, status in await use.fleet(ctx)
        ]
    }


api = APIRouter(prefix="/api/console", tags=["console"])


@api.get("/session", response_model=SessionView)
async def session(caller: Caller) -> SessionView:
    """The key the console signed in with: its tenant and whether it is an operator's."""
    return SessionView(tenant=caller.label, admin=caller.admin)


@api.get("/activity", response_model=ActivityView)
async def activity(
    request: Request, caller: Caller, minutes: Annotated[int, Query(ge=1, le=60)] = 10
) -> ActivityView:
    """Throughput, latency quantiles and queue depth per worker type over the last
    ``minutes``, in 60 buckets; read from the shared store, the same on every replica.
    A tenant's key sees its own requests' activity, an operator's key everyone's."""
    return _activity_view(await use.activity(context_of(request), minutes, caller))


@api.get("/dead-letters", response_model=DeadLetterList)
async def dead_letters(
    request: Request, caller: Caller, limit: Annotated[int, Query(ge=1, le=500)] = 100
) -> DeadLetterList:
    """What landed on the dead-letter topics, and why, newest first (kept 30 days). For
    operators' keys only: a tenant's key gets an empty list."""
    letters = await use.dead_letters(context_of(request), limit, caller)
    return DeadLetterList(items=[DeadLetterView.of(d) for d in letters])


class _Feed:
    """One console's live feed: sends each part when it differs from what was last sent."""

    def __init__(
        self,
        ctx: Context,
        query: RequestQuery,
        since_minutes: int | None,
        viewer: Principal,
        tenants: Tenants,
    ) -> None:
        self.ctx = ctx
        self.query = query
        self.since_minutes = since_minutes
        self.viewer = viewer
        self.tenants = tenants
        self.sent: dict[str, str] = {}

    def _changed(self, name: str, body: bytes) -> bool:
        digest = hashlib.sha256(body).hexdigest()
        if self.sent.get(name) == digest:
            return False
        self.sent[name] = digest
        return True

    async def _requests(self) -> dict[str, Any]:
        query = self.query
        if self.since_minutes is not None:
            since = self.ctx.clock.now() - timedelta(minutes=self.since_minutes)
            query = RequestQuery(
                statuses=query.statuses,
                task_type=query.task_type,
                created_after=since,
                limit=query.limit,
            )
        rows, _ = await requests_use.list_requests(self.ctx, query, viewer=self.viewer)
        return {
            "items": [
                RequestSummary.of(r, self.tenants.label(r.caller)).model_dump(mode="json")
                for r in rows
            ]
        }

    async def _slow(self) -> list[tuple[str, Any]]:
        activity = _activity_view(await use.activity(self.ctx, 10, self.viewer))
        letters = [DeadLetterView.of(d) for d in await use.dead_letters(self.ctx, 100, self.viewer)]
        return [
            ("activity", activity.model_dump(mode="json")),
            ("deadLetters", {"items": [d.model_dump(mode="json") for d in letters]}),
        ]

    async def events(self) -> AsyncIterator[ServerSentEvent]:
        tick = 0
        loop = asyncio.get_running_loop()
        ends = loop.time() + FEED_MAX_SECONDS
        while loop.time() < ends:
            try:
                parts: list[tuple[str, Any]] = [
                    ("requests", await self._requests()),
                    ("workers", await _workers_payload(self.ctx)),
                ]
                if tick % SLOW_EVERY_TICKS == 0:
                    parts += await self._slow()
                self.sent.pop("error", None)
            except Exception as exc:  # say so on the page, and keep trying
                parts = [("error", {"message": f"{type(exc).__name__}: {exc}"[:300]})]
            for name, payload in parts:
                body = orjson.dumps(payload)
                if self._changed(name, body):
                    yield ServerSentEvent(data=body.decode(), event=name)
            tick += 1
            await asyncio.sleep(FEED_INTERVAL_SECONDS)


@api.get(
    "/feed",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "Events `requests` (RequestSummary items), `workers` (WorkerList), "
            "`activity` (ActivityView), `deadLetters` (DeadLetterList) and `error`, each sent "
            "when it changes (checked every second; activity and dead letters every 3 s). "
            "A tenant's key gets its own requests and activity and no dead letters; an "
            "operator's key everything",
        },
        422: {"model": ErrorBody, "description": "INVALID_REQUEST_PAYLOAD"},
    },
)
async def feed(
    request: Request,
    caller: Caller,
    status: Annotated[
        list[str] | None, Query(description="Repeat or comma-separate: PENDING, COMPLETED, ...")
    ] = None,
    taskType: Annotated[str | None, Query(max_length=50)] = None,
    sinceMinutes: Annotated[
        int | None, Query(ge=1, le=60 * 24 * 30, description="Created in the last N minutes")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=FEED_PAGE)] = 50,
) -> EventSourceResponse:
    """The console's live feed (Server-Sent Events): the newest requests matching the filters,
    the fleet, recent activity and dead letters, each sent again whenever it changes."""
    query = RequestQuery(statuses=parse_statuses(status), task_type=taskType, limit=limit)
    ctx = context_of(request)
    events = _Feed(ctx, query, sinceMinutes, caller, tenants_of(request)).events()
    feed = ctx.waiters.until_closed(events)
    return EventSourceResponse(feed, ping=15, send_timeout=30)


pages = APIRouter(include_in_schema=False)


@pages.get("/console")
async def console_page() -> FileResponse:
    """The console's single page; it signs in and reads the API from the browser."""
    return FileResponse(
        ASSETS / "index.html",
        media_type="text/html; charset=utf-8",
        headers={
            "Content-Security-Policy": CONTENT_SECURITY_POLICY,
            "Cache-Control": "no-cache",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def mount_console(app: FastAPI, authenticated: Depends, responses: dict[int | str, Any]) -> None:
    """Add the console's page, its assets and its API (behind ``authenticated``) to ``app``."""
    app.include_router(api, dependencies=[authenticated], responses=responses)
    app.include_router(pages)
    app.mount("/console/assets", StaticFiles(directory=ASSETS), name="console-assets")
