"""The HTTP API end to end, on the embedded SQLite store and on a real PostgreSQL server.

Every test runs the whole service: uvicorn, the outbox relay, the bus consumer, the sweeper
and in-process workers (the built-in data-processing one and SDK-written test workers).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.support.harness import API_KEY, OTHER_KEY, Running, fast_settings, run_service, until
from tests.support.servers import free_port
from tests.support.store_spy import SpiedStore
from tests.support.workers import Probe, worker_for_tests

H = {"X-API-Key": API_KEY}
SQL_PAYLOAD = {
    "sql": "SELECT city, sum(amount) AS total, count(*) AS n FROM sales "
    "GROUP BY city ORDER BY city",
    "tables": {
        "sales": [
            {"city": "Lyon", "amount": 10.5},
            {"city": "Oslo", "amount": 4},
            {"city": "Lyon", "amount": 1.5},
            {"city": "Oslo", "amount": 6},
            {"city": "Kyiv", "amount": 7},
        ]
    },
}


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def svc(database_url: str, tmp_path: Path, probe: Probe) -> AsyncIterator[Running]:
    settings = fast_settings(tmp_path, database_url)
    async with run_service(settings, [worker_for_tests(probe)]) as running:
        yield running


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    detail: dict[str, Any] = body["error"]
    assert {"code", "message"} <= set(detail)
    return detail


# ------------------------------------------------------------------ the data-processing worker


async def test_sql_task_returns_the_computed_result(svc: Running) -> None:
    response = await svc.submit("data.sql", SQL_PAYLOAD)
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "PENDING"
    assert accepted["workerType"] == "data-processing"
    assert accepted["statusUrl"] == f"/api/requests/{accepted['requestId']}"
    final = await svc.wait_terminal(accepted["requestId"])
    assert final["status"] == "COMPLETED", final
    assert final["result"] == {
        "columns": ["city", "total", "n"],
        "rows": [["Kyiv", 7.0, 1], ["Lyon", 12.0, 2], ["Oslo", 10.0, 2]],
    }
    assert final["attempts"] == 1
    assert final["workerId"] is not None
    assert final["processingTime"] is not None
    for stamp in ("createdAt", "dispatchedAt", "startedAt", "finishedAt"):
        assert final[stamp] is not None


async def test_describe_task_gives_column_statistics(svc: Running) -> None:
    records = [{"x": 1, "y": "a"}, {"x": 4, "y": None}, {"x": 10, "y": "c"}, {"x": None}]
    response = await svc.submit("data.describe", {"records": records})
    final = await svc.wait_terminal(response.json()["requestId"])
    assert final["status"] == "COMPLETED", final
    x = final["result"]["columns"]["x"]
    assert (x["count"], x["nulls"], x["min"], x["max"]) == (3, 1, 1, 10)
    assert x["mean"] == pytest.approx(5.0)
    assert x["std"] == pytest.approx(statistics.stdev([1, 4, 10]))
    y = final["result"]["columns"]["y"]
    assert (y["count"], y["nulls"], y["min"], y["max"], y["mean"]) == (2, 2, "a", "c", None)


async def test_describe_reads_a_csv_file_under_the_data_root(svc: Running, tmp_path: Path) -> None:
    (tmp_path / "prices.csv").write_text("item,price\napple,2\npear,4\nfig,9\n")
    response = await svc.submit("data.describe", {"file": "prices.csv", "columns": ["price"]})
    final = await svc.wait_terminal(response.json()["requestId"])
    assert final["status"] == "COMPLETED", final
    assert final["result"]["columns"]["price"]["mean"] == pytest.approx(5.0)


async def test_invalid_sql_fails_with_a_readable_error(svc: Running) -> None:
    response = await svc.submit("data.sql", {"sql": "SELEC nothing", "tables": {"t": [{"a": 1}]}})
    final = await svc.wait_terminal(response.json()["requestId"])
    assert final["status"] == "FAILED"
    assert final["error"].startswith("SQL error:")
    assert "syntax error" in final["error"]
    assert final["result"] is None


async def test_sql_cannot_read_files_it_was_not_given(svc: Running) -> None:
    response = await svc.submit(
        "data.sql", {"sql": "SELECT * FROM read_csv('/etc/passwd')", "tables": {"t": [{"a": 1}]}}
    )
    final = await svc.wait_terminal(response.json()["requestId"])
    assert final["status"] == "FAILED"
    assert "disabled" in final["error"] or "Permission" in final["error"]


# ------------------------------------------------------------------ the error model


async def test_missing_or_wrong_key_is_401(svc: Running) -> None:
    for headers in ({}, {"X-API-Key": "wrong-key-000000"}, {"Authorization": "Bearer nope"}):
        response = await svc.client.post(
            "/api/orchestrate",
            headers=headers,
            json={"taskType": "data.sql", "payload": SQL_PAYLOAD},
        )
        assert response.status_code == 401
        assert error_of(response)["code"] == "INVALID_API_KEY"
    bearer = await svc.client.get("/api/requests", headers={"Authorization": f"Bearer {API_KEY}"})
    assert bearer.status_code == 200


@pytest.mark.parametrize(
    ("task_type", "expected"),
    [
        ("Not A Type!", "INVALID_TASK_TYPE"),
        ("x" * 51, "INVALID_TASK_TYPE"),
        ("nobody.does.this", "INVALID_TASK_TYPE"),
    ],
)
async def test_bad_task_types_are_422(svc: Running, task_type: str, expected: str) -> None:
    response = await svc.submit(task_type, {"a": 1})
    assert response.status_code == 422
    assert error_of(response)["code"] == expected


async def test_missing_task_type_is_invalid_task_type(svc: Running) -> None:
    response = await svc.client.post("/api/orchestrate", headers=H, json={"payload": {}})
    assert response.status_code == 422
    assert error_of(response)["code"] == "INVALID_TASK_TYPE"


@pytest.mark.parametrize(
    "body",
    [
        b'{"taskType": "data.sql"}',
        b'{"taskType": "data.sql", "payload": [1, 2]}',
        b'{"taskType": "data.sql", "payload": {"sql": ""}}',
        b'{"taskType": "data.sql", "payload": {"sql": "select 1", "tables": {"t": [1]}}}',
        b'{"taskType": "data.sql", "payload": {"sql": "select 1", "files": {"t": "/x.txt"}}}',
        b'{"taskType": "data.describe", "payload": {"records": [], "file": "a.csv"}}',
        b'{"taskType": "data.sql", "payload": {"sql": "x", "tables": {"t": []}}, '
        b'"metadata": {"timeout": -1}}',
        b'{"taskType": "data.sql", "payload": {"sql": "x", "tables": {"t": []}}, '
        b'"metadata": {"priority": "high"}}',
        b'{"taskType": "data.sql", "payload": {"sql": "x", "tables": {"t": []}}, '
        b'"metadata": {"callbackUrl": "ftp://x"}}',
        b'{"taskType": "data.sql", "payload": ',
        b"not json at all",
        b"\xff\xfe\x00garbage",
    ],
)
async def test_bad_payloads_are_422_and_store_nothing(svc: Running, body: bytes) -> None:
    response = await svc.client.post(
        "/api/orchestrate", content=body, headers={**H, "Content-Type": "application/json"}
    )
    assert response.status_code == 422, response.text
    assert error_of(response)["code"] == "INVALID_REQUEST_PAYLOAD"
    listing = await svc.client.get("/api/requests", headers=H)
    assert listing.json()["items"] == []


async def test_oversized_body_is_413(svc: Running) -> None:
    big = {"sql": "select 1", "tables": {"t": [{"a": "x" * 1000}] * 1100}}
    response = await svc.submit("data.sql", big)
    assert response.status_code == 413
    assert error_of(response)["code"] == "PAYLOAD_TOO_LARGE"


async def test_unknown_request_is_404(svc: Running) -> None:
    for rid in ("6f1c1a55-0000-4000-8000-000000000000", "not-a-uuid"):
        response = await svc.client.get(f"/api/requests/{rid}", headers=H)
        assert response.status_code == 404
        detail = error_of(response)
        assert detail["code"] == "REQUEST_NOT_FOUND"
        assert detail["requestId"] == rid
        cancel = await svc.client.post(f"/api/requests/{rid}/cancel", headers=H)
        assert cancel.status_code == 404


async def test_no_eligible_workers_is_503_with_the_guides_message(svc: Running) -> None:
    response = await svc.submit("llm.chat", {"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    detail = error_of(response)
    assert detail["code"] == "NO_ELIGIBLE_WORKERS"
    assert detail["message"] == "No eligible workers for task type llm.chat"


async def test_cancel_of_a_finished_request_is_409(svc: Running) -> None:
    rid = (await svc.submit("test.echo", {"n": 1})).json()["requestId"]
    assert (await svc.wait_terminal(rid))["status"] == "COMPLETED"
    response = await svc.client.post(f"/api/requests/{rid}/cancel", headers=H)
    assert response.status_code == 409
    assert error_of(response)["code"] == "CANNOT_CANCEL"


async def test_unknown_path_and_method_keep_the_error_shape(svc: Running) -> None:
    missing = await svc.client.get("/api/nothing", headers=H)
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "NOT_FOUND"
    wrong = await svc.client.delete("/api/orchestrate", headers=H)
    assert wrong.status_code == 405
    assert error_of(wrong)["code"] == "METHOD_NOT_ALLOWED"


async def test_rate_limit_is_per_key_with_retry_after(database_url: str, tmp_path: Path) -> None:
    # Windows are fixed (aligned to multiples of their length): a day-long one, so that the
    # test does not straddle two (a minute-long one made it fail at a minute's turn).
    day = 86_400
    settings = fast_settings(tmp_path, database_url, rate_limit_requests=5, rate_limit_window=day)
    async with run_service(settings) as svc:
        codes = [(await svc.client.get("/api/requests", headers=H)).status_code for _ in range(7)]
        assert codes == [200] * 5 + [429] * 2
        limited = await svc.client.get("/api/requests", headers=H)
        assert error_of(limited)["code"] == "RATE_LIMIT_EXCEEDED"
        assert 1 <= int(limited.headers["Retry-After"]) <= day
        other = await svc.client.get("/api/requests", headers={"X-API-Key": OTHER_KEY})
        assert other.status_code == 200


# ------------------------------------------------------------------ idempotency


async def test_same_idempotency_key_returns_the_first_request(svc: Running) -> None:
    headers = {"Idempotency-Key": "order-42"}
    first = await svc.submit("test.echo", {"n": 1}, headers=headers)
    again = await svc.submit("test.echo", {"n": 2}, headers=headers)
    assert first.status_code == again.status_code == 202
    assert again.json()["requestId"] == first.json()["requestId"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    other_caller = await svc.submit("test.echo", {"n": 3}, headers=headers, key=OTHER_KEY)
    assert other_caller.json()["requestId"] != first.json()["requestId"]
    concurrent = await asyncio.gather(
        *[svc.submit("test.echo", {"n": i}, headers={"Idempotency-Key": "burst"}) for i in range(8)]
    )
    assert len({r.json()["requestId"] for r in concurrent}) == 1
    # Each caller lists its own requests only (SPEC §3, tenancy).
    listing = (await svc.client.get("/api/requests?taskType=test.echo", headers=H)).json()
    assert len(listing["items"]) == 2
    theirs = {"X-API-Key": OTHER_KEY}
    listing = (await svc.client.get("/api/requests?taskType=test.echo", headers=theirs)).json()
    assert [i["requestId"] for i in listing["items"]] == [other_caller.json()["requestId"]]


# ------------------------------------------------------------------ listing


async def test_list_filters_and_paginates_with_a_cursor(svc: Running) -> None:
    ids = [(await svc.submit("test.echo", {"i": i})).json()["requestId"] for i in range(7)]
    failed = await svc.submit("data.sql", {"sql": "bad sql", "tables": {"t": [{"a": 1}]}})
    for rid in ids:
        await svc.wait_terminal(rid)
    await svc.wait_terminal(failed.json()["requestId"])
    seen: list[str] = []
    cursor = None
    while True:
        url = "/api/requests?taskType=test.echo&limit=3" + (f"&cursor={cursor}" if cursor else "")
        page = (await svc.client.get(url, headers=H)).json()
        assert len(page["items"]) <= 3
        seen += [item["requestId"] for item in page["items"]]
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    only_failed = (await svc.client.get("/api/requests?status=FAILED", headers=H)).json()
    assert [i["requestId"] for i in only_failed["items"]] == [failed.json()["requestId"]]
    both = (
        await svc.client.get("/api/requests?status=FAILED,COMPLETED&limit=100", headers=H)
    ).json()
    assert len(both["items"]) == 8
    future = (await svc.client.get("/api/requests?since=2999-01-01T00:00:00Z", headers=H)).json()
    assert future["items"] == []
    for bad in ("status=DONE", "cursor=zzz", "since=yesterday", "limit=0"):
        response = await svc.client.get(f"/api/requests?{bad}", headers=H)
        assert response.status_code == 422, bad
        assert error_of(response)["code"] == "INVALID_REQUEST_PAYLOAD"


# ------------------------------------------------------------------ cancel and timeout


async def test_cancel_a_running_request_stops_its_handler(svc: Running, probe: Probe) -> None:
    rid = (await svc.submit("test.hang", {})).json()["requestId"]
    await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING")
    response = await svc.client.post(f"/api/requests/{rid}/cancel", headers=H)
    assert response.status_code == 200
    assert response.json()["status"] == "CANCELLED"
    for _ in range(100):
        if rid in probe.cancelled:
            break
        await asyncio.sleep(0.01)
    assert rid in probe.cancelled  # the handler was interrupted within a second
    final = await svc.get(rid)
    assert final["status"] == "CANCELLED"
    assert rid not in probe.completed


async def test_cancel_a_pending_request(database_url: str, tmp_path: Path, probe: Probe) -> None:
    settings = fast_settings(tmp_path, database_url)
    async with run_service(settings, [worker_for_tests(probe, capacity=1)]) as svc:
        busy = (await svc.submit("test.hang", {})).json()["requestId"]
        await svc.wait_for(busy, lambda b: b["status"] == "PROCESSING")
        queued = (await svc.submit("test.echo", {})).json()["requestId"]
        await svc.wait_for(queued, lambda b: b["status"] in ("PENDING", "DISPATCHED"))
        cancelled = await svc.client.post(f"/api/requests/{queued}/cancel", headers=H)
        assert cancelled.json()["status"] == "CANCELLED"
        probe.release.set()
        assert (await svc.wait_terminal(busy))["status"] == "COMPLETED"
        await asyncio.sleep(0.3)
        # The worker later took the cancelled dispatch from its queue; nothing changed.
        assert (await svc.get(queued))["status"] == "CANCELLED"


async def test_request_timeout_ends_timeout_and_stops_the_worker(
    svc: Running, probe: Probe
) -> None:
    rid = (await svc.submit("test.hang", {}, metadata={"timeout": 3})).json()["requestId"]
    # Running when its time is up (a loaded machine may take a while to dispatch it), so
    # that there is a worker to stop.
    await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING", timeout=2.9)
    final = await svc.wait_terminal(rid)
    assert final["status"] == "TIMEOUT"
    assert "3s" in final["error"]
    for _ in range(300):
        if rid in probe.cancelled:
            break
        await asyncio.sleep(0.01)
    assert rid in probe.cancelled


# ------------------------------------------------------------------ lost workers


async def test_a_silent_worker_loses_its_request_to_another(
    database_url: str, tmp_path: Path, probe: Probe
) -> None:
    settings = fast_settings(tmp_path, database_url, builtin_workers="none")
    async with run_service(settings, [worker_for_tests(probe, capacity=1)]) as svc:
        rid = (await svc.submit("test.hang", {})).json()["requestId"]
        first = await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING")
        doomed = next(w for w in svc.service.workers if w.id == first["workerId"])
        await doomed.kill()  # no more heartbeats, no word to the orchestrator
        # A second worker joins; the request must move to it once the first is declared lost.
        from enginedge.worker import WorkerRuntime

        rescuer = WorkerRuntime(
            worker_for_tests(probe, capacity=1), svc.service.ctx.bus, heartbeat_interval=0.2
        )
        await rescuer.start()
        try:
            moved = await svc.wait_for(
                rid, lambda b: b["status"] == "PROCESSING" and b["workerId"] == rescuer.id
            )
            assert moved["attempts"] == 2
            probe.release.set()
            final = await svc.wait_terminal(rid)
            assert final["status"] == "COMPLETED"
            assert final["attempts"] == 2
            workers = (await svc.client.get("/api/workers", headers=H)).json()["items"]
            status = {w["workerId"]: w["status"] for w in workers}
            assert status[doomed.id] == "UNHEALTHY"
            assert status[rescuer.id] == "HEALTHY"
        finally:
            await rescuer.stop()


async def test_attempts_are_bounded_then_failed_with_the_reason(
    database_url: str, tmp_path: Path
) -> None:
    from enginedge.worker import WorkerRuntime

    probe = Probe()
    settings = fast_settings(tmp_path, database_url, builtin_workers="none", max_attempts=2)
    async with run_service(settings, [worker_for_tests(probe, capacity=1)]) as svc:
        rid = (await svc.submit("test.hang", {})).json()["requestId"]
        first = await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING")
        await next(w for w in svc.service.workers if w.id == first["workerId"]).kill()
        second = WorkerRuntime(
            worker_for_tests(probe, capacity=1), svc.service.ctx.bus, heartbeat_interval=0.2
        )
        await second.start()
        await svc.wait_for(rid, lambda b: b["workerId"] == second.id)
        await second.kill()
        final = await svc.wait_terminal(rid)
        assert final["status"] == "FAILED"
        assert final["attempts"] == 2
        assert "lost" in final["error"] and "gave up after 2 attempts" in final["error"]


async def test_long_polling_answers_when_the_request_ends(svc: Running, probe: Probe) -> None:
    rid = (await svc.submit("test.sleep", {"seconds": 0.4})).json()["requestId"]
    response = await svc.client.get(f"/api/requests/{rid}", params={"wait": 10}, headers=H)
    assert response.status_code == 200
    assert response.json()["status"] == "COMPLETED"
    assert response.json()["result"] == {"slept": 0.4}

    hung = (await svc.submit("test.hang", {})).json()["requestId"]
    await svc.wait_for(hung, lambda b: b["status"] == "PROCESSING")
    started = asyncio.get_running_loop().time()
    response = await svc.client.get(f"/api/requests/{hung}", params={"wait": 0.5}, headers=H)
    assert response.json()["status"] == "PROCESSING"  # not over: answered after the wait
    assert asyncio.get_running_loop().time() - started >= 0.45
    bad = await svc.client.get(f"/api/requests/{hung}", params={"wait": 61}, headers=H)
    assert bad.status_code == 422
    assert bad.json()["error"]["code"] == "INVALID_REQUEST_PAYLOAD"
    probe.release.set()


async def test_a_submit_can_wait_for_the_outcome(svc: Running, probe: Probe) -> None:
    body = {"taskType": "test.sleep", "payload": {"seconds": 0.2}}
    done = await svc.client.post("/api/orchestrate?wait=10", headers=H, json=body)
    assert done.status_code == 200
    finished = done.json()
    assert (finished["status"], finished["result"]) == ("COMPLETED", {"slept": 0.2})
    assert finished["finishedAt"] is not None

    # A replay of the same key waits too, and says it is a replay.
    keyed = {**H, "Idempotency-Key": "wait-1"}
    first = await svc.client.post("/api/orchestrate?wait=10", headers=keyed, json=body)
    again = await svc.client.post("/api/orchestrate?wait=10", headers=keyed, json=body)
    assert (first.status_code, again.status_code) == (200, 200)
    assert again.json()["requestId"] == first.json()["requestId"]
    assert again.headers["Idempotent-Replayed"] == "true"

    # Not over within the wait: 202 as without it, and the request goes on.
    started = asyncio.get_running_loop().time()
    hung = await svc.client.post(
        "/api/orchestrate", params={"wait": 0.5}, headers=H, json={"taskType": "test.hang"}
    )
    assert hung.status_code == 422  # no payload: refused before anything is kept
    hung = await svc.client.post(
        "/api/orchestrate",
        params={"wait": 0.5},
        headers=H,
        json={"taskType": "test.hang", "payload": {}},
    )
    assert hung.status_code == 202
    assert asyncio.get_running_loop().time() - started >= 0.45
    assert hung.json()["status"] in ("PENDING", "DISPATCHED", "PROCESSING")
    rid = hung.json()["requestId"]
    await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING")
    bad = await svc.client.post("/api/orchestrate?wait=-1", headers=H, json=body)
    assert bad.status_code == 422
    probe.release.set()
    assert (await svc.wait_terminal(rid))["status"] == "COMPLETED"


# ------------------------------------------------------------------ lost dispatches


class _LosingSubscription:
    """A worker's view of a bus that lost the first dispatch it held (a broker that lost
    its log): the message never reaches the worker."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.lost: list[str] = []

    async def next_batch(self, max_messages: int, timeout: float) -> list[Any]:
        batch = await self.inner.next_batch(max_messages, timeout)
        if batch and not self.lost:
            self.lost.append(batch[0].key)
            batch = batch[1:]
        return list(batch)

    async def commit(self) -> None:
        await self.inner.commit()

    async def close(self) -> None:
        await self.inner.close()


