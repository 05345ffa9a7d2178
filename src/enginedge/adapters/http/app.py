"""The HTTP adapter (SPEC §3): routes that translate HTTP into use-case calls."""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Response
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

from enginedge import __version__
from enginedge.adapters.http.auth import Caller, KeyChecker, authenticated, tenants_of
from enginedge.adapters.http.console import mount_console
from enginedge.adapters.http.errors import install_error_handlers
from enginedge.adapters.http.limits import BodySizeLimit
from enginedge.adapters.http.params import context_of, parse_statuses
from enginedge.adapters.http.schemas import (
    ErrorBody,
    HealthView,
    OrchestrateBody,
    OrchestrateResponse,
    ProbeView,
    RequestPage,
    RequestView,
    WorkerList,
    WorkerView,
)
from enginedge.adapters.telemetry.tracing import TracingMiddleware, current_traceparent
from enginedge.application import requests as use
from enginedge.application.context import Context
from enginedge.application.events import status_event
from enginedge.application.health import check_components, fleet_counts, health
from enginedge.application.ports import RequestQuery
from enginedge.application.scheduler import queue_position, slots_in_use
from enginedge.application.tenancy import Principal
from enginedge.config import ApiKey
from enginedge.domain.errors import InvalidPayload, RequestNotFound, WorkerNotFound
from enginedge.domain.model import Request as DomainRequest
from enginedge.domain.model import RequestEvent, RequestStatus
from enginedge.service import Service

log = logging.getLogger(__name__)

SSE_IDLE_SECONDS = 15.0

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "INVALID_API_KEY"},
    429: {"model": ErrorBody, "description": "RATE_LIMIT_EXCEEDED (see Retry-After)"},
    503: {"model": ErrorBody, "description": "SERVICE_UNAVAILABLE"},
}


async def get_ctx(request: Request) -> Context:
    # A coroutine, not a plain function: FastAPI runs plain dependencies in a thread pool,
    # a thread hand-off on every call.
    return context_of(request)


Ctx = Annotated[Context, Depends(get_ctx)]


def _view(request: Request, r: DomainRequest, queue_position: int | None = None) -> RequestView:
    """The API's view of a request, its tenant by name when the key has one."""
    return RequestView.of(r, tenants_of(request).label(r.caller), queue_position)


def _parse_id(request_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(request_id)
    except ValueError:
        raise RequestNotFound(f"Request {request_id[:64]} not found") from None


api = APIRouter(prefix="/api", responses=ERRORS)
MAX_WAIT_SECONDS = 60


WAIT_DESCRIPTION = (
    "Long polling: answer as soon as the request is terminal, or after this many seconds "
    "with its status then"
)


def _json(
    model: BaseModel, status_code: int = 200, headers: dict[str, str] | None = None
) -> Response:
    # The hot endpoints answer with the model's own JSON: FastAPI would validate the model
    # it was just given a second time before writing it.
    return Response(
        model.__pydantic_serializer__.to_json(model),
        status_code=status_code,
        headers=headers,
        media_type="application/json",
    )


@api.post(
    "/orchestrate",
    status_code=202,
    response_model=OrchestrateResponse,
    responses={
        200: {
            "model": RequestView,
            "description": "With `wait`: the request finished within it (its outcome)",
        },
        413: {"model": ErrorBody, "description": "PAYLOAD_TOO_LARGE"},
        422: {"model": ErrorBody, "description": "INVALID_TASK_TYPE or INVALID_REQUEST_PAYLOAD"},
        503: {"model": ErrorBody, "description": "NO_ELIGIBLE_WORKERS or SERVICE_UNAVAILABLE"},
    },
    summary="Submit a task",
)
async def orchestrate(
    request: Request,
    body: OrchestrateBody,
    ctx: Ctx,
    caller: Caller,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=255,
            description="A retry with the same key returns the first request",
        ),
    ] = None,
    traceparent: Annotated[str | None, Header(max_length=64)] = None,
    wait: Annotated[
        float,
        Query(
            ge=0,
            le=MAX_WAIT_SECONDS,
            description="Wait up to this many seconds for the outcome: 200 with the finished "
            "request if it finished by then, else 202 as without it",
        ),
    ] = 0,
) -> Response:
    """Accept a task; it is durable once this answers (202, or 200 with ``wait``). Follow it
    at ``statusUrl``."""
    command = use.SubmitCommand(
        task_type=body.taskType,
        payload=body.payload,
        metadata=body.metadata or {},
        caller=caller.tenant,
        idempotency_key=idempotency_key,
        # The HTTP span's context when tracing, so the whole trace hangs from it.
        traceparent=current_traceparent() or traceparent,
    )
    if wait > 0:
        submission = await use.submit_and_wait(ctx, command, wait)
    else:
        submission = await use.submit(ctx, command)
    headers = None if submission.created else {"Idempotent-Replayed": "true"}
    r = submission.request
    if submission.created:
        log.info(
            "request accepted",
            extra={
                "requestId": str(r.id),
                "tenant": caller.label,
                "taskType": r.task_type,
                "workerType": r.worker_type,
                "priority": r.priority,
                "correlationId": r.correlation_id,
            },
        )
    if wait > 0 and r.terminal:
        return _json(_view(request, r), 200, headers)
    return _json(
        OrchestrateResponse(
            requestId=str(r.id),
            status=r.status.value,
            workerType=r.worker_type,
            estimatedDuration=submission.estimated_duration,
            statusUrl=f"/api/requests/{r.id}",
        ),
        202,
        headers,
    )


