"""Prometheus metrics: the guide's series under their exact names, and what operators need.

Every instance owns its :class:`CollectorRegistry`, so two apps in one process (tests) never
share counters. Fleet-wide gauges are refreshed from the registry and the store at scrape.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import SummaryMetricFamily
from prometheus_client.registry import Collector

from enginedge.domain.model import RequestStatus

STATUS_LABELS = {
    RequestStatus.COMPLETED: "success",
    RequestStatus.FAILED: "error",
    RequestStatus.CANCELLED: "cancelled",
    RequestStatus.TIMEOUT: "timeout",
}
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
)


class _QuantileSummary(Collector):
    """A summary with quantiles over the most recent observations (prometheus_client's own
    Summary has no quantiles)."""

    def __init__(
        self, name: str, documentation: str, quantiles: Iterable[float], window: int = 2048
    ) -> None:
        self._name = name
        self._doc = documentation
        self._quantiles = tuple(quantiles)
        self._recent: deque[float] = deque(maxlen=window)
        self._count = 0
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._recent.append(value)
            self._count += 1
            self._sum += value

    def collect(self) -> Iterable[SummaryMetricFamily]:
        with self._lock:
            ordered = sorted(self._recent)
            count, total = self._count, self._sum
        family = SummaryMetricFamily(self._name, self._doc, labels=())
        family.add_metric([], count_value=count, sum_value=total)
        for q in self._quantiles:  # nearest rank
            value = ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0
            family.add_sample(self._name, {"quantile": str(q)}, value)
        return [family]


class PrometheusMetrics:
    """The :class:`~enginedge.application.ports.Metrics` port, exported in Prometheus format."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "enginedge_requests", "Requests finished, by outcome", ["status"], registry=r
        )
        for label in STATUS_LABELS.values():
            self.requests.labels(label)
        self.duration = _QuantileSummary(
            "enginedge_request_duration_seconds",
            "Time from acceptance to a terminal state (recent requests)",
            (0.5, 0.95),
        )
        r.register(self.duration)
        self.duration_histogram = Histogram(
            "enginedge_request_duration_histogram_seconds",
            "Time from acceptance to a terminal state",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.accepted = Counter(
            "enginedge_requests_accepted",
            "Requests accepted (202)",
            ["task_type", "worker_type"],
            registry=r,
        )
        self.queue_wait = Histogram(
            "enginedge_queue_wait_seconds",
            "Time from acceptance until the scheduler handed the request to a worker (its "
            "dispatch on the bus): the wait in the queue, the dispatch latency",
            ["worker_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.redispatches = Counter(
            "enginedge_redispatches", "Attempts dispatched again", ["reason"], registry=r
        )
        self.ignored = Counter(
            "enginedge_results_ignored",
            "Worker messages that changed nothing (duplicate, late, superseded)",
            ["reason"],
            registry=r,
        )
        self.dlq = Counter(
            "enginedge_dlq_messages", "Messages sent to a dead-letter queue", ["topic"], registry=r
        )
        self.workers_active = Gauge(
            "enginedge_workers_active_total", "Healthy workers in the fleet", registry=r
        )
        self.worker_health = Gauge(
            "enginedge_worker_health_status",
            "Workers by type and health",
            ["worker_type", "status"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "enginedge_queue_depth",
            "Requests waiting in the queue for a worker slot (PENDING); fleet-wide",
            ["worker_type", "priority"],
            registry=r,
        )
        self.tenant_requests = Gauge(
            "enginedge_tenant_requests",
            "Requests of each named API key, waiting (PENDING) or running (handed to a "
            "worker); fleet-wide",
            ["tenant", "state"],
            registry=r,
        )
        self.outbox_backlog = Gauge(
            "enginedge_outbox_backlog", "Outbox messages not yet published", registry=r
        )
        self.memory = Gauge(
            "enginedge_memory_usage_bytes", "Resident memory of this process", registry=r
        )
        self.cpu = Gauge(
            "enginedge_cpu_usage_percent",
            "CPU use of this process since the last scrape (100 = one core)",
            registry=r,
        )
        self._process = psutil.Process(os.getpid())
        self._process.cpu_percent(None)

    # -- the port
    def request_accepted(self, task_type: str, worker_type: str) -> None:
        self.accepted.labels(task_type, worker_type).inc()

    def request_finished(self, status: RequestStatus, duration_seconds: float) -> None:
        self.requests.labels(STATUS_LABELS[status]).inc()
        self.duration.observe(duration_seconds)
        self.duration_histogram.observe(duration_seconds)

    def dispatched(self, worker_type: str, latency_seconds: float) -> None:
        self.queue_wait.labels(worker_type).observe(latency_seconds)

    def redispatched(self, reason: str) -> None:
        self.redispatches.labels(reason).inc()

    def result_ignored(self, reason: str) -> None:
        self.ignored.labels(reason).inc()

    def dead_lettered(self, topic: str) -> None:
        self.dlq.labels(topic).inc()

    # -- scrape
    def set_fleet(self, counts: dict[str, dict[str, int]]) -> None:
        """Per worker type ``{"healthy": n, "total": m}``, from the health use case."""
        self.worker_health.clear()
        healthy_total = 0
        for worker_type, c in counts.items():
            self.worker_health.labels(worker_type, "healthy").set(c["healthy"])
            self.worker_health.labels(worker_type, "unhealthy").set(c["total"] - c["healthy"])
            healthy_total += c["healthy"]
        self.workers_active.set(healthy_total)

    def set_queue_depth(
        self, waiting: dict[tuple[str, int], int], worker_types: Iterable[str] = ()
    ) -> None:
        """Per (worker type, priority); each of ``worker_types`` gets a series even with
        nothing waiting (priority 0), so that an autoscaler reads 0, not no data."""
        self.queue_depth.clear()
        for worker_type in worker_types:
            self.queue_depth.labels(worker_type, "0").set(0)
        for (worker_type, priority), count in waiting.items():
            self.queue_depth.labels(worker_type, str(priority)).set(count)

    def set_tenants(self, counts: dict[str, tuple[int, int]]) -> None:
        """``{name: (waiting, running)}`` of the named keys."""
        self.tenant_requests.clear()
        for name, (waiting, running) in counts.items():
            self.tenant_requests.labels(name, "waiting").set(waiting)
            self.tenant_requests.labels(name, "running").set(running)

    def render(self) -> bytes:
        self.memory.set(self._process.memory_info().rss)
        self.cpu.set(self._process.cpu_percent(None))
        return generate_latest(self.registry)
