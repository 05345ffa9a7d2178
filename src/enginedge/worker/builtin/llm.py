"""The llm reference worker: any OpenAI-compatible chat-completions endpoint.

Tokens stream back as partial results (``{"text": "..."}``) while they arrive. Rate limits
(429) and server errors (5xx) are retried with backoff, honouring ``Retry-After``, until the
request's deadline; other upstream errors end the request ``FAILED`` with the upstream's own
message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from enginedge.domain.errors import InvalidPayload
from enginedge.domain.tasks import check_payload
from enginedge.worker.app import JSON, Task, TaskFailed, WorkerApp

WORKER_TYPE = "llm"
RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}
MAX_TRIES = 5


@dataclass(frozen=True, slots=True)
class LlmSettings:
    base_url: str
    api_key: str | None = None
    model: str | None = None
    connect_timeout: float = 10.0


class Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _upstream_message(status: int, body: bytes) -> str:
    try:
        data = orjson.loads(body)
        error = data.get("error") if isinstance(data, dict) else None
        message = error.get("message") if isinstance(error, dict) else error
    except orjson.JSONDecodeError:
        message = None
    text = message if isinstance(message, str) else body.decode(errors="replace")[:300]
    return f"upstream answered {status}: {text}".strip()


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


class ChatClient:
    """Streams one chat completion, handing each text delta to ``on_token``."""

    def __init__(self, settings: LlmSettings) -> None:
        self.settings = settings
        headers = {"Accept": "text/event-stream"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        self._http = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(None, connect=settings.connect_timeout),
        )

    async def close(self) -> None:
        await self._http.aclose()

    def _body(self, payload: JSON) -> JSON:
        model = payload.get("model") or self.settings.model
        if not model:
            raise TaskFailed("no model: give payload.model or set LLM_MODEL on the worker")
        body: JSON = {"model": model, "messages": payload["messages"], "stream": True}
        for name in ("max_tokens", "temperature"):
            if payload.get(name) is not None:
                body[name] = payload[name]
        return body

    async def stream(self, task: Task) -> JSON:
        body = self._body(task.payload)
        delay = 1.0
        for attempt in range(1, MAX_TRIES + 1):
            try:
                return await self._once(body, task)
            except Retryable as exc:
                wait = exc.retry_after if exc.retry_after is not None else delay
                remaining = (task.deadline - datetime.now(UTC)).total_seconds()
                if attempt == MAX_TRIES or wait >= remaining:
                    raise TaskFailed(f"{exc} (gave up after {attempt} tries)") from None
                await asyncio.sleep(wait)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, body: JSON, task: Task) -> JSON:
        parts: list[str] = []
        model = body["model"]
        usage: JSON = {}
        finish_reason = None
        try:
            async with self._http.stream("POST", "/chat/completions", json=body) as response:
                if response.status_code >= 400:
                    raw = await response.aread()
                    message = _upstream_message(response.status_code, raw)
                    if response.status_code in RETRYABLE:
                        raise Retryable(message, _retry_after(response))
                    raise TaskFailed(message)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = _parse_chunk(data)
                    model = chunk.get("model") or model
                    usage = chunk.get("usage") or usage
                    for choice in chunk.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            parts.append(delta)
                            await task.progress({"text": delta})
                        finish_reason = choice.get("finish_reason") or finish_reason
        except (httpx.TimeoutException, httpx.NetworkError) as exc:
            if parts:  # tokens already went out: a retry would repeat them
                raise TaskFailed(f"upstream connection lost mid-answer: {exc}") from None
            raise Retryable(f"upstream unreachable: {type(exc).__name__}: {exc}") from None
        except httpx.HTTPError as exc:
            raise TaskFailed(f"upstream error: {type(exc).__name__}: {exc}") from None
        return {
            "content": "".join(parts),
            "model": model,
            "usage": usage,
            "finishReason": finish_reason,
        }


def _parse_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise TaskFailed(f"upstream sent a stream chunk that is not JSON: {data[:100]}") from None
    if not isinstance(chunk, dict):
        raise TaskFailed("upstream sent a stream chunk that is not an object")
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else error
        raise TaskFailed(f"upstream error mid-stream: {message}")
    return chunk


def llm_worker(settings: LlmSettings, capacity: int = 4) -> WorkerApp:
    """The llm worker; the HTTP client is created on first use, in the worker's loop."""
    app = WorkerApp(WORKER_TYPE, capacity=capacity)
    clients: list[ChatClient] = []

    @app.task("llm.chat")
    async def chat(task: Task) -> JSON:
        try:
            check_payload(task.task_type, task.payload)
        except InvalidPayload as exc:
            raise TaskFailed(exc.message) from None
        if not clients:
            clients.append(ChatClient(settings))
        return await clients[0].stream(task)

    return app
