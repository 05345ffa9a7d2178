"""OpenTelemetry tracing: one trace from the HTTP request through the bus into the worker
and back (SPEC §8).

Off unless an exporter is configured: the standard ``OTEL_EXPORTER_OTLP_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``, or the guide's ``JAEGER_AGENT_HOST`` (mapped onto
OTLP/HTTP, which Jaeger receives natively). Off, :meth:`Tracing.span` does no work at all.

Spans are made at the edges, never in the core: the HTTP request (middleware), each store
transaction, each publish (the message's ``traceparent`` header is its parent, and is
replaced by the publish span's own context), the worker's handling, and the recording of
each worker message.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from enginedge.application.ports import BusMessage, MessageBus, Subscription
from enginedge.domain.messages import HEARTBEATS_TOPIC

PROPAGATOR = TraceContextTextMapPropagator()
DEFAULT_SERVICE = "main-hexagon"


def exporter_endpoint(environ: Mapping[str, str]) -> str | None:
    """Where spans go: OTLP/HTTP traces endpoint from the OTEL_* or JAEGER_* variables."""
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    explicit = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if explicit:
        return explicit
    base = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if base:
        return base.rstrip("/") + "/v1/traces"
    host = environ.get("JAEGER_AGENT_HOST")
    if host:
        # 6831 is the agent's Thrift port, which OpenTelemetry no longer speaks; Jaeger takes
        # OTLP/HTTP on 4318 of the same host. Any other port is taken as its OTLP port.
        port = environ.get("JAEGER_AGENT_PORT", "6831")
        port = "4318" if port in ("6831", "6832", "") else port
        return f"http://{host}:{port}/v1/traces"
    return None


class Tracing:
    """Spans for the adapters; a no-op unless :func:`configure_tracing` enabled it."""

    def __init__(self, tracer: trace.Tracer | None = None, provider: Any = None) -> None:
        self._tracer = tracer
        self._provider = provider

    @property
    def enabled(self) -> bool:
        return self._tracer is not None

    @contextmanager
    def span(
        self,
        name: str,
        parent: str | None = None,
        *,
        kind: str = "internal",
        attributes: Mapping[str, Any] | None = None,
    ) -> Iterator[str | None]:
        """Run the block in a new span, child of ``parent`` (a ``traceparent``) or of the
        current span; yield the new span's ``traceparent`` (``parent`` when off)."""
        if self._tracer is None:
            yield parent
            return
        ctx = PROPAGATOR.extract({"traceparent": parent}) if parent else None
        span_kind = {
            "server": trace.SpanKind.SERVER,
            "producer": trace.SpanKind.PRODUCER,
            "consumer": trace.SpanKind.CONSUMER,
            "client": trace.SpanKind.CLIENT,
        }.get(kind, trace.SpanKind.INTERNAL)
        with self._tracer.start_as_current_span(
            name, context=ctx, kind=span_kind, attributes=dict(attributes or {})
        ):
            yield current_traceparent()

    def shutdown(self) -> None:
        """Flush what is buffered (at exit)."""
        if self._provider is not None:
            self._provider.shutdown()


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    PROPAGATOR.inject(carrier, context=otel_context.get_current())
    return carrier.get("traceparent")


def configure_tracing(
    default_service: str = DEFAULT_SERVICE, environ: Mapping[str, str] | None = None
) -> Tracing:
    """A :class:`Tracing` exporting over OTLP/HTTP if configured, else the no-op one."""
    env = os.environ if environ is None else environ
    endpoint = exporter_endpoint(env)
    if endpoint is None:
        return Tracing()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = env.get("OTEL_SERVICE_NAME") or env.get("JAEGER_SERVICE_NAME") or default_service
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider.get_tracer("enginedge"), provider)


class TracedBus:
    """A message bus whose every published message gets a producer span, linked to the
    trace in its ``traceparent`` header, which then carries the span on."""

    def __init__(self, bus: MessageBus, tracing: Tracing) -> None:
        self._bus = bus
        self._tracing = tracing

    @property
    def durable(self) -> bool:
        return bool(self._bus.durable)

    async def publish(self, messages: Sequence[BusMessage]) -> None:
        with ExitStack() as stack:
            traced = []
            for m in messages:
                if m.topic == HEARTBEATS_TOPIC:  # liveness, not part of any request's trace
                    traced.append(m)
                    continue
                traceparent = stack.enter_context(
                    self._tracing.span(
                        f"publish {m.topic}",
                        m.headers.get("traceparent"),
                        kind="producer",
                        attributes={
                            "messaging.destination.name": m.topic,
                            "messaging.message.id": m.key,
                        },
                    )
                )
                headers = dict(m.headers)
                if traceparent:
                    headers["traceparent"] = traceparent
                traced.append(BusMessage(m.topic, m.key, m.value, headers))
            await self._bus.publish(traced)

    async def subscribe(
        self, topics: Sequence[str], group: str | None, *, urgent: bool = True
    ) -> Subscription:
        return await self._bus.subscribe(topics, group, urgent=urgent)

    async def prepare(self, topics: Sequence[str]) -> None:
        await self._bus.prepare(topics)

    async def ping(self) -> None:
        await self._bus.ping()

    async def close(self) -> None:
        await self._bus.close()


class TracingMiddleware:
    """A server span per HTTP request, child of the caller's ``traceparent`` if it sent one."""

    def __init__(self, app: Any, tracing: Tracing) -> None:
        self.app = app
        self.tracing = tracing

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.tracing.enabled:
            await self.app(scope, receive, send)
            return
        parent = dict(scope["headers"]).get(b"traceparent")
        name = f"{scope['method']} {scope['path']}"
        with self.tracing.span(
            name,
            parent.decode("latin-1") if parent else None,
            kind="server",
            attributes={"http.request.method": scope["method"], "url.path": scope["path"]},
        ):
            await self.app(scope, receive, send)
