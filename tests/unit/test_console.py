"""The console's pure parts: chart series from request timestamps, and reading dead letters."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import orjson

from enginedge.application.console import dead_letter_of, summarize
from enginedge.application.ports import BusMessage, RequestTiming
from enginedge.domain.messages import dead_letter
from enginedge.domain.model import RequestStatus

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def at(seconds_ago: float) -> datetime:
    return NOW - timedelta(seconds=seconds_ago)


def timing(
    created: float, started: float | None, finished: float | None, kind: str = "data-processing"
) -> RequestTiming:
    return RequestTiming(
        worker_type=kind,
        status=RequestStatus.COMPLETED if finished is not None else RequestStatus.PENDING,
        created_at=at(created),
        started_at=at(started) if started is not None else None,
        finished_at=at(finished) if finished is not None else None,
    )


def test_series_count_finished_requests_their_latency_and_the_waiting_ones() -> None:
    timings = [
        timing(created=55, started=54, finished=52),  # bucket 0 (60..50 s ago): 3 s
        timing(created=58, started=57, finished=51),  # bucket 0: 7 s
        timing(created=15, started=None, finished=None),  # waiting since 15 s ago
        timing(created=5, started=4, finished=None, kind="llm"),  # running, waited 1 s
    ]
    activity = summarize(timings, NOW, timedelta(minutes=1), buckets=6)
    assert activity.bucket_seconds == 10
    assert activity.buckets[-1] == NOW
    data = activity.series["data-processing"]
    assert data.throughput == [2, 0, 0, 0, 0, 0]
    assert data.p50 == [7.0, None, None, None, None, None]  # nearest rank, as /metrics
    assert data.p95 == [7.0, None, None, None, None, None]
    # Waiting at each bucket's end: the first two had started by 50 s ago; one since 15 s.
    assert data.queue_depth == [0, 0, 0, 0, 1, 1]
    llm = activity.series["llm"]
    assert llm.throughput == [0] * 6
    assert llm.queue_depth == [0] * 6  # created and started within the last bucket


def test_requests_outside_the_window_are_not_counted() -> None:
    activity = summarize([timing(400, 399, 300)], NOW, timedelta(minutes=1), buckets=6)
    assert activity.series["data-processing"].throughput == [0] * 6


def test_a_dead_letter_keeps_the_reason_the_time_and_the_original() -> None:
    original = orjson.dumps({"requestId": "r-1", "kind": "weird"})
    value = dead_letter(original, "field 'kind' is wrong", NOW)
    letter = dead_letter_of(BusMessage("worker.results.dlq", "r-1", value), at(99))
    assert letter.reason == "field 'kind' is wrong"
    assert letter.failed_at == NOW
    assert letter.message == {"requestId": "r-1", "kind": "weird"}
    assert letter.request_id == "r-1"
    again = dead_letter_of(BusMessage("worker.results.dlq", "r-1", value), NOW)
    assert again.id == letter.id  # delivered twice, kept once


def test_a_dead_letter_that_is_not_json_is_kept_as_text() -> None:
    letter = dead_letter_of(BusMessage("x.dlq", "k", b"\xffgarbage"), NOW)
    assert letter.reason == "no reason given"
    assert letter.failed_at == NOW
    assert "garbage" in str(letter.message["original"])
    assert letter.request_id is None
