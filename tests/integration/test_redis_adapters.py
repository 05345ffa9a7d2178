"""The Redis adapters against a real Redis: rate-limit blocks and the feed of finished
requests that wakes long-polling callers on every replica."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime

import pytest
import redis.asyncio as aioredis

from enginedge.adapters.cache import redis as r
from enginedge.domain.model import RequestEvent
from tests.support.servers import redis_server


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis of its own, never TEST_REDIS_URL's: these tests flush it."""
    with redis_server() as server:
        yield f"redis://127.0.0.1:{server.port}/0"


@pytest.fixture
async def clients(redis_url: str) -> AsyncIterator[list[aioredis.Redis]]:
    opened = [r.connect(redis_url), r.connect(redis_url), r.connect(redis_url, blocking=True)]
    await opened[0].flushdb()
    await opened[0].config_resetstat()
    yield opened
    for client in opened:
        await client.aclose()


async def incrby_calls(client: aioredis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_incrby", {}).get("calls", 0))


async def test_two_replicas_never_allow_more_than_the_limit_and_take_calls_in_blocks(
    clients: list[aioredis.Redis],
) -> None:
    a, b = r.RedisRateLimiter(clients[0]), r.RedisRateLimiter(clients[1])
    now = datetime(2026, 11, 27, 12, 0, 30, tzinfo=UTC)
    allowed = refused = 0
    for i in range(1100):
        retry_after = await (a if i % 2 else b).hit("caller", 1000, 60, now)
        if retry_after is None:
            allowed += 1
        else:
            refused += 1
            assert retry_after == 30  # the window ends at 12:01:00
    assert allowed == 1000
    assert refused == 100
    # Blocks of 10 (1% of the limit): about a tenth of the calls reached Redis.
    assert await incrby_calls(clients[0]) <= 1000 // 10 + refused + 2


async def test_small_limits_are_counted_call_by_call_across_replicas(
    clients: list[aioredis.Redis],
) -> None:
    a, b = r.RedisRateLimiter(clients[0]), r.RedisRateLimiter(clients[1])
    now = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
    results = [await (a if i % 2 else b).hit("k", 5, 60, now) for i in range(7)]
    assert results[:5] == [None] * 5
    assert results[5:] == [60, 60]
    # A new window starts afresh.
    assert await a.hit("k", 5, 60, datetime(2026, 11, 27, 12, 1, 0, tzinfo=UTC)) is None


async def test_concurrent_callers_share_one_refill(clients: list[aioredis.Redis]) -> None:
    limiter = r.RedisRateLimiter(clients[0])
    now = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
    outcomes = await asyncio.gather(*(limiter.hit("k", 6400, 60, now) for _ in range(64)))
    assert outcomes == [None] * 64
    assert await incrby_calls(clients[0]) == 1  # one block of 64 served all 64


def status(request_id: uuid.UUID, value: str) -> RequestEvent:
    return RequestEvent(request_id=request_id, type="status", data={"status": value})


async def test_finished_requests_are_announced_to_other_replicas(
    clients: list[aioredis.Redis],
) -> None:
    writer = r.RedisEventStream(clients[0], clients[0], 60)
    reader = r.RedisEventStream(clients[1], clients[2], 60)
    feed = reader.finished_feed()
    assert await anext(feed) is None  # subscribed: anything before was unheard
    done, running = uuid.uuid4(), uuid.uuid4()
    await writer.append_all(
        [status(done, "PROCESSING"), status(running, "PENDING"), status(done, "COMPLETED")]
    )
    assert await asyncio.wait_for(anext(feed), 5) == [done]
    await writer.append(status(running, "FAILED"))
    assert await asyncio.wait_for(anext(feed), 5) == [running]
    # Only terminal events set the short retention; a pending request's stream lives a day.
    assert 0 < await clients[0].ttl(f"enginedge:events:{done}") <= 60
    await writer.append(status(uuid.uuid4(), "PENDING"))
    await feed.aclose()


async def test_a_batch_of_events_lands_in_order_with_each_streams_expiry(
    clients: list[aioredis.Redis],
) -> None:
    events = r.RedisEventStream(clients[0], clients[2], 60)
    done, running = uuid.uuid4(), uuid.uuid4()
    await events.append_all(
        [
            status(done, "PENDING"),
            status(running, "PENDING"),
            RequestEvent(request_id=done, type="progress", data={"percent": 50}),
            status(done, "COMPLETED"),
            status(running, "DISPATCHED"),
        ]
    )
    told = await events.history(done, None)
    assert [(e.type, e.data) for e in told] == [
        ("status", {"status": "PENDING"}),
        ("progress", {"percent": 50}),
        ("status", {"status": "COMPLETED"}),
    ]
    # Entry ids are the SSE ids: a client resumes after any of them.
    assert [e.data for e in await events.history(done, told[0].id)] == [
        {"percent": 50},
        {"status": "COMPLETED"},
    ]
    # The finished request's stream goes after the retention, the running one's in a day.
    assert 0 < await clients[0].ttl(f"enginedge:events:{done}") <= 60
    assert 3600 < await clients[0].ttl(f"enginedge:events:{running}") <= 86_400
    # One event alone is told with its id.
    appended = await events.append(status(running, "COMPLETED"))
    assert [e.id for e in await events.history(running, None)][-1] == appended.id


async def test_events_are_still_appended_after_redis_forgot_its_scripts(
    clients: list[aioredis.Redis],
) -> None:
    # A restarted Redis has no scripts loaded: the append loads its script again.
    events = r.RedisEventStream(clients[0], clients[2], 60)
    request_id = uuid.uuid4()
    await events.append(status(request_id, "PENDING"))
    await clients[0].script_flush()
    await events.append(status(request_id, "DISPATCHED"))
    assert [e.data["status"] for e in await events.history(request_id, None)] == [
        "PENDING",
        "DISPATCHED",
    ]