@api.get(
    "/requests/{request_id}",
    response_model=RequestView,
    responses={404: {"model": ErrorBody, "description": "REQUEST_NOT_FOUND"}},
)
async def get_request(
    request: Request,
    request_id: str,
    ctx: Ctx,
    caller: Caller,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS, description=WAIT_DESCRIPTION)] = 0,
) -> Response:
    """Status, timestamps, attempts, worker, and the result or error once terminal. Another
    tenant's request is not found (an operator's key sees every tenant's)."""
    found = await use.wait_for_request(ctx, _parse_id(request_id), wait, viewer=caller)
    return _json(_view(request, found, await queue_position(ctx, found)))


def _parse_time(value: str | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidPayload(f"{name} must be an ISO-8601 timestamp") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@api.get("/requests", response_model=RequestPage)
async def list_requests(
    request: Request,
    ctx: Ctx,
    caller: Caller,
    status: Annotated[
        list[str] | None, Query(description="Repeat or comma-separate: PENDING, COMPLETED, ...")
    ] = None,
    taskType: Annotated[str | None, Query(max_length=50)] = None,
    since: Annotated[str | None, Query(description="Created at or after (ISO-8601)")] = None,
    until: Annotated[str | None, Query(description="Created before (ISO-8601)")] = None,
    limit: Annotated[int, Query(ge=1, le=use.MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    tenant: Annotated[
        str | None,
        Query(
            max_length=64,
            description="Only this tenant's requests: a key's name or its tenant hash "
            "(operators; a tenant's key lists only its own requests anyway)",
        ),
    ] = None,
) -> RequestPage:
    """Requests, newest first, with cursor pagination: the caller's own, or every tenant's
    for an operator's key."""
    statuses = parse_statuses(status)
    only = _tenant_filter(request, caller, tenant)
    position = None
    if cursor is not None:
        position = use.decode_cursor(cursor)
        if position is None:
            raise InvalidPayload("cursor is not one this API returned")
    rows, next_cursor = await use.list_requests(
        ctx,
        RequestQuery(
            statuses=statuses,
            task_type=taskType,
            created_after=_parse_time(since, "since"),
            created_before=_parse_time(until, "until"),
            limit=limit,
            cursor=position,
            caller=only,
        ),
        viewer=caller,
    )
    return RequestPage(items=[_view(request, r) for r in rows], nextCursor=next_cursor)


def _tenant_filter(request: Request, caller: Principal, tenant: str | None) -> str | None:
    """The tenant ``?tenant=`` names. A name no key has is refused for an operator; for
    a tenant's key anything but itself just lists nothing (it says nothing about others)."""
    if tenant is None:
        return None
    resolved = tenants_of(request).resolve(tenant)
    if resolved is not None:
        return resolved
    if caller.admin:
        raise InvalidPayload(
            f"tenant {tenant[:64]!r} is neither a key's name nor a tenant hash (16 hex digits)"
        )
    return tenant


@api.post(
    "/requests/{request_id}/cancel",
    response_model=RequestView,
    responses={
        404: {"model": ErrorBody, "description": "REQUEST_NOT_FOUND"},
        409: {"model": ErrorBody, "description": "CANNOT_CANCEL"},
    },
)
async def cancel_request(
    request: Request, request_id: str, ctx: Ctx, caller: Caller
) -> RequestView:
    """Cancel a request that has not finished; its worker is told to stop. Another tenant's
    request is not found (an operator's key may cancel every tenant's)."""
    cancelled = await use.cancel(ctx, _parse_id(request_id), viewer=caller)
    log.info(
        "request cancelled",
        extra={
            "requestId": str(cancelled.id),
            "tenant": tenants_of(request).label(cancelled.caller),
            "cancelledBy": caller.label,
        },
    )
    return _view(request, cancelled)


def _sse(event: RequestEvent) -> ServerSentEvent:
    return ServerSentEvent(
        data=orjson.dumps(event.data).decode(), event=event.type, id=event.id or None
    )


def _is_terminal(event: RequestEvent) -> bool:
    return event.type == "status" and RequestStatus(event.data["status"]).terminal


async def _event_stream(
    ctx: Context, request_id: uuid.UUID, after: str | None
) -> AsyncIterator[ServerSentEvent]:
    async with ctx.events.follow(request_id, after, SSE_IDLE_SECONDS) as stream:
        async for event in ctx.waiters.until_closed(stream):
            if event is None:
                # Quiet for a while: if the request finished where this replica could not
                # see it (events expired, another process), say so from the store.
                current = await ctx.store.get_request(request_id)
                if current is not None and current.terminal:
                    yield _sse(status_event(current))
                    return
                continue
            yield _sse(event)
            if _is_terminal(event):
                return


@api.get(
    "/requests/{request_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "status and progress events until the request ends",
        },
        404: {"model": ErrorBody, "description": "REQUEST_NOT_FOUND"},
    },
)
async def request_events(
    request_id: str,
    ctx: Ctx,
    caller: Caller,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=64)] = None,
    lastEventId: Annotated[str | None, Query(max_length=64)] = None,
) -> EventSourceResponse:
    """Server-Sent Events: every status change and partial result until the request ends.
    Reconnect with ``Last-Event-ID`` to resume where the stream stopped. Another tenant's
    request is not found (an operator's key follows every tenant's)."""
    rid = _parse_id(request_id)
    # Who may follow it is known from the request itself, read before any event is.
    request = await use.get_request(ctx, rid, viewer=caller)
    after = last_event_id or lastEventId
    if request.terminal:
        history = await ctx.events.history(rid, after)
        already_told = after is not None and any(
            _is_terminal(e) for e in await ctx.events.history(rid, None)
        )

        async def replay() -> AsyncIterator[ServerSentEvent]:
            for event in history:
                yield _sse(event)
            if not any(_is_terminal(e) for e in history) and not already_told:
                yield _sse(status_event(request))

        return EventSourceResponse(replay(), ping=SSE_IDLE_SECONDS)
    return EventSourceResponse(_event_stream(ctx, rid, after), ping=SSE_IDLE_SECONDS)


