"""Property-based tests (hypothesis) of every message the orchestrator and the workers
consume (SPEC §6): arbitrary bytes, arbitrary JSON, and contract-shaped objects whose fields
take wrong types and extreme values. Malformed input goes to the topic's DLQ; nothing raises
out of the consumption path; a good request still completes afterwards.

The service runs (PostgreSQL store, in-process bus, a test worker) on an event loop of its
own in a thread, so that hypothesis drives plain functions."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from enginedge.application.inbox import handle_message
from enginedge.application.ports import BusMessage
from enginedge.domain.messages import (
    CONTROL_TOPIC,
    DISPATCH_DLQ_TOPIC,
    HEARTBEATS_TOPIC,
    RESULTS_TOPIC,
    ControlMessage,
    DispatchMessage,
    HeartbeatMessage,
    MalformedMessage,
    ResultMessage,
    dlq_topic,
)
from enginedge.worker import WorkerRuntime
from tests.conftest import create_database
from tests.faults.support import record
from tests.support.harness import Running, fast_settings, run_service
from tests.support.servers import PostgresServer
from tests.support.workers import Probe, worker_for_tests

T = TypeVar("T")
EXAMPLES = 150
TRIED: dict[str, int] = {}
DEAD: dict[str, int] = {}

# JSON of every shape, with the extremes orjson can write.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=300)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def wrong_or(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """The right kind of value most of the time, any JSON value otherwise."""
    return st.one_of(valid, valid, json_values)


ids = st.uuids().map(str)
timestamps = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
).map(datetime.isoformat) | st.text(max_size=40)
ints = st.integers(min_value=-(2**63), max_value=2**64 - 1)
# Topic names, and text that is none (spaces, slashes, too long, empty).
inboxes = st.from_regex(r"\A[A-Za-z0-9._-]{1,249}\Z") | st.text(max_size=300)


def encoded(fields: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    return fields.map(orjson.dumps)


def anything() -> st.SearchStrategy[bytes]:
    return st.binary(max_size=300) | json_values.map(orjson.dumps)


results = encoded(
    st.fixed_dictionaries(
        {
            "requestId": wrong_or(ids),
            "attempt": wrong_or(st.integers(1, 5) | ints),
            "workerId": wrong_or(ids),
            "kind": wrong_or(st.sampled_from(["progress", "completed", "failed", "other"])),
            "seq": wrong_or(st.integers(0, 10) | ints),
        },
        optional={
            "result": wrong_or(st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
            "chunk": json_values,
            "error": wrong_or(st.text(max_size=100)),
            "processingTime": wrong_or(ints),
        },
    )
)
heartbeats = encoded(
    st.fixed_dictionaries(
        {
            "workerId": wrong_or(ids),
            "type": wrong_or(st.from_regex(r"\Afuzz-[a-z0-9-]{0,40}\Z") | st.text(max_size=60)),
            "endpoint": wrong_or(st.text(max_size=300)),
            # Never a task type that the good request below needs.
            "capabilities": wrong_or(st.lists(st.sampled_from(["fuzz.a", "fuzz.b"]), max_size=3)),
            "capacity": wrong_or(st.integers(1, 64) | ints),
            "active": wrong_or(st.integers(0, 64) | ints),
            "status": wrong_or(st.sampled_from(["HEALTHY", "unhealthy", "DRAINING", "gone"])),
            "ts": wrong_or(timestamps),
        },
        optional={
            "inFlight": wrong_or(st.lists(ids | st.text(max_size=40), max_size=3)),
            "reason": json_values,
            "inbox": wrong_or(inboxes),
            "abandoned": wrong_or(
                st.dictionaries(ids | st.text(max_size=8), st.integers(1, 5) | ints, max_size=3)
            ),
        },
    )
)
# Every field of the right type, the values at their extremes (sizes, NUL characters,
# 64-bit numbers, the first and last representable dates).
extreme_heartbeats = encoded(
    st.fixed_dictionaries(
        {
            "workerId": ids,
            "type": st.from_regex(r"\Afuzz-[a-z0-9-]{0,44}\Z"),
            "endpoint": st.text(max_size=255),
            "capabilities": st.lists(st.text(max_size=80).map(lambda t: f"fuzz.{t}"), max_size=5),
            "capacity": st.integers(1, 2**63 - 1),
            "active": st.integers(0, 2**63 - 1),
            "status": st.sampled_from(["HEALTHY", "UNHEALTHY", "DRAINING"]),
            "ts": st.datetimes(
                min_value=datetime(1, 1, 2),
                max_value=datetime(9999, 12, 30),
                timezones=st.just(UTC),
            ).map(datetime.isoformat),
        },
        optional={
            "inFlight": st.lists(ids, max_size=3),
            "reason": st.text(max_size=600),
            "inbox": st.from_regex(r"\A[A-Za-z0-9._-]{249}\Z"),
            "abandoned": st.dictionaries(ids, st.integers(1, 2**63 - 1), max_size=3),
        },
    )
)
dispatches = encoded(
    st.fixed_dictionaries(
        {
            "requestId": wrong_or(ids),
            "attempt": wrong_or(st.integers(1, 5) | ints),
            "taskType": wrong_or(st.sampled_from(["test.echo", "no.such.task", ""])),
            "payload": wrong_or(st.dictionaries(st.text(max_size=8), json_values, max_size=3)),
            "deadline": wrong_or(timestamps),
        },
        optional={"metadata": json_values},
    )
)
controls = encoded(
    st.fixed_dictionaries(
        {"action": wrong_or(st.sampled_from(["cancel", "stop"])), "requestId": wrong_or(ids)}
    )
)


class Background:
    """The service on its own event loop, in a thread; ``run`` waits for a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Fixture:
    def __init__(self, bg: Background, svc: Running) -> None:
        self.bg = bg
        self.svc = svc
        self.probe_dlq: Any = None

    @property
    def runtime(self) -> WorkerRuntime:
        (runtime,) = self.svc.service.workers
        return runtime

    async def dead_letters(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for message in await self.probe_dlq.next_batch(10_000, 0.05):
            found[message.topic] = found.get(message.topic, 0) + 1
        return found


@pytest.fixture(scope="module")
def service(
    postgres: PostgresServer | str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fixture]:
    bg = Background()
    holder: dict[str, Any] = {}

    async def main() -> None:
        url = await create_database(postgres)
        settings_ = fast_settings(tmp_path_factory.mktemp("msgfuzz"), url, builtin_workers="none")
        try:
            async with run_service(settings_, [worker_for_tests(Probe())]) as svc:
                holder["svc"] = svc
                holder["stop"] = asyncio.Event()
                holder["ready"].set_result(None)
                await holder["stop"].wait()
        except BaseException as exc:
            if not holder["ready"].done():
                holder["ready"].set_exception(exc)
            raise

    holder["ready"] = Future()
    task = asyncio.run_coroutine_threadsafe(main(), bg.loop)
    holder["ready"].result(120)
    fixture = Fixture(bg, holder["svc"])
    topics = [
        *(dlq_topic(t) for t in (RESULTS_TOPIC, HEARTBEATS_TOPIC, CONTROL_TOPIC)),
        DISPATCH_DLQ_TOPIC,  # one for every worker's inbox
    ]
    fixture.probe_dlq = bg.run(fixture.svc.service.ctx.bus.subscribe(topics, "fuzz-dlq-probe"))
    try:
        yield fixture
    finally:
        bg.loop.call_soon_threadsafe(holder["stop"].set)
        task.result(60)
        bg.close()
        record(
            "message-fuzz",
            examplesPerProperty=EXAMPLES,
            messagesTried=dict(TRIED),
            deadLettered=dict(DEAD),
        )


def _malformed(parse: Any, raw: bytes) -> bool:
    try:
        parse(raw)
    except MalformedMessage:
        return True
    return False


def _count(table: dict[str, int], topic: str, n: int = 1) -> None:
    table[topic] = table.get(topic, 0) + n


FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@FUZZ
@given(raw=results | anything())
def test_orchestrator_results(service: Fixture, raw: bytes) -> None:
    _inbox(service, RESULTS_TOPIC, raw, ResultMessage.from_json)


@FUZZ
@given(raw=heartbeats | extreme_heartbeats | anything())
def test_orchestrator_heartbeats(service: Fixture, raw: bytes) -> None:
    _inbox(service, HEARTBEATS_TOPIC, raw, HeartbeatMessage.from_json)


def _inbox(service: Fixture, topic: str, raw: bytes, parse: Any) -> None:
    message = BusMessage(topic, str(uuid.uuid4()), raw, {"traceparent": "junk"})
    service.bg.run(handle_message(service.svc.service.ctx, message))  # never raises
    dead = service.bg.run(service.dead_letters())
    _count(TRIED, topic)
    _count(DEAD, topic, dead.get(dlq_topic(topic), 0))
    if _malformed(parse, raw):
        assert dead == {dlq_topic(topic): 1}, dead
    elif topic == RESULTS_TOPIC:
        # Well-formed, for a request nobody knows: dead-lettered as unknown.
        assert dead == {dlq_topic(topic): 1}, dead
    else:
        assert dead == {}, dead  # a well-formed heartbeat is recorded


@FUZZ
@given(raw=dispatches | anything())
def test_worker_dispatches(service: Fixture, raw: bytes) -> None:
    topic = service.runtime.inbox
    message = BusMessage(topic, str(uuid.uuid4()), raw, {})
    service.bg.run(service.runtime._start(message))  # the consumer's step for one message
    dead = service.bg.run(service.dead_letters())
    _count(TRIED, "worker inbox")
    _count(DEAD, "worker inbox", dead.get(DISPATCH_DLQ_TOPIC, 0))
    if _malformed(DispatchMessage.from_json, raw):
        assert dead.get(DISPATCH_DLQ_TOPIC) == 1, dead
    else:
        assert DISPATCH_DLQ_TOPIC not in dead, dead


@settings(max_examples=20, deadline=None, database=None)
@given(batch=st.lists(controls | anything(), min_size=1, max_size=10))
def test_worker_control_messages(service: Fixture, batch: list[bytes]) -> None:
    """Through the bus, into the worker's own control loop (which must keep running)."""
    runtime = service.runtime
    bus = service.svc.service.ctx.bus
    messages = [BusMessage(CONTROL_TOPIC, "*", raw, {}) for raw in batch]
    service.bg.run(bus.publish(messages))
    expected = sum(1 for raw in batch if _malformed(_control, raw))

    async def wait() -> int:
        seen = 0
        for _ in range(100):
            seen += (await service.dead_letters()).get(dlq_topic(CONTROL_TOPIC), 0)
            if seen >= expected:
                await asyncio.sleep(0.05)
                seen += (await service.dead_letters()).get(dlq_topic(CONTROL_TOPIC), 0)
                return seen
            await asyncio.sleep(0.05)
        return seen

    seen = service.bg.run(wait())
    _count(TRIED, CONTROL_TOPIC, len(batch))
    _count(DEAD, CONTROL_TOPIC, seen)
    assert seen == expected
    assert not any(t.done() for t in runtime._tasks), "a worker loop stopped"


def _control(raw: bytes) -> object:
    return ControlMessage.from_json(raw)


def test_a_good_request_still_completes(service: Fixture) -> None:
    """After all of the above (run last in this module): the consumers still work."""

    async def check() -> dict[str, Any]:
        await asyncio.sleep(1.5)  # the fuzzed workers' heartbeats expire
        response = await service.svc.submit("test.echo", {"after": "fuzz"})
        assert response.status_code == 202, response.text
        return await service.svc.wait_terminal(response.json()["requestId"], timeout=30)

    body = service.bg.run(check())
    assert body["status"] == "COMPLETED", body
    assert body["result"] == {"echo": {"after": "fuzz"}}
    assert not any(t.done() for t in service.runtime._tasks)


def _valid_share(strategy: st.SearchStrategy[bytes], parse: Any) -> int:
    valid = 0

    @settings(max_examples=200, database=None)
    @given(raw=strategy)
    def count(raw: bytes) -> None:
        nonlocal valid
        valid += not _malformed(parse, raw)

    count()
    return valid


def test_strategies_reach_valid_messages() -> None:
    """The strategies are not all noise: each also makes messages that parse."""
    assert _valid_share(results, ResultMessage.from_json) > 0
    assert _valid_share(heartbeats, HeartbeatMessage.from_json) > 0
    assert _valid_share(dispatches, DispatchMessage.from_json) > 0


def test_what_the_store_cannot_keep_is_malformed() -> None:
    """Found by the properties above: a heartbeat with a capacity past 32 bits (or a NUL
    character) passed parsing, then failed in PostgreSQL as "database unavailable", which the
    consumer waits out forever: one such message stopped the orchestrator's consumer."""
    good = {
        "workerId": str(uuid.uuid4()),
        "type": "fuzz",
        "endpoint": "http://w:1",
        "capabilities": ["fuzz.a"],
        "capacity": 4,
        "active": 0,
        "status": "HEALTHY",
        "ts": datetime.now(UTC).isoformat(),
    }
    HeartbeatMessage.from_json(orjson.dumps(good))
    for bad in ({"capacity": 2**40}, {"active": 2**31}, {"endpoint": "http://w:1\x00"}):
        with pytest.raises(MalformedMessage):
            HeartbeatMessage.from_json(orjson.dumps({**good, **bad}))
    result = {"requestId": str(uuid.uuid4()), "attempt": 1, "workerId": str(uuid.uuid4())}
    for bad in (
        {"kind": "completed", "seq": 1, "result": {"s": "a\x00b"}},
        {"kind": "failed", "seq": 1, "error": "\x00"},
        {"kind": "progress", "seq": 2**32},
    ):
        with pytest.raises(MalformedMessage):
            ResultMessage.from_json(orjson.dumps({**result, **bad}))
