"""One error shape for every failure: ``{"error": {"code", "message", "requestId"?}}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from enginedge.domain import errors as e

log = logging.getLogger(__name__)

STATUS_OF: dict[type[e.EnginedgeError], int] = {
    e.InvalidTaskType: 422,
    e.InvalidPayload: 422,
    e.RequestNotFound: 404,
    e.WorkerNotFound: 404,
    e.CannotCancel: 409,
    e.RateLimitExceeded: 429,
    e.NoEligibleWorkers: 503,
    e.ServiceUnavailable: 503,
}

HTTP_CODES = {
    401: "INVALID_API_KEY",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


def error_response(
    status: int,
    code: str,
    message: str,
    request_id: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    detail: dict[str, Any] = {"code": code, "message": message}
    if request_id is not None:
        detail["requestId"] = request_id
    return JSONResponse({"error": detail}, status_code=status, headers=headers)


def _request_id(request: Request) -> str | None:
    value = request.path_params.get("request_id")
    return str(value) if value is not None else None


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, e.EnginedgeError)
    status = STATUS_OF.get(type(exc), 500)
    headers = None
    if isinstance(exc, e.RateLimitExceeded):
        headers = {"Retry-After": str(max(exc.retry_after, 1))}
    if isinstance(exc, e.ServiceUnavailable):
        log.warning("backing service unavailable", extra={"error": exc.message})
        headers = {"Retry-After": "5"}
    return error_response(status, exc.code, exc.message, _request_id(request), headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    code = "INVALID_REQUEST_PAYLOAD"
    for err in exc.errors()[:5]:
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        if loc[:1] == ["taskType"]:
            code = "INVALID_TASK_TYPE"
        where = ".".join(loc) or "body"
        problems.append(f"{where}: {err.get('msg', 'invalid')}")
    return error_response(422, code, "; ".join(problems) or "invalid request", _request_id(request))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_CODES.get(exc.status_code, f"HTTP_{exc.status_code}")
    message = exc.detail if isinstance(exc.detail, str) else "request refused"
    return error_response(exc.status_code, code, message, None, dict(exc.headers or {}))


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error", exc_info=exc, extra={"path": request.url.path})
    return error_response(500, "INTERNAL_ERROR", "internal error; it has been logged")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(e.EnginedgeError, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