@api.get("/workers", response_model=WorkerList)
async def list_workers(ctx: Ctx, caller: Caller) -> WorkerList:
    """The registry: every known worker with its health and load."""
    now = ctx.clock.now()
    workers = await ctx.registry.all() or await ctx.store.list_workers()
    in_use = await slots_in_use(ctx)
    return WorkerList(
        items=[
            WorkerView.of(
                w, w.effective_status(now, ctx.policy.heartbeat_ttl).value, in_use.get(w.id, 0)
            )
            for w in sorted(workers, key=lambda w: (w.type, w.id))
        ]
    )


@api.get(
    "/workers/{worker_id}",
    response_model=WorkerView,
    responses={404: {"model": ErrorBody, "description": "WORKER_NOT_FOUND"}},
)
async def get_worker(worker_id: str, ctx: Ctx, caller: Caller) -> WorkerView:
    worker = await ctx.registry.get(worker_id)
    if worker is None:
        worker = next((w for w in await ctx.store.list_workers() if w.id == worker_id), None)
    if worker is None:
        raise WorkerNotFound(f"Worker {worker_id[:64]} not found")
    status = worker.effective_status(ctx.clock.now(), ctx.policy.heartbeat_ttl)
    return WorkerView.of(worker, status.value, (await slots_in_use(ctx)).get(worker.id, 0))


