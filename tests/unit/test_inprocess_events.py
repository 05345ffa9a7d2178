"""The embedded event streams keep a finished request's events for the retention, and no
more than a bounded number of finished requests' events: memory stays flat under load."""

from __future__ import annotations

import asyncio
import uuid

from enginedge.adapters.cache.inprocess import InProcessEventStream
from enginedge.application.ports import RequestEvent


def _status(request_id: uuid.UUID, status: str) -> RequestEvent:
    return RequestEvent(request_id=request_id, type="status", data={"status": status})


async def _run(events: InProcessEventStream, *, finish: bool) -> uuid.UUID:
    request_id = uuid.uuid4()
    await events.append(_status(request_id, "PENDING"))
    if finish:
        await events.append(_status(request_id, "COMPLETED"))
    return request_id


async def test_only_the_latest_finished_requests_keep_their_events() -> None:
    events = InProcessEventStream(retention_seconds=3600, max_finished=3)
    running = await _run(events, finish=False)
    finished = [await _run(events, finish=True) for _ in range(5)]
    kept = [len(await events.history(r, None)) for r in finished]
    assert kept == [0, 0, 2, 2, 2]
    # A request still running is not counted, however many finish after it.
    assert len(await events.history(running, None)) == 1


async def test_a_finished_requests_events_go_after_the_retention() -> None:
    events = InProcessEventStream(retention_seconds=0.05)
    finished = await _run(events, finish=True)
    running = await _run(events, finish=False)
    assert len(await events.history(finished, None)) == 2
    await asyncio.sleep(0.1)
    assert await events.history(finished, None) == []
    assert len(await events.history(running, None)) == 1
