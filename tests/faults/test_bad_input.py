"""Hostile HTTP input against the running service: oversized bodies, deep JSON nesting,
invalid UTF-8, huge headers, wrong content types, SQL-looking strings in every field,
unknown request ids, wrong API keys at a high rate. Never a 5xx, never a hang, and the
service still serves a good request afterwards."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from tests.faults.support import TERMINAL, H, embedded_service, record

SQL = [
    "'; DROP TABLE requests; --",
    "1' OR '1'='1",
    '" OR 1=1 --',
    "x'); DELETE FROM request_results; --",
    "1; SELECT pg_sleep(30)",
    "' UNION SELECT id, payload FROM requests --",
]
SEEN: dict[str, Counter[int]] = {}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with embedded_service(tmp_path_factory.mktemp("badinput")) as url:
        yield url


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    yield
    record(
        "bad-input",
        cases={name: dict(sorted(codes.items())) for name, codes in sorted(SEEN.items())},
        serverErrors=sum(n for c in SEEN.values() for code, n in c.items() if code >= 500),
    )


@pytest.fixture
async def client(live: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live, timeout=15) as c:
        yield c


def seen(case: str, response: httpx.Response) -> int:
    SEEN.setdefault(case, Counter())[response.status_code] += 1
    assert response.status_code < 500, (case, response.status_code, response.text[:300])
    if response.status_code >= 400 and response.headers.get("content-type", "").startswith(
        "application/json"
    ):
        assert "error" in response.json(), response.text[:300]
    return response.status_code


async def good_request_completes(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/api/orchestrate", headers=H, json={"taskType": "echo", "payload": {"ok": 1}}
    )
    assert response.status_code == 202, response.text
    rid = response.json()["requestId"]
    body = (await client.get(f"/api/requests/{rid}?wait=20", headers=H, timeout=30)).json()
    assert body["status"] == "COMPLETED", body


async def test_oversized_bodies(client: httpx.AsyncClient) -> None:
    big = {"taskType": "echo", "payload": {"blob": "x" * (2 * 2**20)}}
    assert (
        seen(
            "oversized body (2 MiB JSON)",
            await client.post("/api/orchestrate", headers=H, json=big),
        )
        == 413
    )

    # A lying Content-Length, and a chunked body with none.
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 65536

    assert (
        seen(
            "oversized body (chunked, 2.5 MiB)",
            await client.post(
                "/api/orchestrate",
                headers={**H, "content-type": "application/json"},
                content=chunks(),
            ),
        )
        == 413
    )
    await good_request_completes(client)


async def test_deep_json_nesting(client: httpx.AsyncClient) -> None:
    for depth in (100, 1_000, 100_000):
        body = '{"taskType":"echo","payload":' + '{"a":' * depth + "1" + "}" * depth + "}"
        seen(
            f"JSON nested {depth} deep",
            await client.post(
                "/api/orchestrate",
                headers={**H, "content-type": "application/json"},
                content=body.encode(),
            ),
        )
        arrays = '{"taskType":"echo","payload":{"a":' + "[" * depth + "]" * depth + "}}"
        seen(
            f"JSON arrays nested {depth} deep",
            await client.post(
                "/api/orchestrate",
                headers={**H, "content-type": "application/json"},
                content=arrays.encode(),
            ),
        )
    await good_request_completes(client)


async def test_invalid_utf8_and_broken_json(client: httpx.AsyncClient) -> None:
    bodies = [
        b'{"taskType":"echo","payload":{"s":"\xff\xfe\xfd"}}',
        b'{"taskType":"ech\xc3\x28","payload":{}}',
        b"\xff" * 100,
        b'{"taskType":"echo","payload":',
        b"",
        b"null",
        b"[]",
        b'{"taskType":"echo","payload":{"s":"\\ud800"}}',  # a lone surrogate
        b'{"taskType":"echo","payload":{"n":1e999999}}',
        b'{"taskType":"echo","payload":{"n":' + b"9" * 5000 + b"}}",
    ]
    for body in bodies:
        seen(
            "invalid UTF-8 / broken JSON",
            await client.post(
                "/api/orchestrate", headers={**H, "content-type": "application/json"}, content=body
            ),
        )
    # Parsed by Python's JSON but not storable or sendable as given: 422, not a 500 (a lone
    # surrogate was one) nor an infinite number silently turned into null.
    for body in (
        b'{"taskType":"echo","payload":{"s":"\\ud800"}}',
        b'{"taskType":"echo","payload":{"\\udfff":1}}',
        b'{"taskType":"echo","payload":{"n":1e999999}}',
        b'{"taskType":"echo","payload":{"s":"a\\u0000b"}}',
        b'{"taskType":"echo","payload":{},"metadata":{"x":"\\u0000"}}',
        b'{"taskType":"echo","payload":{"n":123456789012345678901234567890}}',
        b'{"taskType":"echo","payload":{"n":[-9223372036854775809]}}',
    ):
        code = seen(
            "not storable JSON",
            await client.post(
                "/api/orchestrate", headers={**H, "content-type": "application/json"}, content=body
            ),
        )
        assert code == 422, body
    seen("invalid UTF-8 in the path", await client.get("/api/requests/%ff%fe", headers=H))
    seen("invalid UTF-8 in the query", await client.get("/api/requests?status=%ff%fe", headers=H))
    await good_request_completes(client)


async def test_huge_headers(live: str, client: httpx.AsyncClient) -> None:
    for size in (8_000, 64_000, 1_000_000):
        try:
            response = await client.get(
                "/api/requests", headers={**H, "X-Filler": "a" * size}, timeout=15
            )
        except (httpx.RemoteProtocolError, httpx.ReadError):
            SEEN.setdefault(f"header of {size} bytes", Counter())[0] += 1  # 0: connection closed
            continue
        seen(f"header of {size} bytes", response)
    many = {f"X-H{i}": "v" for i in range(500)}
    try:
        seen("500 headers", await client.get("/api/requests", headers={**H, **many}))
    except (httpx.RemoteProtocolError, httpx.ReadError):
        SEEN.setdefault("500 headers", Counter())[0] += 1
    huge_key = {"X-API-Key": "k" * 100_000}
    try:
        assert seen("a 100 kB API key", await client.get("/api/requests", headers=huge_key)) in (
            400,
            401,
            431,
        )
    except (httpx.RemoteProtocolError, httpx.ReadError):
        SEEN.setdefault("a 100 kB API key", Counter())[0] += 1
    await good_request_completes(client)


async def test_wrong_content_types(client: httpx.AsyncClient) -> None:
    body = b'{"taskType":"echo","payload":{}}'
    for content_type in (
        "text/plain",
        "application/xml",
        "multipart/form-data; boundary=x",
        "application/x-www-form-urlencoded",
        "application/json; charset=latin-1",
        "",
        "application/json\x7f",
    ):
        try:
            response = await client.post(
                "/api/orchestrate", headers={**H, "content-type": content_type}, content=body
            )
        except httpx.LocalProtocolError:
            continue  # the client refuses to send it
        seen("wrong content type", response)
    seen("form body", await client.post("/api/orchestrate", headers=H, data={"taskType": "echo"}))
    await good_request_completes(client)


async def test_sql_looking_strings_in_every_field(client: httpx.AsyncClient) -> None:
    accepted = []
    for s in SQL:
        cases: list[tuple[str, Any]] = [
            ("taskType", {"taskType": s, "payload": {}}),
            ("payload key and value", {"taskType": "echo", "payload": {s: s}}),
            (
                "metadata",
                {
                    "taskType": "echo",
                    "payload": {},
                    "metadata": {"correlationId": s, "priority": s, "timeout": s, "x": s},
                },
            ),
            ("data.sql tables", {"taskType": "data.sql", "payload": {"sql": s, "tables": {s: []}}}),
        ]
        for name, body in cases:
            response = await client.post("/api/orchestrate", headers=H, json=body)
            seen(f"SQL-looking {name}", response)
            if response.status_code == 202:
                accepted.append(response.json()["requestId"])
        response = await client.post(
            "/api/orchestrate",
            headers={**H, "Idempotency-Key": s, "X-Correlation-Id": s},
            json={"taskType": "echo", "payload": {"n": 1}},
        )
        seen("SQL-looking Idempotency-Key header", response)
        seen("SQL-looking request id", await client.get(f"/api/requests/{s}", headers=H))
        seen("SQL-looking cancel id", await client.post(f"/api/requests/{s}/cancel", headers=H))
        seen("SQL-looking worker id", await client.get(f"/api/workers/{s}", headers=H))
        for param in ("status", "taskType", "cursor", "since", "until", "limit"):
            seen(
                f"SQL-looking ?{param}=",
                await client.get("/api/requests", params={param: s}, headers=H),
            )
    for rid in accepted:
        body = (await client.get(f"/api/requests/{rid}?wait=20", headers=H, timeout=30)).json()
        assert body["status"] in TERMINAL
    listing = (await client.get("/api/requests?limit=5", headers=H)).json()
    assert listing["items"]  # the tables are still there
    await good_request_completes(client)


async def test_unknown_request_ids(client: httpx.AsyncClient) -> None:
    for rid in ("00000000-0000-0000-0000-000000000000", secrets.token_hex(16), "0" * 1000, "-1"):
        for method, path in (
            ("GET", f"/api/requests/{rid}"),
            ("GET", f"/api/requests/{rid}?wait=1"),
            ("POST", f"/api/requests/{rid}/cancel"),
            ("GET", f"/api/requests/{rid}/events"),
            ("GET", f"/api/workers/{rid}"),
        ):
            code = seen("unknown ids", await client.request(method, path, headers=H))
            assert code in (404, 422), (method, path, code)


async def test_wrong_api_keys_at_a_high_rate(client: httpx.AsyncClient) -> None:
    codes: Counter[int] = Counter()
    semaphore = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        headers = (
            {"X-API-Key": secrets.token_hex(8 + i % 40)}
            if i % 3
            else {"Authorization": f"Bearer {secrets.token_urlsafe(i % 64 + 1)}"}
        )
        async with semaphore:
            response = await client.post(
                "/api/orchestrate", headers=headers, json={"taskType": "echo", "payload": {}}
            )
        codes[response.status_code] += 1

    started = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(3000)))
    elapsed = time.monotonic() - started
    SEEN["3000 wrong API keys, 50 at a time"] = codes
    assert set(codes) == {401}, codes
    # The right key is neither slowed nor limited by the wrong ones.
    started = time.monotonic()
    await good_request_completes(client)
    assert time.monotonic() - started < 5
    record("bad-keys-rate", requests=3000, seconds=round(elapsed, 2), rate=round(3000 / elapsed))
