"""Metrics under the guide's names with the right counts, and JSON logs with the fields."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import orjson
from prometheus_client.parser import text_string_to_metric_families

from tests.support.harness import API_KEY, fast_settings, run_service
from tests.support.workers import Probe, worker_for_tests

H = {"X-API-Key": API_KEY}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


async def test_metrics_carry_the_guides_series_with_true_counts(tmp_path: Path) -> None:
    probe = Probe()
    async with run_service(fast_settings(tmp_path), [worker_for_tests(probe)]) as svc:
        ok = [(await svc.submit("test.echo", {"i": i})).json()["requestId"] for i in range(3)]
        bad = await svc.submit("data.sql", {"sql": "nope", "tables": {"t": [{"a": 1}]}})
        slow = (await svc.submit("test.hang", {}, metadata={"timeout": 0.3})).json()
        gone = (await svc.submit("test.hang", {})).json()["requestId"]
        await svc.wait_for(gone, lambda b: b["status"] == "PROCESSING")
        await svc.client.post(f"/api/requests/{gone}/cancel", headers=H)
        for rid in [*ok, bad.json()["requestId"], slow["requestId"]]:
            await svc.wait_terminal(rid)
        # Terminal is not yet relayed: the time-out and the cancellation each leave a cancel
        # for the worker in the outbox, which the relay drains a moment later.
        async with asyncio.timeout(10):
            while True:
                m = samples((await svc.client.get("/metrics")).text)
                if m[("enginedge_outbox_backlog", ())] == 0:
                    break
                await asyncio.sleep(0.05)
    for status, count in (("success", 3), ("error", 1), ("cancelled", 1), ("timeout", 1)):
        assert m[("enginedge_requests_total", (("status", status),))] == count
    assert ("enginedge_request_duration_seconds", (("quantile", "0.5"),)) in m
    assert ("enginedge_request_duration_seconds", (("quantile", "0.95"),)) in m
    assert m[("enginedge_request_duration_seconds_count", ())] == 6
    assert m[("enginedge_request_duration_histogram_seconds_count", ())] == 6
    assert m[("enginedge_workers_active_total", ())] == 2
    for worker_type in ("testing", "data-processing"):
        health = (("status", "healthy"), ("worker_type", worker_type))
        sick = (("status", "unhealthy"), ("worker_type", worker_type))
        assert m[("enginedge_worker_health_status", health)] == 1
        assert m[("enginedge_worker_health_status", sick)] == 0
        # Nothing waits any more, and the series says 0 rather than vanish.
        depth = (("priority", "0"), ("worker_type", worker_type))
        assert m[("enginedge_queue_depth", depth)] == 0
    assert m[("enginedge_memory_usage_bytes", ())] > 10_000_000
    assert ("enginedge_cpu_usage_percent", ()) in m
    # Each first dispatch observed its wait in the queue once.
    assert m[("enginedge_queue_wait_seconds_count", (("worker_type", "testing"),))] == 5
    accepted = (("task_type", "test.echo"), ("worker_type", "testing"))
    assert m[("enginedge_requests_accepted_total", accepted)] == 3


async def test_logs_are_json_lines_with_request_fields_and_no_secrets(
    tmp_path: Path, log_lines: io.StringIO
) -> None:
    async with run_service(
        fast_settings(tmp_path, log_level="info"), [worker_for_tests(Probe())]
    ) as svc:
        rid = (await svc.submit("test.echo", {}, metadata={"correlationId": "corr_789"})).json()[
            "requestId"
        ]
        await svc.wait_terminal(rid)
        await svc.client.get("/api/requests", headers={"X-API-Key": "wrong-but-secret-key"})
    lines = [orjson.loads(line) for line in log_lines.getvalue().splitlines() if line]
    assert lines, "nothing was logged"
    for line in lines:
        assert {"timestamp", "level", "message"} <= set(line)
    finished = next(
        x for x in lines if x["message"] == "request finished" and x.get("requestId") == rid
    )
    assert finished["workerType"] == "testing"
    assert finished["correlationId"] == "corr_789"
    assert isinstance(finished["processingTime"], int)
    assert finished["level"] == "info"
    text = log_lines.getvalue()
    assert API_KEY not in text
    assert "wrong-but-secret-key" not in text
