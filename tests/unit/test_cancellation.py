"""A loop told to stop stops, even when the cancellation arrives just as what it waits for
comes in. On Python 3.11, ``asyncio.wait_for`` returned the result then and dropped the
cancellation: the relay, a consumer or an event stream ran on, and a shutdown waited on
them forever. ``asyncio.timeout`` (which the code uses instead; ruff bans ``wait_for``)
never drops one."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

from enginedge.adapters.bus.inprocess import InProcessBus
from enginedge.adapters.cache.inprocess import InProcessEventStream
from enginedge.application.ports import BusMessage, RequestEvent
from enginedge.application.waiters import Waiters


async def _stops_when_cancelled_as_data_arrives(
    loop: Callable[[], Awaitable[None]], arrive: Callable[[], Awaitable[None]]
) -> bool:
    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)  # the loop is waiting
    await arrive()
    await asyncio.sleep(0)  # what it waited for is done; the loop has not resumed yet
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=2)
    if not done:  # leave nothing running after the test
        task.cancel()
        await asyncio.wait([task], timeout=1)
    return bool(done)


async def test_a_bus_consumer_loop_stops_when_cancelled_as_a_message_arrives() -> None:
    bus = InProcessBus()
    subscription = await bus.subscribe(["t"], "g")

    async def consume() -> None:
        while True:
            await subscription.next_batch(10, 5.0)

    async def arrive() -> None:
        await bus.publish([BusMessage(topic="t", key="k", value=b"x")])

    assert await _stops_when_cancelled_as_data_arrives(consume, arrive)


async def test_an_event_stream_stops_when_cancelled_as_an_event_arrives() -> None:
    events = InProcessEventStream()
    request_id = uuid.uuid4()

    async def follow() -> None:
        async with events.follow(request_id, None, 5.0) as stream:
            async for _ in stream:
                pass

    async def arrive() -> None:
        await events.append(RequestEvent(request_id=request_id, type="progress", data={}))

    assert await _stops_when_cancelled_as_data_arrives(follow, arrive)


async def _forever(stopped: asyncio.Event) -> AsyncIterator[int]:
    """One item, then nothing, ever; says when it is stopped."""
    try:
        yield 1
        await asyncio.Event().wait()
    finally:
        stopped.set()


async def test_a_stream_ends_when_the_service_starts_shutting_down() -> None:
    waiters, stopped = Waiters(), asyncio.Event()

    async def follow() -> list[int]:
        return [item async for item in waiters.until_closed(_forever(stopped))]

    following = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    waiters.close()
    assert await asyncio.wait_for(following, 2) == [1]
    assert stopped.is_set()


async def test_a_stream_left_by_its_client_stops_what_it_follows() -> None:
    # The client goes away while the stream waits for its next item: what it follows must
    # stop too, not go on in a task of its own.
    waiters, stopped = Waiters(), asyncio.Event()

    async def follow() -> None:
        async for _ in waiters.until_closed(_forever(stopped)):
            pass

    following = asyncio.create_task(follow())
    await asyncio.sleep(0.05)
    following.cancel()
    await asyncio.wait([following], timeout=2)
    assert following.cancelled()
    assert stopped.is_set()
