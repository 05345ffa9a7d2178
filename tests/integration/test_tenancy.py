"""Tenancy end to end (SPEC §3): every API key is a tenant that sees, waits on, lists,
follows and cancels only its own requests, another tenant's request answering exactly as an
unknown id does; operators' keys (``ADMIN_API_KEYS``) see and cancel every tenant's, and so
does the development key the service generates when no key is configured.
"""

from __future__ import annotations

import io
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from enginedge.adapters.http.auth import caller_id
from enginedge.application import requests as use
from enginedge.application.ports import BusMessage
from enginedge.domain.messages import RESULTS_TOPIC
from tests.support.harness import Running, fast_settings, run_service, until
from tests.support.workers import Probe, worker_for_tests

KEY_A = "key-a-0123456789"
KEY_B = "key-b-0123456789"
KEY_OPS = "key-ops-0123456789"
A = {"X-API-Key": KEY_A}
B = {"X-API-Key": KEY_B}
OPS = {"X-API-Key": KEY_OPS}
# Tenant A's key has a name, B's has none (it is known by its hash); the operator's key
# is not repeated in API_KEYS.
API_KEYS = f"team-a:{KEY_A},{KEY_B}"
ADMIN_API_KEYS = f"ops:{KEY_OPS}"
HASH_B = caller_id(KEY_B)


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest.fixture
async def svc(database_url: str, tmp_path: Path, probe: Probe) -> AsyncIterator[Running]:
    settings = fast_settings(
        tmp_path, database_url, api_keys=API_KEYS, admin_api_keys=ADMIN_API_KEYS
    )
    async with run_service(settings, [worker_for_tests(probe)]) as running:
        yield running


async def submit(svc: Running, headers: dict[str, str], task_type: str = "test.echo") -> str:
    response = await svc.client.post(
        "/api/orchestrate", json={"taskType": task_type, "payload": {}}, headers=headers
    )
    assert response.status_code == 202, response.text
    rid: str = response.json()["requestId"]
    return rid


async def until_status(
    svc: Running, rid: str, statuses: set[str], headers: dict[str, str] = A
) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def check() -> bool:
        nonlocal seen
        seen = (await svc.client.get(f"/api/requests/{rid}", headers=headers)).json()
        return seen.get("status") in statuses

    await until(f"{rid} in {statuses}", check)
    return seen


async def first_event(svc: Running, path: str, headers: dict[str, str], kind: str) -> Any:
    """The data of the first ``kind`` event of the SSE stream at ``path``."""
    async with svc.client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200
        event, data = "message", ""
        async for line in response.aiter_lines():
            line = line.rstrip("\r")
            if line.startswith("event:"):
                event = line[6:].strip()
            elif line.startswith("data:"):
                data += line[5:].strip()
            elif line == "" and data:
                if event == kind:
                    return orjson.loads(data)
                event, data = "message", ""
    raise AssertionError(f"no {kind} event from {path}")


def ids(page: dict[str, Any]) -> list[str]:
    return [item["requestId"] for item in page["items"]]


