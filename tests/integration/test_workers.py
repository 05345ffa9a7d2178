"""The worker SDK and the reference workers, run in the service over the in-process bus
(the same runtime runs `enginedge worker` over Kafka, see test_distributed.py)."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from enginedge.adapters.bus.inprocess import InProcessBus
from enginedge.application.ports import BusMessage
from enginedge.domain.messages import (
    HEARTBEATS_TOPIC,
    DispatchMessage,
    HeartbeatMessage,
)
from enginedge.entrypoints.processes import stop_process
from enginedge.worker import Task, WorkerApp, WorkerRuntime
from enginedge.worker.health import serving_health
from tests.integration.test_api import H, read_events
from tests.support.fake_llm import FakeLlm, fake_llm_server
from tests.support.harness import fast_settings, run_service, wait_worker
from tests.support.servers import free_port
from tests.support.workers import Probe, worker_for_tests

README = Path(__file__).parents[2] / "README.md"
CHAT = {"messages": [{"role": "user", "content": "Say 25 tokens"}]}


@pytest.fixture
async def fake_llm() -> AsyncIterator[FakeLlm]:
    async with fake_llm_server(FakeLlm()) as fake:
        yield fake


async def test_capacity_bounds_what_a_worker_holds(tmp_path: Path) -> None:
    probe = Probe()
    settings = fast_settings(tmp_path, builtin_workers="none")
    async with run_service(settings, [worker_for_tests(probe, capacity=2)]) as svc:
        ids = [
            (await svc.submit("test.sleep", {"seconds": 0.3})).json()["requestId"] for _ in range(6)
        ]
        for rid in ids:
            assert (await svc.wait_terminal(rid))["status"] == "COMPLETED"
        (runtime,) = svc.service.workers
        assert runtime.max_active == 2  # busy at full capacity, never beyond it


@pytest.mark.parametrize("bus", ["in-process", "kafka"])
async def test_a_stuck_handler_is_detected_and_its_request_runs_elsewhere(
    tmp_path: Path, request: pytest.FixtureRequest, bus: str
) -> None:
    """The stuck worker tells the orchestrator it gave the attempt up and is unhealthy while
    it cools down: the scheduler hands the retry to the other worker's inbox, not back to
    the stuck one."""
    brokers = {"kafka_brokers": request.getfixturevalue("broker")} if bus == "kafka" else {}
    probe = Probe()
    settings = fast_settings(tmp_path, builtin_workers="none", **brokers)
    # The cool-down lasts a stall timeout: long enough, over Kafka too, for the retry to be
    # handed to the other worker before the stuck one is healthy (and schedulable) again.
    stall = 1.5 if bus == "in-process" else 3.0
    apps = [worker_for_tests(probe, capacity=1, stall_timeout=stall) for _ in range(2)]
    async with run_service(settings, apps) as svc:
        for runtime in svc.service.workers:
            await wait_worker(svc.url, svc.client, runtime.id)
        rid = (await svc.submit("test.hang_first", {})).json()["requestId"]
        first = await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING", timeout=30)
        final = await svc.wait_terminal(rid, timeout=40)
        assert final["status"] == "COMPLETED"
        assert final["attempts"] == 2
        assert final["result"] == {"attempt": 2}
        assert final["workerId"] != first["workerId"]
        assert rid in probe.cancelled  # the stuck handler was abandoned
        assert probe.completed == [rid]  # the retry ran once
        # Taken back at the worker's word, not found later as lost or unheld.
        assert svc.redispatches() == {"abandoned": 1}


async def test_a_stalled_worker_gives_back_what_reaches_it_while_it_cools_down() -> None:
    """A stalled worker gives up the stalled attempt and is unhealthy for a cool-down of a
    stall timeout, naming the attempt in its heartbeats meanwhile. A dispatch that reaches
    its inbox during the cool-down (sent before the orchestrator heard it is unhealthy) is
    given back the same way, not run; once cooled down, it runs what it gets again."""
    bus = InProcessBus()
    beats = await bus.subscribe([HEARTBEATS_TOPIC], "test-heartbeats")
    probe = Probe()
    app = worker_for_tests(probe, capacity=1, stall_timeout=0.5)
    runtime = WorkerRuntime(app, bus, heartbeat_interval=0.1, poll_timeout=0.05)
    await runtime.start()
    deadline = datetime.now(UTC) + timedelta(minutes=1)

    async def dispatch(task_type: str) -> uuid.UUID:
        rid = uuid.uuid4()
        message = DispatchMessage(rid, 1, task_type, {}, {}, deadline)
        await bus.publish([BusMessage(runtime.inbox, str(rid), message.to_json(), {})])
        return rid

    try:
        stuck = await dispatch("test.hang_first")
        async with asyncio.timeout(10):
            while runtime.status != "UNHEALTHY":
                await asyncio.sleep(0.02)
        stalled = time.monotonic()
        # The cancellation reaches the handler a few loop turns after the status turns.
        async with asyncio.timeout(2):
            while not probe.cancelled:
                await asyncio.sleep(0.01)
        assert probe.cancelled == [str(stuck)]
        late = await dispatch("test.echo")
        async with asyncio.timeout(2):
            while str(late) not in runtime.condition.abandoned():
                await asyncio.sleep(0.01)
        assert runtime.status == "UNHEALTHY"  # given back during the cool-down
        async with asyncio.timeout(10):
            while runtime.status == "UNHEALTHY":
                await asyncio.sleep(0.02)
        assert time.monotonic() - stalled >= app.stall_timeout - 0.05
        assert probe.started == [str(stuck)]  # the late dispatch never ran
        told = [HeartbeatMessage.from_json(m.value) for m in await beats.next_batch(10_000, 0.1)]
        unhealthy = [b for b in told if b.status == "UNHEALTHY"]
        assert unhealthy and all(b.abandoned.get(str(stuck)) == 1 for b in unhealthy), told
        assert all("made no progress" in (b.reason or "") for b in unhealthy), unhealthy
        assert any(b.abandoned == {str(stuck): 1, str(late): 1} for b in unhealthy), unhealthy
        assert all(b.inbox == runtime.inbox for b in told)
        # Healthy again: the next dispatch runs, and nothing is named as given up any more.
        again = await dispatch("test.echo")
        async with asyncio.timeout(5):
            while str(again) not in probe.completed:
                await asyncio.sleep(0.01)
        assert runtime.condition.abandoned() == {}
    finally:
        await runtime.stop(drain=False)


async def test_a_stalled_worker_keeps_running_what_still_makes_progress(tmp_path: Path) -> None:
    """It gives up the stalled attempt, not the others: while its heartbeats come and list
    them, it is not a lost worker, and a request streaming along is not run a second time."""
    probe = Probe()
    settings = fast_settings(tmp_path, builtin_workers="none")
    stalling = worker_for_tests(probe, capacity=2, stall_timeout=1.5)
    async with run_service(settings, [stalling]) as svc:
        (first,) = svc.service.workers
        stuck = (await svc.submit("test.hang_first", {})).json()["requestId"]
        busy = (await svc.submit("test.stream", {"chunks": 300})).json()["requestId"]
        for rid in (stuck, busy):
            await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING")
        # Only now a second worker, so that both requests started on the first one.
        second = WorkerRuntime(
            worker_for_tests(probe, capacity=2), svc.service.ctx.bus, heartbeat_interval=0.2
        )
        await second.start()
        try:
            streamed = await svc.wait_terminal(busy, timeout=30)
            retried = await svc.wait_terminal(stuck, timeout=30)
        finally:
            await second.stop()
        assert outcome(streamed) == ("COMPLETED", 1, first.id)
        assert outcome(retried) == ("COMPLETED", 2, second.id)
        assert svc.redispatches() == {"abandoned": 1}


async def test_a_stopping_worker_gives_back_what_its_drain_did_not_finish(
    tmp_path: Path,
) -> None:
    probe = Probe()
    settings = fast_settings(tmp_path, builtin_workers="none")
    async with run_service(settings) as svc:
        bus = svc.service.ctx.bus
        leaving = WorkerRuntime(
            worker_for_tests(probe), bus, heartbeat_interval=0.2, drain_timeout=0.3
        )
        await leaving.start()
        await wait_worker(svc.url, svc.client, leaving.id)
        rid = (await svc.submit("test.hang_first", {})).json()["requestId"]
        await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING")
        staying = WorkerRuntime(worker_for_tests(probe), bus, heartbeat_interval=0.2)
        await staying.start()
        try:
            await leaving.stop()
            final = await svc.wait_terminal(rid)
        finally:
            await staying.stop()
        assert outcome(final) == ("COMPLETED", 2, staying.id)
        # Given back by its last heartbeat, not found lost a heartbeat TTL later.
        assert svc.redispatches() == {"abandoned": 1}


async def test_only_the_worker_running_an_attempt_can_give_it_up(tmp_path: Path) -> None:
    """A heartbeat's ``abandoned`` list moves nothing that its sender is not running: not
    another worker's request, not another attempt."""
    settings = fast_settings(tmp_path, builtin_workers="none")
    async with run_service(settings, [worker_for_tests(Probe())]) as svc:
        (runtime,) = svc.service.workers
        rid = (await svc.submit("test.sleep", {"seconds": 1.5})).json()["requestId"]
        await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING")
        stranger = str(uuid.uuid4())
        for sender, attempt in ((stranger, 1), (runtime.id, 2)):
            beat = HeartbeatMessage(
                sender,
                "testing",
                "",
                ["test.sleep"],
                1,
                1,
                "UNHEALTHY",
                datetime.now(UTC),
                abandoned={rid: attempt},
            )
            await svc.service.ctx.bus.publish(
                [BusMessage(HEARTBEATS_TOPIC, sender, beat.to_json())]
            )
        final = await svc.wait_terminal(rid)
        assert outcome(final) == ("COMPLETED", 1, runtime.id)
        assert svc.redispatches() == {}


