"""A small HTTP client of the API for the CLI (submit, status, cancel, workers)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson

from enginedge.config import generated_key_path, split_key_entry
from enginedge.domain.model import TERMINAL_NAMES

# How long `events` keeps trying to resume a lost stream (a rolling restart takes seconds).
RECONNECT_SECONDS = 30.0


class ApiError(Exception):
    """The API answered with an error (its code and message), or could not be reached."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


def find_api_key(explicit: str | None) -> str | None:
    """``--api-key``, else ``ENGINEDGE_API_KEY``, else the first of ``API_KEYS`` (else of
    ``ADMIN_API_KEYS``; without its ``name:``), else the development key a local service
    generated in its data directory."""
    if explicit:
        return explicit
    if os.environ.get("ENGINEDGE_API_KEY"):
        return os.environ["ENGINEDGE_API_KEY"]
    for variable in ("API_KEYS", "ADMIN_API_KEYS"):
        entries = [e.strip() for e in os.environ.get(variable, "").split(",") if e.strip()]
        if entries:
            return split_key_entry(entries[0])[1]
    path = generated_key_path(Path(os.environ.get("ENGINEDGE_DATA_DIR", ".enginedge")))
    return path.read_text().strip() if path.exists() else None


@dataclass
class Client:
    base_url: str
    api_key: str | None
    timeout: float = 30.0

    def _http(self) -> httpx.Client:
        headers = {"X-API-Key": self.api_key} if self.api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=self.timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            with self._http() as http:
                response = http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError("UNREACHABLE", f"cannot reach {self.base_url}: {exc}") from None
        return _decode(response)

    def submit(
        self,
        task_type: str,
        payload: dict[str, Any],
        metadata: dict[str, Any] | None,
        idempotency_key: str | None,
    ) -> dict[str, Any]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        body = {"taskType": task_type, "payload": payload, "metadata": metadata}
        result: dict[str, Any] = self._call("POST", "/api/orchestrate", json=body, headers=headers)
        return result

    def status(self, request_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("GET", f"/api/requests/{request_id}")
        return result

    def cancel(self, request_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self._call("POST", f"/api/requests/{request_id}/cancel")
        return result

    def workers(self) -> list[dict[str, Any]]:
        result: dict[str, Any] = self._call("GET", "/api/workers")
        return list(result["items"])

    def events(
        self, request_id: str, reconnect_for: float = RECONNECT_SECONDS
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Follow the request's SSE stream, yielding (event type, data) until its outcome.

        A stream that breaks or ends before the outcome (its replica restarting, say) is
        resumed where it stopped (``Last-Event-ID``), on whichever replica answers; it gives
        up after ``reconnect_for`` seconds without a single event.
        """
        last_id: str | None = None
        quiet_since = time.monotonic()
        pause = 0.2
        while True:
            try:
                for ident, kind, data in self._stream(request_id, last_id):
                    last_id = ident or last_id
                    quiet_since, pause = time.monotonic(), 0.2
                    yield kind, data
                    if kind == "status" and data.get("status") in TERMINAL_NAMES:
                        return
                problem = "the stream ended before the outcome"
            except httpx.HTTPError as exc:
                problem = str(exc) or type(exc).__name__
            if time.monotonic() - quiet_since + pause > reconnect_for:
                raise ApiError("UNREACHABLE", f"lost the event stream: {problem}")
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _stream(
        self, request_id: str, last_id: str | None
    ) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """One connection to the SSE stream: (id, event type, data) as they come."""
        headers = {"Last-Event-ID": last_id} if last_id else {}
        with (
            self._http() as http,
            http.stream(
                "GET", f"/api/requests/{request_id}/events", headers=headers, timeout=None
            ) as response,
        ):
            if response.status_code != 200:
                response.read()
                _decode(response)
            ident, kind, data = "", "message", list[str]()
            for line in response.iter_lines():
                if line == "":
                    if data:
                        yield ident, kind, orjson.loads("\n".join(data))
                    ident, kind, data = "", "message", []
                elif line.startswith("id:"):
                    ident = line[3:].strip()
                elif line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    data.append(line[5:].strip())


def _decode(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status_code >= 400:
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            raise ApiError(str(error.get("code")), str(error.get("message")), response.status_code)
        raise ApiError(f"HTTP_{response.status_code}", response.text[:200], response.status_code)
    return body
