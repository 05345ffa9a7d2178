"""The whole HTTP API fuzzed from its own OpenAPI document (schemathesis): no 5xx, and every
answer matches the schema the document declares for it."""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from enginedge.entrypoints.asgi import build_app
from tests.faults.support import H, embedded_service, record
from tests.support.harness import fast_settings

# Examples per operation: bounded for CI (`make test-faults`); FUZZ_EXAMPLES raises it.
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))
CALLS: Counter[str] = Counter()


@pytest.fixture(scope="module", autouse=True)
def _figures() -> Iterator[None]:
    yield
    record(
        "api-fuzz",
        examplesPerOperation=EXAMPLES,
        calls=sum(CALLS.values()),
        serverErrors=sum(
            n
            for k, n in CALLS.items()
            if k.rsplit(" ", 1)[1].startswith("5") and not k.endswith(" 503")
        ),
        byOperationAndStatus=dict(sorted(CALLS.items())),
    )


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with embedded_service(tmp_path_factory.mktemp("fuzz"), RATE_LIMIT_REQUESTS="100000000") as url:
        yield url


def _document() -> dict[str, Any]:
    """The OpenAPI document the service serves at /openapi.json (built, not started)."""
    app = build_app(fast_settings(Path(tempfile.gettempdir())))
    return app.openapi()


# (Built from the app rather than loaded from the live service's /openapi.json through
# schemathesis.pytest.from_fixture, whose lazy loading breaks on pytest 9.)
schema = schemathesis.openapi.from_dict(_document())
# Server-Sent Events: a 200 answer is a stream that never ends, read apart below.
STREAMS = r"(/events|/feed)$"


@schema.exclude(path_regex=STREAMS).parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api_conforms_to_its_openapi_document(case: schemathesis.Case, live_url: str) -> None:
    response = case.call_and_validate(
        base_url=live_url,
        headers=H,
        timeout=30,
        checks=[not_a_server_error, response_schema_conformance],
    )
    CALLS[f"{case.method} {case.path} {response.status_code}"] += 1


@schema.include(path_regex=STREAMS).parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_event_streams_answer_without_server_errors(case: schemathesis.Case, live_url: str) -> None:
    """The streams: an error answer is checked in full; a 200 must be an event stream."""
    kwargs = case.as_transport_kwargs(base_url=live_url, headers=H)
    with requests.request(**kwargs, timeout=30, stream=True) as response:
        CALLS[f"{case.method} {case.path} {response.status_code}"] += 1
        assert response.status_code < 500, response.content
        if response.status_code == 200:
            assert response.headers["content-type"].startswith("text/event-stream")
            return
        body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"]), body
