"""A worker's own judgement of its health: the state machine its heartbeats report.

HEALTHY takes work; UNHEALTHY (a stalled handler, then a cool-down) takes none; DRAINING
finishes what it holds and stops. What the worker gave up without an outcome is named in its
heartbeats until the cool-down ends, so that the orchestrator dispatches it again at once.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from enginedge.domain.model import WorkerStatus

log = logging.getLogger(__name__)


class Condition:
    """HEALTHY, UNHEALTHY until a cool-down ends, or DRAINING / stopped for good."""

    def __init__(
        self,
        worker_id: str,
        heartbeat_interval: float,
        stall_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._worker_id = worker_id
        self._heartbeat_interval = heartbeat_interval
        self._stall_timeout = stall_timeout
        self._clock = clock
        self._final: WorkerStatus | None = None  # DRAINING, then UNHEALTHY once stopped
        self._unhealthy_until = 0.0
        # Why it says it is unhealthy (kept after the cool-down, for the last report).
        self.reason: str | None = None
        # request id -> (attempt, until when it is named, clock seconds)
        self._abandoned: dict[str, tuple[int, float]] = {}

    @property
    def status(self) -> WorkerStatus:
        if self._final is not None:
            return self._final
        if self._clock() < self._unhealthy_until:
            return WorkerStatus.UNHEALTHY
        return WorkerStatus.HEALTHY

    def unhealthy(self, reason: str) -> float:
        """Out of rotation long enough for the orchestrator to hear it (two heartbeats)
        and for the abandoned work to go to another worker (a stall timeout); returns until
        when."""
        if self.status is not WorkerStatus.UNHEALTHY:
            log.warning("worker unhealthy", extra={"workerId": self._worker_id, "reason": reason})
        self.reason = reason
        self._unhealthy_until = self._clock() + max(
            2.5 * self._heartbeat_interval, self._stall_timeout
        )
        return self._unhealthy_until

    def draining(self) -> None:
        self._final = WorkerStatus.DRAINING

    def stopped(self) -> None:
        self._final = WorkerStatus.UNHEALTHY
        self.reason = "stopped"

    def abandon(self, request_id: str, attempt: int, until: float = math.inf) -> None:
        """Name this attempt as given up in every heartbeat until ``until``."""
        self._abandoned[request_id] = (attempt, until)

    def abandoned(self) -> dict[str, int]:
        """The attempts to name in the next heartbeat."""
        now = self._clock()
        self._abandoned = {r: a for r, a in self._abandoned.items() if a[1] > now}
        return {r: attempt for r, (attempt, _) in self._abandoned.items()}

    @property
    def cool_down_ends(self) -> float:
        return self._unhealthy_until
