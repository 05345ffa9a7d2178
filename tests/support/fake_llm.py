"""A small local server speaking the OpenAI chat-completions protocol (streaming included),
standing in for a hosted LLM API that the tests cannot reach."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from enginedge.adapters.http.serving import serving
from tests.support.servers import free_port


@dataclass
class FakeLlm:
    """Answers with ``tokens`` one SSE chunk each, ``delay`` seconds after each (a completion
    takes ``len(tokens) * delay``); ``failures`` are (status, body) answers given first, one
    per call. ``active`` counts the completions streaming now, ``max_active`` the most at
    once."""

    tokens: list[str] = field(default_factory=lambda: [f"tok{i} " for i in range(25)])
    failures: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    delay: float = 0.005
    url: str = ""
    active: int = 0
    max_active: int = 0

    async def completions(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.authorizations.append(request.headers.get("authorization"))
        if self.failures:
            status, error = self.failures.pop(0)
            return JSONResponse(error, status_code=status, headers={"Retry-After": "0"})

        async def stream() -> AsyncIterator[bytes]:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                for token in self.tokens:
                    chunk = {
                        "id": "c1",
                        "object": "chat.completion.chunk",
                        "model": body["model"],
                        "choices": [
                            {"index": 0, "delta": {"content": token}, "finish_reason": None}
                        ],
                    }
                    yield b"data: " + orjson.dumps(chunk) + b"\n\n"
                    await asyncio.sleep(self.delay)
                last = {
                    "id": "c1",
                    "model": body["model"],
                    "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": len(self.tokens)},
                }
                yield b"data: " + orjson.dumps(last) + b"\n\n"
                yield b"data: [DONE]\n\n"
            finally:
                self.active -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")


@contextlib.asynccontextmanager
async def fake_llm_server(fake: FakeLlm) -> AsyncIterator[FakeLlm]:
    app = Starlette(routes=[Route("/v1/chat/completions", fake.completions, methods=["POST"])])
    port = free_port()
    async with serving(app, "127.0.0.1", port):
        fake.url = f"http://127.0.0.1:{port}/v1"
        yield fake


@contextlib.contextmanager
def fake_llm_in_thread(fake: FakeLlm, timeout: float = 10.0) -> Iterator[FakeLlm]:
    """:func:`fake_llm_server` on an event loop of its own in a thread: its answers keep
    their timing whatever the test's own loop is doing (a blocking call, a busy poll)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fake-llm", daemon=True)
    thread.start()
    stack = contextlib.AsyncExitStack()
    try:
        asyncio.run_coroutine_threadsafe(
            stack.enter_async_context(fake_llm_server(fake)), loop
        ).result(timeout)
        try:
            yield fake
        finally:
            asyncio.run_coroutine_threadsafe(stack.aclose(), loop).result(timeout)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout)
        if not thread.is_alive():
            loop.close()