async def test_plain_function_handlers_run_up_to_capacity_at_once(tmp_path: Path) -> None:
    """More at once than the event loop's default executor has threads (at most 32)."""
    capacity = 40
    meeting = threading.Barrier(capacity, timeout=20)
    app = WorkerApp("testing", capacity=capacity)

    @app.task("test.meet")
    def meet(task: Task) -> dict[str, Any]:
        return {"arrived": meeting.wait()}  # returns only when all of them are running

    settings = fast_settings(tmp_path, builtin_workers="none")
    async with run_service(settings, [app]) as svc:
        ids = [(await svc.submit("test.meet", {})).json()["requestId"] for _ in range(capacity)]
        finals = [await svc.wait_terminal(rid, timeout=40) for rid in ids]
        assert {f["status"] for f in finals} == {"COMPLETED"}, finals[0]
        assert sorted(f["result"]["arrived"] for f in finals) == list(range(capacity))


STUCK_WORKER = """
import asyncio, time, uuid
from datetime import UTC, datetime, timedelta
from enginedge.adapters.bus.inprocess import InProcessBus
from enginedge.application.ports import BusMessage
from enginedge.domain.messages import DispatchMessage
from enginedge.worker import Task, WorkerApp, WorkerRuntime

app = WorkerApp("stuck", capacity=1)

@app.task("stuck.sleep")
def stuck(task):
    time.sleep(120)  # deaf to cancellation, as a hung library call is
    return {}

async def main():
    bus = InProcessBus()
    runtime = WorkerRuntime(app, bus, drain_timeout=0.2)
    await runtime.start()
    deadline = datetime.now(UTC) + timedelta(minutes=5)
    dispatch = DispatchMessage(uuid.uuid4(), 1, "stuck.sleep", {}, {}, deadline)
    inbox = runtime.inbox
    await bus.publish([BusMessage(inbox, str(dispatch.request_id), dispatch.to_json())])
    while runtime.active == 0:
        await asyncio.sleep(0.01)
    await runtime.stop(drain=True)
    print("stopped", flush=True)

asyncio.run(main())
"""


