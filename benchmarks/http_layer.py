"""What the HTTP framework costs per call, apart from the work the endpoint does.

Three routes in one FastAPI app, each with an endpoint that does nothing but answer, called
in this process through ASGI (no socket, no uvicorn), so that only the framework's share of
a call is measured, in CPU microseconds per call:

- ``declared``: declared as ``POST /api/orchestrate`` is (the same body model, the same two
  security schemes under an authentication dependency, a context dependency, two headers
  and the ``wait`` query parameter, with their constraints), solved by FastAPI;
- ``request-only``: a FastAPI route taking only the ``Request`` and reading the same body,
  headers and query parameter itself;
- ``starlette``: the same handler as a plain Starlette route in the same app.

    .venv/bin/python -m benchmarks.http_layer            # or --calls 20000 --rounds 5

docs/performance.md says what the figures mean for the orchestrator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, Header, Query, Request, Response
from fastapi.security import HTTPAuthorizationCredentials
from starlette.routing import Route

from enginedge.adapters.http.app import MAX_WAIT_SECONDS
from enginedge.adapters.http.auth import api_key_header, bearer, presented_key
from enginedge.adapters.http.schemas import OrchestrateBody

BODY = orjson.dumps({"taskType": "echo", "payload": {"x": 1}})
ANSWER = b'{"requestId":"x"}'


async def _context(request: Request) -> object:
    return request.app


async def _caller(
    header_key: Annotated[str | None, Depends(api_key_header)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    return presented_key(header_key, credentials) or ""


async def _declared(
    body: OrchestrateBody,
    ctx: Annotated[object, Depends(_context)],
    caller: Annotated[str, Depends(_caller)],
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key", max_length=255)] = None,
    traceparent: Annotated[str | None, Header(max_length=64)] = None,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_SECONDS)] = 0,
) -> Response:
    return Response(ANSWER, status_code=202, media_type="application/json")


async def _by_hand(request: Request) -> Response:
    OrchestrateBody.model_validate_json(await request.body())
    request.headers.get("x-api-key")
    request.headers.get("idempotency-key")
    request.headers.get("traceparent")
    float(request.query_params.get("wait", 0))
    return Response(ANSWER, status_code=202, media_type="application/json")


def build() -> FastAPI:
    app = FastAPI()
    app.post("/declared")(_declared)
    app.post("/request-only")(_by_hand)
    app.router.routes.append(Route("/starlette", _by_hand, methods=["POST"]))
    return app


async def call(app: FastAPI, path: str) -> None:
    """One ``POST path?wait=30`` with an API key and the body, through the ASGI app."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"wait=30",
        "headers": [
            (b"host", b"bench"),
            (b"x-api-key", b"bench-key"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(BODY)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 3000),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": BODY, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    if sent[0]["status"] != 202:
        raise RuntimeError(f"{path} answered {sent[0]['status']}: {sent}")


async def measure(calls: int, rounds: int) -> dict[str, float]:
    """Median CPU microseconds per call of each route, over ``rounds`` alternating rounds."""
    app = build()
    paths = ["/declared", "/request-only", "/starlette"]
    for path in paths:  # warm-up: imports, caches
        for _ in range(500):
            await call(app, path)
    per_call: dict[str, list[float]] = {path: [] for path in paths}
    for _ in range(rounds):
        for path in paths:
            started = time.process_time()
            for _ in range(calls):
                await call(app, path)
            per_call[path].append((time.process_time() - started) / calls * 1e6)
    return {path.lstrip("/"): round(statistics.median(v), 1) for path, v in per_call.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    figures = asyncio.run(measure(args.calls, args.rounds))
    print(json.dumps({"cpu_us_per_call": figures}))


if __name__ == "__main__":
    main()