async def test_a_lost_dispatch_is_given_another_attempt(
    database_url: str, tmp_path: Path, probe: Probe
) -> None:
    settings = fast_settings(tmp_path, database_url, builtin_workers="none")
    async with run_service(settings, [worker_for_tests(probe, capacity=2)]) as svc:
        (worker,) = svc.service.workers
        losing = _LosingSubscription(worker._inbox)
        worker._inbox = losing  # type: ignore[assignment]
        await asyncio.sleep(worker.poll_timeout + 0.2)  # the poll under way ends
        rid = (await svc.submit("test.echo", {"n": 1})).json()["requestId"]
        final = await svc.wait_terminal(rid)
        assert losing.lost == [rid]
        assert final["status"] == "COMPLETED"
        # Its worker's heartbeats never listed it: given back to the queue, and run.
        assert final["attempts"] == 2
        assert probe.completed == [rid]
        assert svc.redispatches().get("result_lost", 0) >= 1


async def test_a_request_waits_in_the_queue_while_every_worker_is_full(
    database_url: str, tmp_path: Path, probe: Probe
) -> None:
    settings = fast_settings(tmp_path, database_url, builtin_workers="none")
    async with run_service(settings, [worker_for_tests(probe, capacity=1)]) as svc:
        busy = (await svc.submit("test.hang", {})).json()["requestId"]
        await svc.wait_for(busy, lambda b: b["status"] == "PROCESSING")
        queued = (await svc.submit("test.echo", {"n": 2})).json()["requestId"]
        # The only slot is taken: the request stays in the queue, not on the worker.
        await asyncio.sleep(1.5)
        waiting = await svc.get(queued)
        assert (waiting["status"], waiting["queuePosition"]) == ("PENDING", 1)
        (worker,) = svc.service.workers
        assert worker.max_active == 1
        fleet = (await svc.client.get("/api/workers", headers=H)).json()["items"]
        assert [(w["slotsInUse"], w["capacity"]) for w in fleet] == [(1, 1)]
        probe.release.set()
        assert (await svc.wait_terminal(queued))["status"] == "COMPLETED"
        assert probe.started.count(queued) == 1
        assert svc.redispatches() == {}


