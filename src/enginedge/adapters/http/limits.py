"""Request-body size limit as pure ASGI middleware: refuse early, never buffer too much.

(FastAPI's own ``max_body_size`` answers a declared oversize body in plain text, outside
the API's error shape; this one answers both cases with ``PAYLOAD_TOO_LARGE``.)
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from enginedge.adapters.http.errors import error_response


class BodySizeLimit:
    """413 ``PAYLOAD_TOO_LARGE`` for a body over ``max_bytes``, declared or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _message(self) -> str:
        return f"request body is larger than {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            response = error_response(413, "PAYLOAD_TOO_LARGE", self._message())
            await response(scope, receive, send)
            return
        seen = 0

        async def counted_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # FastAPI lets an HTTPException from reading the body through to the
                    # error handlers, which give it the API's shape.
                    raise HTTPException(413, self._message())
            return message

        await self.app(scope, counted_receive, send)
