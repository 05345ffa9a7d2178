"""The wire contract: messages round-trip, and anything else is refused with a reason."""

from __future__ import annotations

import contextlib
import uuid
from datetime import UTC, datetime

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enginedge.domain.messages import (
    ControlMessage,
    DispatchMessage,
    HeartbeatMessage,
    MalformedMessage,
    ResultMessage,
    dead_letter,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
WID = str(uuid.uuid4())
RID = str(uuid.uuid4())


def test_round_trips() -> None:
    dispatch = DispatchMessage(uuid.uuid4(), 2, "data.sql", {"sql": "x"}, {"p": 1}, NOW)
    assert DispatchMessage.from_json(dispatch.to_json()) == dispatch
    result = ResultMessage(
        uuid.uuid4(), 1, WID, "completed", 3, result={"a": 1}, processing_time_ms=12
    )
    assert ResultMessage.from_json(result.to_json()) == result
    beat = HeartbeatMessage(
        WID, "llm", "http://w:8080", ["llm.chat"], 4, 1, "HEALTHY", NOW, [str(uuid.uuid4())]
    )
    assert HeartbeatMessage.from_json(beat.to_json()) == beat
    reachable = HeartbeatMessage(
        WID,
        "llm",
        "http://w:8080",
        ["llm.chat"],
        4,
        0,
        "HEALTHY",
        NOW,
        inbox="worker.llm.x.requests",
    )
    assert orjson.loads(reachable.to_json())["inbox"] == "worker.llm.x.requests"
    assert HeartbeatMessage.from_json(reachable.to_json()) == reachable
    assert "inbox" not in orjson.loads(beat.to_json())  # only said when there is one
    bad_inbox = orjson.loads(reachable.to_json()) | {"inbox": "no spaces allowed"}
    with pytest.raises(MalformedMessage, match="inbox"):
        HeartbeatMessage.from_json(orjson.dumps(bad_inbox))
    gave_up = HeartbeatMessage(
        WID, "llm", "http://w:8080", ["llm.chat"], 4, 0, "UNHEALTHY", NOW, abandoned={RID: 2}
    )
    assert orjson.loads(gave_up.to_json())["abandoned"] == {RID: 2}
    assert HeartbeatMessage.from_json(gave_up.to_json()) == gave_up
    assert "abandoned" not in orjson.loads(beat.to_json())  # only said when there is some
    control = ControlMessage("cancel", uuid.uuid4())
    assert ControlMessage.from_json(control.to_json()) == control


@pytest.mark.parametrize(
    "abandoned",
    [
        [RID],
        {RID: 0},
        {RID: True},
        {RID: "2"},
        {"not-a-uuid": 1},
        {str(i): 1 for i in range(10_001)},
    ],
)
def test_a_malformed_abandoned_list_is_refused(abandoned: object) -> None:
    beat = orjson.loads(HeartbeatMessage(WID, "llm", "h", [], 1, 0, "HEALTHY", NOW).to_json())
    with pytest.raises(MalformedMessage, match="'abandoned' must map request ids"):
        HeartbeatMessage.from_json(orjson.dumps({**beat, "abandoned": abandoned}))


def test_wire_field_names_follow_the_spec() -> None:
    rid = uuid.uuid4()
    value = orjson.loads(
        ResultMessage(rid, 1, WID, "failed", 1, error="boom", processing_time_ms=5).to_json()
    )
    assert value == {
        "requestId": str(rid),
        "attempt": 1,
        "workerId": WID,
        "kind": "failed",
        "seq": 1,
        "error": "boom",
        "processingTime": 5,
    }
    dispatch = orjson.loads(DispatchMessage(rid, 1, "t", {}, {}, NOW).to_json())
    assert set(dispatch) == {"requestId", "attempt", "taskType", "payload", "metadata", "deadline"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (
            b'{"requestId": "x", "attempt": 1, "workerId": "w", "kind": "completed", "seq": 0, '
            b'"result": {}}',
            "not a UUID",
        ),
        (
            orjson.dumps(
                {
                    "requestId": str(uuid.uuid4()),
                    "attempt": 1,
                    "workerId": WID,
                    "kind": "completed",
                    "seq": 0,
                }
            ),
            "needs a 'result'",
        ),
        (
            orjson.dumps(
                {
                    "requestId": str(uuid.uuid4()),
                    "attempt": 0,
                    "workerId": WID,
                    "kind": "progress",
                    "seq": 0,
                }
            ),
            "'attempt' must be at least 1",
        ),
        (
            orjson.dumps(
                {
                    "requestId": str(uuid.uuid4()),
                    "attempt": True,
                    "workerId": WID,
                    "kind": "progress",
                    "seq": 0,
                }
            ),
            "wrong type",
        ),
        (
            orjson.dumps(
                {
                    "requestId": str(uuid.uuid4()),
                    "attempt": 1,
                    "workerId": WID,
                    "kind": "exploded",
                    "seq": 0,
                }
            ),
            "'kind' must be one of",
        ),
    ],
)
def test_malformed_results_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage, match=reason):
        ResultMessage.from_json(raw)


@given(st.binary(max_size=300))
def test_random_bytes_never_crash_a_parser(raw: bytes) -> None:
    for parser in (DispatchMessage, ResultMessage, HeartbeatMessage, ControlMessage):
        with contextlib.suppress(MalformedMessage):
            parser.from_json(raw)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=8,
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "requestId",
                "attempt",
                "workerId",
                "kind",
                "seq",
                "result",
                "error",
                "chunk",
                "type",
                "capacity",
                "capabilities",
                "status",
                "ts",
                "endpoint",
                "action",
                "deadline",
                "payload",
                "taskType",
            ]
        ),
        json_values,
    )
)
def test_json_objects_of_any_shape_never_crash_a_parser(value: dict[str, object]) -> None:
    raw = orjson.dumps(value)
    for parser in (DispatchMessage, ResultMessage, HeartbeatMessage, ControlMessage):
        with contextlib.suppress(MalformedMessage):
            parser.from_json(raw)


def test_dead_letter_keeps_the_original_and_adds_the_reason() -> None:
    assert orjson.loads(dead_letter(b'{"a": 1}', "bad", NOW)) == {
        "a": 1,
        "error": "bad",
        "failedAt": NOW.isoformat(),
    }
    assert orjson.loads(dead_letter(b"\xffnot json", "bad", NOW))["original"] == "\ufffdnot json"