# ------------------------------------------------------------------ events (SSE)


async def read_events(
    svc: Running,
    rid: str,
    headers: dict[str, str] | None = None,
) -> list[tuple[str, str, dict[str, Any]]]:
    events: list[tuple[str, str, dict[str, Any]]] = []
    async with svc.client.stream(
        "GET", f"/api/requests/{rid}/events", headers={**H, **(headers or {})}
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        ident, kind, data = "", "message", ""
        async for line in response.aiter_lines():
            line = line.rstrip("\r")
            if line.startswith("id:"):
                ident = line[3:].strip()
            elif line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "" and data:
                events.append((ident, kind, orjson.loads(data)))
                ident, kind, data = "", "message", ""
    return events


async def test_events_stream_every_status_and_partial_result(svc: Running) -> None:
    rid = (await svc.submit("test.stream", {"chunks": 25})).json()["requestId"]
    events = await asyncio.wait_for(read_events(svc, rid), 15)
    statuses = [d["status"] for _, k, d in events if k == "status"]
    assert statuses == ["PENDING", "DISPATCHED", "PROCESSING", "COMPLETED"]
    chunks = [d["chunk"]["text"] for _, k, d in events if k == "progress"]
    assert chunks == [f"t{i} " for i in range(25)]
    assert events[-1][2]["result"] == {"chunks": 25}
    # A client that lost the connection after the 10th event gets exactly the rest.
    resumed = await read_events(svc, rid, {"Last-Event-ID": events[9][0]})
    assert [e[0] for e in resumed] == [e[0] for e in events[10:]]
    # Connecting after the end still tells the outcome.
    late = await read_events(svc, rid)
    assert late[-1][2]["status"] == "COMPLETED"


async def test_events_tell_dispatched_when_the_worker_answers_before_the_scheduler_commits(
    svc: Running,
) -> None:
    # The scheduler commits DISPATCHED after the bus took the message; the worker's first
    # report can come before that commit (it waits for the scheduler's row locks). Hold the
    # scheduler back to make it so.
    held: list[int] = []

    async def mark_dispatched(real: Any, attempts: Any, now: Any) -> Any:
        if not held:
            held.append(len(attempts))
            await asyncio.sleep(1.0)
        return await real(attempts, now)

    ctx = svc.service.ctx
    ctx.store = SpiedStore(ctx.store, mark_dispatched=mark_dispatched)  # type: ignore[assignment]
    rid = (await svc.submit("test.stream", {"chunks": 3})).json()["requestId"]
    events = await asyncio.wait_for(read_events(svc, rid), 15)
    assert held == [1]
    statuses = [d["status"] for _, k, d in events if k == "status"]
    assert statuses == ["PENDING", "DISPATCHED", "PROCESSING", "COMPLETED"]
    # Nothing was told twice.
    await asyncio.sleep(1.2)
    again = await read_events(svc, rid)
    assert [d["status"] for _, k, d in again if k == "status"] == statuses


async def test_events_tell_pending_first_when_the_relay_is_quicker(svc: Running) -> None:
    # A request's PENDING event goes out with its acceptance; the relay may already be
    # running (its own poll, another request's wake-up). Hold the PENDING event back: the
    # relay must still not get its DISPATCHED, or the worker its outcome, into the stream
    # first.
    held: list[int] = []
    events_port = svc.service.ctx.events

    class SlowPending:
        def __getattr__(self, name: str) -> Any:
            return getattr(events_port, name)

        async def append_all(self, events: Any) -> None:
            statuses = [e.data.get("status") for e in events if e.type == "status"]
            if "PENDING" in statuses and not held:
                held.append(len(events))
                await asyncio.sleep(1.5)  # three of the relay's polls
            await events_port.append_all(events)

    svc.service.ctx.events = SlowPending()  # type: ignore[assignment]
    submitted = await svc.submit("test.stream", {"chunks": 2})
    assert submitted.status_code == 202, submitted.text
    rid = submitted.json()["requestId"]
    events = await asyncio.wait_for(read_events(svc, rid), 15)
    assert held == [1]
    statuses = [d["status"] for _, k, d in events if k == "status"]
    assert statuses == ["PENDING", "DISPATCHED", "PROCESSING", "COMPLETED"]


async def test_a_request_accepted_while_the_scheduler_reads_is_not_left_for_the_poll(
    svc: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A request committed while the scheduler reads the queue may miss that read; its
    # wake-up then comes while the scheduler is busy, and must not be lost: the scheduler
    # reads again at once instead of sleeping until its poll. Made certain here: the read
    # that the request wakes hides it and wakes the scheduler again, as that late request
    # would.
    monkeypatch.setattr("enginedge.service.RELAY_POLL_SECONDS", 60.0)
    ctx = svc.service.ctx
    hidden: list[int] = []

    async def queue_heads(real: Any, worker_types: Any, per_tenant: int, now: Any) -> Any:
        heads = await real(worker_types, per_tenant, now)
        if heads and not hidden:
            hidden.append(len(heads))
            ctx.wake_scheduler()
            return []
        return heads

    ctx.store = SpiedStore(ctx.store, queue_heads=queue_heads)  # type: ignore[assignment]
    rid = (await svc.submit("test.echo", {"x": 1})).json()["requestId"]
    final = await svc.wait_terminal(rid, timeout=10)
    assert hidden == [1]
    assert final["status"] == "COMPLETED"


async def test_a_waiting_caller_is_answered_before_the_cache_is_filled(svc: Running) -> None:
    # A caller waiting on the replica that records the outcome is handed it: its answer
    # must not wait for the request cache (a Redis round trip in distributed mode), which
    # only callers on other replicas need. Here the cache is held until the answer came.
    cache = svc.service.ctx.request_cache
    answered = asyncio.Event()
    held: list[bool] = []

    class HeldCache:
        def __getattr__(self, name: str) -> Any:
            return getattr(cache, name)

        async def put_all(self, requests: Any) -> None:
            if any(r.task_type == "test.echo" for r in requests):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(answered.wait(), 5)
                held.append(answered.is_set())
            await cache.put_all(requests)

    svc.service.ctx.request_cache = HeldCache()  # type: ignore[assignment]
    async with httpx.AsyncClient(base_url=svc.url, headers=H, timeout=30) as client:
        response = await client.post(
            "/api/orchestrate?wait=10", json={"taskType": "test.echo", "payload": {"x": 1}}
        )
        answered.set()
    assert (response.status_code, response.json()["status"]) == (200, "COMPLETED")

    async def cache_filled() -> bool:
        return bool(held)

    await until("the outcome put in the cache", cache_filled)
    assert held == [True]


async def test_shutdown_answers_waiting_callers_at_once(svc: Running, probe: Probe) -> None:
    # uvicorn waits for open requests before the app hears of a shutdown: long-polling
    # callers must be answered then (as if their wait ran out), not held until uvicorn's
    # grace runs out and cancels them with a 500.
    from enginedge.application import requests as use

    busy = (await svc.submit("test.hang", {})).json()["requestId"]
    await svc.wait_for(busy, lambda b: b["status"] == "PROCESSING")
    async with httpx.AsyncClient(base_url=svc.url, headers=H, timeout=60) as other:
        waiting = [
            asyncio.create_task(
                other.post(
                    "/api/orchestrate?wait=50", json={"taskType": "test.hang", "payload": {}}
                )
            )
            for _ in range(3)
        ]
        polling = asyncio.create_task(other.get(f"/api/requests/{busy}?wait=50"))
        for _ in range(1000):
            if svc.service.ctx.waiters.count() == 4 or any(w.done() for w in waiting):
                break
            await asyncio.sleep(0.01)
        assert svc.service.ctx.waiters.count() == 4
        svc.server.should_exit = True
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert [a.status_code for a in answers] == [202] * 3
        assert {a.json()["status"] for a in answers} <= {"PENDING", "DISPATCHED", "PROCESSING"}
        polled = await asyncio.wait_for(polling, 10)
        assert (polled.status_code, polled.json()["status"]) == (200, "PROCESSING")
        # A caller arriving while the service drains is not made to wait either.
        late = use.wait_for_request(svc.service.ctx, uuid.UUID(busy), 50)
        assert (await asyncio.wait_for(late, 2)).status.value == "PROCESSING"
    probe.release.set()


async def test_cli_follow_resumes_across_a_restart(database_url: str, tmp_path: Path) -> None:
    # `enginedge submit --wait` follows the event stream; a rolling restart closes it. The
    # client resumes (Last-Event-ID) on the service that answers next, and sees the outcome.
    from enginedge.entrypoints.client import Client

    settings = fast_settings(tmp_path, database_url)
    port = free_port()
    probe = Probe()
    follower = Client(f"http://127.0.0.1:{port}", API_KEY)
    async with run_service(settings, [worker_for_tests(probe, capacity=1)], port) as first:
        rid = (await first.submit("test.hang", {})).json()["requestId"]
        await first.wait_for(rid, lambda b: b["status"] == "PROCESSING")
        seen: list[tuple[str, dict[str, Any]]] = []

        def follow() -> None:
            for event in follower.events(rid):
                seen.append(event)

        following = asyncio.create_task(asyncio.to_thread(follow))
        for _ in range(500):  # until the follower is connected and told the story so far
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.01)
        assert [d["status"] for _, d in seen] == ["PENDING", "DISPATCHED", "PROCESSING"]
        first.server.should_exit = True
        await asyncio.sleep(0.5)  # the stream is closed; the follower is reconnecting
        assert not following.done()
        probe.release.set()  # the drain lets the task finish
    async with run_service(settings, [worker_for_tests(probe)], port):
        await asyncio.wait_for(following, 30)
    assert seen[-1][1]["status"] == "COMPLETED"
    assert seen[-1][1]["result"] == {"released": True}


async def test_events_of_an_unknown_request_are_404(svc: Running) -> None:
    response = await svc.client.get(
        "/api/requests/6f1c1a55-0000-4000-8000-000000000000/events", headers=H
    )
    assert response.status_code == 404
    assert error_of(response)["code"] == "REQUEST_NOT_FOUND"


# ------------------------------------------------------------------ fleet, probes, docs


async def test_workers_registry(svc: Running) -> None:
    workers = (await svc.client.get("/api/workers", headers=H)).json()["items"]
    by_type = {w["type"]: w for w in workers}
    assert set(by_type) == {"data-processing", "testing"}
    data = by_type["data-processing"]
    assert data["status"] == "HEALTHY"
    assert data["capabilities"] == ["data.describe", "data.sql", "echo"]
    assert data["capacity"] == 4
    one = await svc.client.get(f"/api/workers/{data['workerId']}", headers=H)
    assert one.json()["workerId"] == data["workerId"]
    missing = await svc.client.get("/api/workers/nobody", headers=H)
    assert missing.status_code == 404
    assert error_of(missing)["code"] == "WORKER_NOT_FOUND"


async def test_probes_and_metrics_need_no_key(svc: Running) -> None:
    live = await svc.client.get("/live")
    assert live.status_code == 200
    ready = await svc.client.get("/ready")
    assert ready.status_code == 200, ready.text
    assert {c["status"] for c in ready.json()["components"].values()} == {"up"}
    health = (await svc.client.get("/health")).json()
    assert health["status"] == "ok"
    assert health["workers"]["data-processing"] == {"healthy": 1, "total": 1}
    rid = (await svc.submit("test.echo", {})).json()["requestId"]
    await svc.wait_terminal(rid)
    text = (await svc.client.get("/metrics")).text
    assert 'enginedge_requests_total{status="success"} 1.0' in text
    assert 'enginedge_worker_health_status{status="healthy",worker_type="testing"} 1.0' in text
    assert 'enginedge_request_duration_seconds{quantile="0.95"}' in text


async def test_openapi_document_lists_every_endpoint(svc: Running) -> None:
    doc = (await svc.client.get("/openapi.json")).json()
    assert set(doc["paths"]) >= {
        "/api/orchestrate",
        "/api/requests",
        "/api/requests/{request_id}",
        "/api/requests/{request_id}/cancel",
        "/api/requests/{request_id}/events",
        "/api/workers",
        "/api/workers/{worker_id}",
        "/health",
        "/ready",
        "/live",
        "/metrics",
    }
    schemes = doc["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} >= {"apiKey", "http"}


# ------------------------------------------------------------------ the wire contract


async def test_dispatches_carry_trace_and_correlation_headers(svc: Running) -> None:
    from enginedge.domain.messages import TRACEPARENT

    # A reader of its own on the worker's inbox, where the scheduler sends its dispatches.
    (worker,) = [w for w in svc.service.workers if w.app.type == "testing"]
    tap = await svc.service.ctx.bus.subscribe([worker.inbox], None)
    caller_trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    await svc.submit(
        "test.echo",
        {},
        metadata={"correlationId": "order-7"},
        headers={"traceparent": caller_trace},
    )
    await svc.submit("test.echo", {})
    first, second = await tap.next_batch(2, 5.0), await tap.next_batch(1, 5.0)
    messages = first + second
    assert messages[0].headers == {"traceparent": caller_trace, "correlation-id": "order-7"}
    # No trace from the caller: one is started, and the request id correlates.
    assert TRACEPARENT.match(messages[1].headers["traceparent"])
    assert messages[1].headers["correlation-id"] == messages[1].key


async def test_a_short_task_sends_only_its_outcome_a_longer_one_says_it_started(
    svc: Running,
) -> None:
    from enginedge.domain.messages import RESULTS_TOPIC, ResultMessage

    tap = await svc.service.ctx.bus.subscribe([RESULTS_TOPIC], "test-results-tap")
    quick = (await svc.submit("test.echo", {"n": 1})).json()["requestId"]
    assert (await svc.wait_terminal(quick))["status"] == "COMPLETED"
    slow = (await svc.submit("test.sleep", {"seconds": 0.3})).json()["requestId"]
    running = await svc.wait_for(slow, lambda b: b["status"] == "PROCESSING")
    assert running["startedAt"] is not None  # told before the outcome
    final = await svc.wait_terminal(slow)
    assert final["status"] == "COMPLETED"
    assert final["startedAt"] < final["finishedAt"]
    told: dict[str, list[str]] = {quick: [], slow: []}
    for _ in range(20):
        if sum(len(kinds) for kinds in told.values()) >= 3:
            break
        for message in await tap.next_batch(10, 0.5):
            result = ResultMessage.from_json(message.value)
            told.setdefault(str(result.request_id), []).append(result.kind)
    assert told[quick] == ["completed"]
    assert told[slow] == ["progress", "completed"]


async def test_a_result_that_cannot_be_sent_fails_the_request_clearly(svc: Running) -> None:
    rid = (await svc.submit("test.unsendable", {})).json()["requestId"]
    final = await svc.wait_terminal(rid)
    assert final["status"] == "FAILED"
    assert "cannot be sent as JSON" in final["error"]
    # The largest integers the wire carries are accepted as given.
    edge = {"low": -(2**63), "high": 2**64 - 1}
    done = await svc.client.post(
        "/api/orchestrate?wait=10", headers=H, json={"taskType": "test.echo", "payload": edge}
    )
    assert done.json()["result"] == {"echo": edge}


async def test_duplicate_and_superseded_results_change_nothing(svc: Running) -> None:
    from enginedge.application.ports import BusMessage
    from enginedge.domain.messages import RESULTS_TOPIC, ResultMessage

    rid = (await svc.submit("test.echo", {"n": 1})).json()["requestId"]
    done = await svc.wait_terminal(rid)
    for attempt, kind in ((1, "completed"), (1, "failed"), (7, "completed")):
        message = ResultMessage(
            request_id=uuid.UUID(rid),
            attempt=attempt,
            worker_id=done["workerId"],
            kind=kind,
            seq=9,
            result={"forged": True} if kind == "completed" else None,
            error="late failure" if kind == "failed" else None,
        )
        await svc.service.ctx.bus.publish([BusMessage(RESULTS_TOPIC, rid, message.to_json())])

    async def all_three_consumed() -> bool:
        ignored = svc.service.metrics.registry.get_sample_value
        return (ignored("enginedge_results_ignored_total", {"reason": "duplicate"}) or 0) >= 3

    await until("the three late results to be consumed", all_three_consumed)
    after = await svc.get(rid)
    assert (after["status"], after["result"], after["error"]) == (
        "COMPLETED",
        {"echo": {"n": 1}},
        None,
    )
    text = (await svc.client.get("/metrics")).text
    assert 'enginedge_results_ignored_total{reason="duplicate"} 3.0' in text