def test_a_handler_stuck_in_a_thread_does_not_keep_the_worker_process_alive() -> None:
    """The drain gives up on it, and then the process exits (before: it waited for the
    thread, two minutes here, forever for a call that never returns)."""
    process = subprocess.Popen(
        [sys.executable, "-c", STUCK_WORKER], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err.decode()
        assert out.decode().strip() == "stopped"
    finally:
        stop_process(process, signal.SIGKILL)


def outcome(final: dict[str, Any]) -> tuple[str, int, str]:
    """How a request ended: status, attempts, and the worker of the last one."""
    return final["status"], final["attempts"], final["workerId"]


async def test_a_worker_whose_health_check_fails_gets_no_work(tmp_path: Path) -> None:
    settings = fast_settings(
        tmp_path, builtin_workers="none", health_check_interval=0.2, worker_health_check_timeout=0.5
    )
    async with run_service(settings) as svc:
        port = free_port()
        runtime = WorkerRuntime(
            worker_for_tests(Probe()),
            svc.service.ctx.bus,
            endpoint=f"http://127.0.0.1:{port}",
            heartbeat_interval=0.2,
        )
        await runtime.start()
        try:
            # Nothing answers on its endpoint: excluded although its heartbeats arrive.
            await wait_worker(svc.url, svc.client, runtime.id, "UNHEALTHY", timeout=5)
            refused = await svc.submit("test.echo", {})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "NO_ELIGIBLE_WORKERS"
            worker = (await svc.client.get(f"/api/workers/{runtime.id}", headers=H)).json()
            assert "health check failed" in worker["statusReason"]
            assert worker["lastHealthCheck"] is not None
            async with serving_health(runtime, "127.0.0.1", port):
                await wait_worker(svc.url, svc.client, runtime.id, timeout=5)
                accepted = await svc.submit("test.echo", {})
                assert accepted.status_code == 202
                done = await svc.wait_terminal(accepted.json()["requestId"])
                assert done["workerId"] == runtime.id
        finally:
            await runtime.stop()


async def test_draining_a_worker_finishes_its_work(tmp_path: Path) -> None:
    probe = Probe()
    settings = fast_settings(tmp_path, builtin_workers="none")
    async with run_service(settings, [worker_for_tests(probe, capacity=2)]) as svc:
        rid = (await svc.submit("test.sleep", {"seconds": 0.5})).json()["requestId"]
        await svc.wait_for(rid, lambda b: b["status"] == "PROCESSING")
        (runtime,) = svc.service.workers
        await runtime.stop(drain=True)  # what SIGTERM does in `enginedge worker`
        final = await svc.wait_terminal(rid)
        assert final["status"] == "COMPLETED"
        assert final["attempts"] == 1


async def test_llm_worker_streams_tokens_in_order_to_sse(tmp_path: Path, fake_llm: FakeLlm) -> None:
    settings = fast_settings(
        tmp_path,
        builtin_workers="llm",
        llm_base_url=fake_llm.url,
        llm_api_key="sk-test-key",
        llm_model="tiny-model",
    )
    async with run_service(settings) as svc:
        rid = (await svc.submit("llm.chat", {**CHAT, "max_tokens": 50})).json()["requestId"]
        events = await asyncio.wait_for(read_events(svc, rid), 20)
        tokens = [d["chunk"]["text"] for _, kind, d in events if kind == "progress"]
        assert tokens == fake_llm.tokens
        assert len(tokens) >= 20
        final = events[-1][2]
        assert final["status"] == "COMPLETED"
        assert final["result"]["content"] == "".join(fake_llm.tokens)
        assert final["result"]["model"] == "tiny-model"
        assert final["result"]["usage"]["completion_tokens"] == 25
        assert fake_llm.requests[0]["max_tokens"] == 50
        assert fake_llm.requests[0]["stream"] is True
        assert fake_llm.authorizations[0] == "Bearer sk-test-key"


async def test_llm_rate_limits_are_retried_and_errors_are_clear(
    tmp_path: Path, fake_llm: FakeLlm
) -> None:
    fake_llm.failures = [
        (429, {"error": {"message": "slow down"}}),
        (503, {"error": {"message": "overloaded"}}),
    ]
    settings = fast_settings(
        tmp_path, builtin_workers="llm", llm_base_url=fake_llm.url, llm_model="tiny-model"
    )
    async with run_service(settings) as svc:
        rid = (await svc.submit("llm.chat", CHAT)).json()["requestId"]
        final = await svc.wait_terminal(rid)
        assert final["status"] == "COMPLETED"
        assert len(fake_llm.requests) == 3
        fake_llm.failures = [(400, {"error": {"message": "model 'nope' does not exist"}})]
        bad = (await svc.submit("llm.chat", {**CHAT, "model": "nope"})).json()["requestId"]
        failed = await svc.wait_terminal(bad)
        assert failed["status"] == "FAILED"
        assert failed["error"] == "upstream answered 400: model 'nope' does not exist"


async def test_the_example_worker_in_the_readme_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = text[text.index("## Write your own worker") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    namespace: dict[str, Any] = {}
    exec(compile(code.group(1), "README.md", "exec"), namespace)
    app = namespace["app"]
    assert isinstance(app, WorkerApp)
    settings = fast_settings(tmp_path, builtin_workers="none")
    async with run_service(settings, [app]) as svc:
        rid = (await svc.submit("text.upper", {"text": "hello fleet"})).json()["requestId"]
        events = await asyncio.wait_for(read_events(svc, rid), 10)
        assert [d["chunk"] for _, kind, d in events if kind == "progress"] == [{"text": "working"}]
        assert events[-1][2]["result"] == {"text": "HELLO FLEET"}