async def test_another_tenants_request_is_not_found_as_an_unknown_id_is(
    svc: Running, probe: Probe, log_lines: io.StringIO
) -> None:
    running = await submit(svc, A, "test.hang")
    finished = await submit(svc, A)
    own_b = await submit(svc, B)
    await until_status(svc, running, {"PROCESSING"})
    assert (await until_status(svc, finished, {"COMPLETED"}))["tenant"] == "team-a"
    # Read once more by its tenant: now it is in the request cache too.
    assert (await svc.client.get(f"/api/requests/{finished}", headers=A)).status_code == 200

    unknown = str(uuid.uuid4())
    for rid in (running, finished):
        calls: list[tuple[str, str, dict[str, Any]]] = [
            ("GET", "/api/requests/{}", {}),
            ("GET", "/api/requests/{}", {"wait": 5}),
            ("POST", "/api/requests/{}/cancel", {}),
            ("GET", "/api/requests/{}/events", {}),
        ]
        for method, path, params in calls:
            started = time.monotonic()
            theirs = await svc.client.request(method, path.format(rid), params=params, headers=B)
            took = time.monotonic() - started
            nobodys = await svc.client.request(
                method, path.format(unknown), params=params, headers=B
            )
            where = f"{method} {path} {params} of a {'running' if rid == running else 'done'}"
            assert theirs.status_code == nobodys.status_code == 404, where
            assert theirs.json()["error"]["code"] == "REQUEST_NOT_FOUND", where
            # The same body, but for the id it names: nothing tells the two apart.
            assert theirs.text == nobodys.text.replace(unknown, rid), where
            assert theirs.headers["content-type"] == nobodys.headers["content-type"], where
            # Not found at once, as an unknown id is, not after the wait ran out.
            assert took < 2, where

    # B's cancel changed nothing: A's request still runs.
    assert (await svc.client.get(f"/api/requests/{running}", headers=A)).json()[
        "status"
    ] == "PROCESSING"
    assert probe.cancelled == []

    # Each lists only its own, and naming another tenant lists nothing.
    mine_b = (await svc.client.get("/api/requests", headers=B)).json()
    assert ids(mine_b) == [own_b]
    assert mine_b["items"][0]["tenant"] == HASH_B
    mine_a = (await svc.client.get("/api/requests", headers=A)).json()
    assert ids(mine_a) == [finished, running]
    assert {item["tenant"] for item in mine_a["items"]} == {"team-a"}
    for other in ("team-a", caller_id(KEY_A), "nobody"):
        page = (await svc.client.get("/api/requests", params={"tenant": other}, headers=B)).json()
        assert page["items"] == [], other
    own = (await svc.client.get("/api/requests", params={"tenant": HASH_B}, headers=B)).json()
    assert ids(own) == [own_b]

    # Its own tenant may do all of it.
    events = await first_event(svc, f"/api/requests/{running}/events", A, "status")
    assert events["requestId"] == running
    cancelled = await svc.client.post(f"/api/requests/{running}/cancel", headers=A)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "CANCELLED"
    assert cancelled.json()["tenant"] == "team-a"

    # Logs name the tenant, by its name, and never show a key.
    lines = [orjson.loads(line) for line in log_lines.getvalue().splitlines() if line]
    accepted = {x["requestId"]: x for x in lines if x["message"] == "request accepted"}
    assert accepted[running]["tenant"] == "team-a"
    assert accepted[own_b]["tenant"] == HASH_B
    cancel_line = next(x for x in lines if x["message"] == "request cancelled")
    assert (cancel_line["tenant"], cancel_line["cancelledBy"]) == ("team-a", "team-a")
    for key in (KEY_A, KEY_B, KEY_OPS):
        assert key not in log_lines.getvalue()


async def test_an_operator_sees_filters_follows_and_cancels_every_tenants_requests(
    svc: Running, probe: Probe
) -> None:
    hang_a = await submit(svc, A, "test.hang")
    hang_b = await submit(svc, B, "test.hang")
    echo_b = await submit(svc, B)
    await until_status(svc, hang_a, {"PROCESSING"})

    everything = (await svc.client.get("/api/requests", headers=OPS)).json()
    assert ids(everything) == [echo_b, hang_b, hang_a]
    tenants = {item["requestId"]: item["tenant"] for item in everything["items"]}
    assert tenants == {hang_a: "team-a", hang_b: HASH_B, echo_b: HASH_B}
    # Filtered by a tenant's name or its hash; a name no key has is a mistake.
    by_name = (await svc.client.get("/api/requests?tenant=team-a", headers=OPS)).json()
    assert ids(by_name) == [hang_a]
    by_hash = (await svc.client.get(f"/api/requests?tenant={HASH_B}", headers=OPS)).json()
    assert ids(by_hash) == [echo_b, hang_b]
    unknown = await svc.client.get("/api/requests?tenant=nobody", headers=OPS)
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "INVALID_REQUEST_PAYLOAD"

    seen = await svc.client.get(f"/api/requests/{hang_b}", headers=OPS, params={"wait": 0.2})
    assert seen.status_code == 200 and seen.json()["tenant"] == HASH_B
    status = await first_event(svc, f"/api/requests/{hang_a}/events", OPS, "status")
    assert status["requestId"] == hang_a

    for rid in (hang_a, hang_b):
        cancelled = await svc.client.post(f"/api/requests/{rid}/cancel", headers=OPS)
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "CANCELLED"
    assert (await until_status(svc, hang_a, {"CANCELLED"}))["tenant"] == "team-a"
    b_sees = (await svc.client.get(f"/api/requests/{hang_b}", headers=B)).json()
    assert b_sees["status"] == "CANCELLED"
    # The operator's key, though not in API_KEYS, works for everything else too.
    own = await submit(svc, OPS)
    assert (await svc.client.get(f"/api/requests/{own}", headers=OPS)).json()["tenant"] == "ops"
    assert (await svc.client.get(f"/api/requests/{own}", headers=A)).status_code == 404
    assert (await svc.client.get("/api/workers", headers=B)).status_code == 200