probes = APIRouter(tags=["probes"])


@probes.get("/live", response_model=ProbeView)
async def live() -> ProbeView:
    """The process and its event loop answer."""
    return ProbeView(status="ok")


@probes.get(
    "/ready",
    response_model=ProbeView,
    responses={503: {"model": ProbeView, "description": "not ready"}},
)
async def ready(ctx: Ctx, response: Response) -> ProbeView:
    """Store (with migrations applied), bus and cache reachable."""
    components = await check_components(ctx)
    is_ready = all(c.status == "up" for c in components.values())
    if not is_ready:
        response.status_code = 503
    return ProbeView(
        status="ready" if is_ready else "not ready",
        components={
            k: {"status": v.status, "error": v.error}  # type: ignore[misc]
            for k, v in components.items()
        },
    )


@probes.get(
    "/health",
    response_model=HealthView,
    responses={503: {"model": HealthView, "description": "not serving"}},
)
async def health_view(request: Request, ctx: Ctx, response: Response) -> HealthView:
    """Overall status, each component, and each worker type (healthy/total)."""
    report = await health(ctx)
    service: Service = request.app.state.service
    service.metrics.set_fleet(report.workers)
    if not report.ready:
        response.status_code = 503
    return HealthView(
        status=report.status,  # type: ignore[arg-type]
        timestamp=ctx.clock.now(),
        components={
            k: {"status": v.status, "error": v.error}  # type: ignore[misc]
            for k, v in report.components.items()
        },
        workers=report.workers,
    )


@probes.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
async def metrics(request: Request, ctx: Ctx) -> Response:
    """Prometheus text format."""
    service: Service = request.app.state.service
    # Only the fleet counts: a scrape need not probe every backing service (/ready does).
    fleet = await fleet_counts(ctx)
    service.metrics.set_fleet(fleet)
    # The store being down must not hide the other series (/ready reports it).
    with contextlib.suppress(Exception):
        service.metrics.outbox_backlog.set(await ctx.store.outbox_backlog())
        service.metrics.set_queue_depth(await ctx.store.queue_depth(), fleet)
        counts = await ctx.store.tenant_counts()
        service.metrics.set_tenants(
            {
                name: (counts[t].waiting, counts[t].running) if t in counts else (0, 0)
                for t, name in ctx.tenants.named().items()
            }
        )
    return Response(service.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


def create_app(service: Service, keys: Sequence[ApiKey], max_body_bytes: int) -> FastAPI:
    """The ASGI app around a built (not yet started) :class:`Service`."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="EnginEdge Main Hexagon",
        version=__version__,
        description="Orchestrator for AI/ML workloads: submit tasks, follow them, watch the "
        "fleet. Authenticate with `X-API-Key` (or `Authorization: Bearer`). Each key is a "
        "tenant and sees only its own requests; operators' keys (`ADMIN_API_KEYS`) see every "
        "tenant's.",
        lifespan=lifespan,
        # Spans come from TracingMiddleware (Tracing, configured by OTEL_*): FastAPI's own
        # instrumentation would double them, and costs a check of the providers per call.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(TracingMiddleware, tracing=service.tracing)
    app.state.service = service
    app.state.keys = KeyChecker(keys)
    # One directory of names for the API, the logs and the metrics.
    service.ctx.tenants = app.state.keys.tenants
    install_error_handlers(app)
    app.include_router(api)
    app.include_router(probes)
    mount_console(app, Depends(authenticated), ERRORS)

    @app.get("/", include_in_schema=False)
    async def root() -> dict[str, str]:
        return {"service": "enginedge-main-hexagon", "docs": "/docs", "openapi": "/openapi.json"}

    return app
