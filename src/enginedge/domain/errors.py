"""Errors the core raises. Each carries the stable code that callers of the API see."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from enginedge.domain.model import RequestStatus


class EnginedgeError(Exception):
    """Base of every error with a public code (SPEC §3)."""

    code = "INTERNAL_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidTaskType(EnginedgeError):
    code = "INVALID_TASK_TYPE"


class InvalidPayload(EnginedgeError):
    code = "INVALID_REQUEST_PAYLOAD"


class RequestNotFound(EnginedgeError):
    code = "REQUEST_NOT_FOUND"


class WorkerNotFound(EnginedgeError):
    code = "WORKER_NOT_FOUND"


class CannotCancel(EnginedgeError):
    code = "CANNOT_CANCEL"


class NoEligibleWorkers(EnginedgeError):
    code = "NO_ELIGIBLE_WORKERS"

    def __init__(self, task_type: str) -> None:
        super().__init__(f"No eligible workers for task type {task_type}")
        self.task_type = task_type


class RateLimitExceeded(EnginedgeError):
    code = "RATE_LIMIT_EXCEEDED"

    def __init__(self, retry_after: int, why: str = "Rate limit exceeded") -> None:
        super().__init__(f"{why}; retry after {retry_after}s")
        self.retry_after = retry_after


class ServiceUnavailable(EnginedgeError):
    code = "SERVICE_UNAVAILABLE"


class IllegalTransition(EnginedgeError):
    """A status change the status machine forbids; a bug or a stale message, never user input."""

    code = "ILLEGAL_TRANSITION"

    def __init__(self, current: RequestStatus, target: RequestStatus) -> None:
        super().__init__(f"illegal status transition {current} -> {target}")
        self.current = current
        self.target = target