async def test_the_console_shows_a_tenant_its_own_and_an_operator_everything(
    tmp_path: Path,
) -> None:
    settings = fast_settings(tmp_path, api_keys=API_KEYS, admin_api_keys=ADMIN_API_KEYS)
    async with run_service(settings, [worker_for_tests(Probe())]) as svc:
        rid_a = await submit(svc, A)
        rid_b = await submit(svc, B)
        await until_status(svc, rid_a, {"COMPLETED"}, A)
        await until_status(svc, rid_b, {"COMPLETED"}, B)
        sessions = [
            (await svc.client.get("/api/console/session", headers=h)).json() for h in (A, B, OPS)
        ]
        assert sessions == [
            {"tenant": "team-a", "admin": False},
            {"tenant": HASH_B, "admin": False},
            {"tenant": "ops", "admin": True},
        ]

        feed = "/api/console/feed?limit=100"
        b_rows = (await first_event(svc, feed, B, "requests"))["items"]
        assert [(r["requestId"], r["tenant"]) for r in b_rows] == [(rid_b, HASH_B)]
        ops_rows = (await first_event(svc, feed, OPS, "requests"))["items"]
        assert [(r["requestId"], r["tenant"]) for r in ops_rows] == [
            (rid_b, HASH_B),
            (rid_a, "team-a"),
        ]

        def finished(activity: dict[str, Any]) -> int:
            return sum(sum(s["throughput"]) for s in activity["series"].values())

        b_activity = (await svc.client.get("/api/console/activity", headers=B)).json()
        ops_activity = (await svc.client.get("/api/console/activity", headers=OPS)).json()
        assert (finished(b_activity), finished(ops_activity)) == (1, 2)

        # Dead letters hold any tenant's messages as sent: operators only.
        await svc.service.ctx.bus.publish(
            [BusMessage(RESULTS_TOPIC, "bad", b'{"requestId": "not-a-uuid"}')]
        )

        async def dead_letters(headers: dict[str, str]) -> list[Any]:
            answer = await svc.client.get("/api/console/dead-letters", headers=headers)
            assert answer.status_code == 200
            items: list[Any] = answer.json()["items"]
            return items

        async def kept() -> bool:
            return len(await dead_letters(OPS)) == 1

        await until("the dead letter is kept", kept)
        assert await dead_letters(B) == []


async def test_the_generated_development_key_is_an_operator(tmp_path: Path) -> None:
    settings = fast_settings(tmp_path, api_keys=None)
    async with run_service(settings, [worker_for_tests(Probe())]) as svc:
        key = (tmp_path / "api-key").read_text().strip()
        dev = {"X-API-Key": key}
        session = (await svc.client.get("/api/console/session", headers=dev)).json()
        assert session == {"tenant": "dev", "admin": True}
        # A request of some other tenant (no key of which is configured here).
        other = await use.submit(
            svc.service.ctx,
            use.SubmitCommand(task_type="test.echo", payload={}, caller="0123456789abcdef"),
        )
        rid = str(other.request.id)
        answer = await svc.client.get(f"/api/requests/{rid}", headers=dev, params={"wait": 5})
        assert answer.status_code == 200
        assert answer.json()["tenant"] == "0123456789abcdef"
        listed = (await svc.client.get("/api/requests", headers=dev)).json()
        assert ids(listed) == [rid]
        own = await submit(svc, dev, "test.hang")
        assert (await svc.client.get(f"/api/requests/{own}", headers=dev)).json()["tenant"] == "dev"
        cancelled = await svc.client.post(f"/api/requests/{own}/cancel", headers=dev)
        assert cancelled.status_code == 200


async def test_named_tenants_have_their_waiting_and_running_in_the_metrics(
    svc: Running, probe: Probe
) -> None:
    running = await submit(svc, A, "test.hang")
    await until_status(svc, running, {"PROCESSING"})
    text = (await svc.client.get("/metrics")).text
    assert 'enginedge_tenant_requests{state="running",tenant="team-a"} 1.0' in text
    assert 'enginedge_tenant_requests{state="waiting",tenant="team-a"} 0.0' in text
    assert 'enginedge_tenant_requests{state="waiting",tenant="ops"} 0.0' in text
    # A key without a name gets no series: the label's values are the names given.
    assert HASH_B not in text
    probe.release.set()
