"""What the routes of the API and of the console read from a request the same way."""

from __future__ import annotations

from collections.abc import Sequence

from fastapi import Request

from enginedge.application.context import Context
from enginedge.domain.errors import InvalidPayload
from enginedge.domain.model import RequestStatus


def context_of(request: Request) -> Context:
    """The use cases' context of the service serving ``request``."""
    ctx: Context = request.app.state.service.ctx
    return ctx


def parse_statuses(values: Sequence[str] | None) -> list[RequestStatus]:
    """``?status=`` repeated and/or comma-separated; an unknown name is a 422."""
    statuses: list[RequestStatus] = []
    for value in ",".join(values or []).split(","):
        if value.strip():
            try:
                statuses.append(RequestStatus(value.strip().upper()))
            except ValueError:
                raise InvalidPayload(f"unknown status {value.strip()[:30]!r}") from None
    return statuses
