"""A small OTLP/HTTP trace receiver for the tests: what an OpenTelemetry collector does."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from enginedge.adapters.http.serving import serving
from tests.support.servers import free_port


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str


@dataclass
class Receiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    url: str = ""

    async def traces(self, request: Request) -> Response:
        message = ExportTraceServiceRequest.FromString(await request.body())
        for resource_spans in message.resource_spans:
            service = next(
                (
                    a.value.string_value
                    for a in resource_spans.resource.attributes
                    if a.key == "service.name"
                ),
                "",
            )
            for scope in resource_spans.scope_spans:
                for s in scope.spans:
                    self.spans.append(
                        ReceivedSpan(
                            service,
                            s.name,
                            s.trace_id.hex(),
                            s.span_id.hex(),
                            s.parent_span_id.hex(),
                        )
                    )
        return Response(b"", media_type="application/x-protobuf")


@contextlib.asynccontextmanager
async def otlp_receiver() -> AsyncIterator[Receiver]:
    receiver = Receiver()
    port = free_port()
    app = Starlette(routes=[Route("/v1/traces", receiver.traces, methods=["POST"])])
    async with serving(app, "127.0.0.1", port):
        receiver.url = f"http://127.0.0.1:{port}"
        yield receiver
