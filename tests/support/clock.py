"""A clock the test moves by hand, for the use cases' rules of time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class FakeClock:
    """A :class:`~enginedge.application.ports.Clock` that stands still until told."""

    def __init__(self, start: datetime | None = None) -> None:
        self.current = start or datetime(2026, 1, 1, tzinfo=UTC)

    def now(self) -> datetime:
        return self.current

    def advance(self, seconds: float) -> None:
        self.current += timedelta(seconds=seconds)
