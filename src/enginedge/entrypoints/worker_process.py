"""``enginedge worker``: a built-in worker as its own process, against Kafka."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket

from enginedge.adapters.bus.kafka import KafkaBus
from enginedge.adapters.telemetry.tracing import TracedBus, configure_tracing
from enginedge.bootstrap import kafka_settings
from enginedge.config import ConfigError, Settings
from enginedge.domain.messages import (
    CONTROL_TOPIC,
    DISPATCH_DLQ_TOPIC,
    HEARTBEATS_TOPIC,
    RESULTS_TOPIC,
    dlq_topic,
)
from enginedge.worker import WorkerApp, WorkerRuntime
from enginedge.worker.health import serving_health

log = logging.getLogger(__name__)


async def run_worker(app: WorkerApp, settings: Settings, worker_id: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain: finish what is running (up to the drain
    timeout), hand the rest back, and return."""
    if not settings.kafka_brokers:
        raise ConfigError(
            "enginedge worker needs KAFKA_BROKERS; in embedded mode the built-in workers run "
            "inside `enginedge serve`"
        )
    tracing = configure_tracing(f"enginedge-worker-{app.type}")
    kafka = KafkaBus(kafka_settings(settings))
    bus = TracedBus(kafka, tracing)
    topics = [RESULTS_TOPIC, HEARTBEATS_TOPIC, CONTROL_TOPIC]
    host = settings.worker_advertised_host or socket.gethostname()
    runtime = WorkerRuntime(
        app,
        bus,
        worker_id=worker_id,
        endpoint=f"http://{host}:{settings.worker_health_port}",
        heartbeat_interval=settings.worker_heartbeat_interval,
        tracing=tracing,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await _prepare(kafka, [*topics, *map(dlq_topic, topics), DISPATCH_DLQ_TOPIC], stop)
        if stop.is_set():
            return
        # Its own /health first: the orchestrator checks it from the first heartbeat on.
        async with serving_health(runtime, "0.0.0.0", settings.worker_health_port):  # noqa: S104
            await runtime.start()
            await stop.wait()
            log.info("draining", extra={"workerId": runtime.id, "active": runtime.active})
            await runtime.stop(drain=True)
    finally:
        await bus.close()
        tracing.shutdown()


async def _prepare(bus: KafkaBus, topics: list[str], stop: asyncio.Event) -> None:
    """Create the topics, waiting for the broker as long as it takes (or until stopped)."""
    delay = 0.5
    while not stop.is_set():
        try:
            await bus.prepare(topics)
            return
        except Exception as exc:
            log.warning("Kafka not reachable; will retry", extra={"error": str(exc)})
            try:
                async with asyncio.timeout(delay):
                    await stop.wait()
            except TimeoutError:
                delay = min(delay * 2, 5.0)
