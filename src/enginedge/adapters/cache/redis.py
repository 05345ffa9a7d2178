"""Redis adapters: the worker registry, request events, rate limits and the status cache,
shared by every replica (SPEC §7).

Keys (all under ``enginedge:``):
- ``worker:<id>``: a worker's last heartbeat (JSON), expiring ``registry_ttl`` after it;
  ``workers``: the set of their ids.
- ``events:<requestId>``: a stream of the request's events; its entry ids are the SSE ids.
- ``rl:<caller>:<window>``: a fixed-window counter.
- ``request:<requestId>``: a finished request (finished requests never change).
- ``finished`` (a pub/sub channel): comma-separated ids of requests as they finish, which
  wakes the callers that wait for them on any replica.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import orjson
import redis.asyncio as aioredis

from enginedge.domain.model import (
    TERMINAL_NAMES,
    Request,
    RequestEvent,
    RequestStatus,
    Worker,
    WorkerStatus,
)

PREFIX = "enginedge:"
FINISHED_CHANNEL = f"{PREFIX}finished"
MAX_EVENTS_PER_REQUEST = 100_000


def connect(url: str, *, blocking: bool = False) -> aioredis.Redis:
    """A client with short timeouts, so that a dead Redis fails fast instead of hanging.

    ``blocking`` clients serve ``XREAD BLOCK`` and wait on the socket for as long as asked.
    """
    return aioredis.Redis.from_url(
        url,
        socket_connect_timeout=2,
        socket_timeout=None if blocking else 2,
        health_check_interval=30,
        retry_on_timeout=False,
    )


def _default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    raise TypeError(type(value).__name__)


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _uuids(texts: list[str]) -> list[uuid.UUID]:
    """Those of ``texts`` that are UUIDs, parsed; anything else on the channel is skipped."""
    ids = []
    for text in texts:
        try:
            ids.append(uuid.UUID(text))
        except ValueError:
            continue
    return ids


def worker_to_json(worker: Worker) -> bytes:
    return orjson.dumps(worker, default=_default)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def worker_from_json(raw: bytes | str) -> Worker:
    d = orjson.loads(raw)
    return Worker(
        id=d["id"],
        type=d["type"],
        endpoint=d["endpoint"],
        capabilities=d["capabilities"],
        capacity=d["capacity"],
        active=d["active"],
        status=WorkerStatus(d["status"]),
        last_heartbeat=datetime.fromisoformat(d["last_heartbeat"]),
        last_health_check=_dt(d.get("last_health_check")),
        first_seen=_dt(d.get("first_seen")),
        reason=d.get("reason"),
        in_flight=d.get("in_flight") or [],
        check_error=d.get("check_error"),
        inbox=d.get("inbox"),
    )


def request_to_json(request: Request) -> bytes:
    # orjson writes dataclasses itself, without asdict's deep copy of payload and result.
    return orjson.dumps(request, default=_default)


def request_from_json(raw: bytes | str) -> Request:
    d = orjson.loads(raw)
    for name in (
        "created_at",
        "updated_at",
        "deadline",
        "dispatched_at",
        "started_at",
        "finished_at",
    ):
        d[name] = _dt(d[name])
    d["id"] = uuid.UUID(d["id"])
    d["status"] = RequestStatus(d["status"])
    return Request(**d)


class RedisRegistry:
    """A :class:`~enginedge.application.ports.WorkerRegistry` in Redis."""

    def __init__(self, client: aioredis.Redis, ttl: timedelta) -> None:
        self._r = client
        self._ttl = max(int(ttl.total_seconds()), 1)

    async def upsert(self, worker: Worker) -> None:
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.set(f"{PREFIX}worker:{worker.id}", worker_to_json(worker), ex=self._ttl)
            pipe.sadd(f"{PREFIX}workers", worker.id)
            await pipe.execute()

    async def get(self, worker_id: str) -> Worker | None:
        raw = await self._r.get(f"{PREFIX}worker:{worker_id}")
        return worker_from_json(raw) if raw else None

    async def all(self, *, fresh: bool = False) -> list[Worker]:
        ids = sorted(_text(m) for m in await self._r.smembers(f"{PREFIX}workers"))
        if not ids:
            return []
        values = await self._r.mget([f"{PREFIX}worker:{i}" for i in ids])
        gone = [i for i, v in zip(ids, values, strict=True) if v is None]
        if gone:  # expired long after their last heartbeat: forget them
            await self._r.srem(f"{PREFIX}workers", *gone)
        return [worker_from_json(v) for v in values if v is not None]


# A batch of events in one script call: each event's XADD to its request's stream (trimmed
# to about ARGV[1] entries) and, when given, the stream's new expiry; then the announcement of
# the requests that finished (ARGV[3], comma-separated) on the channel ARGV[2]. The same
# commands as a pipeline cost redis-py three times the CPU (34 against 12 µs per event):
# it packs and parses every command, here one. Returns the entries' ids, in order.
_APPEND_EVENTS = """
local ids = {}
for i = 1, #KEYS do
  local at = 3 + (i - 1) * 3
  ids[i] = redis.call('XADD', KEYS[i], 'MAXLEN', '~', ARGV[1], '*',
                      'type', ARGV[at + 1], 'data', ARGV[at + 2])
  local ttl = tonumber(ARGV[at + 3])
  if ttl > 0 then redis.call('EXPIRE', KEYS[i], ttl) end
end
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
return ids
"""


class RedisEventStream:
    """Request events in Redis streams: any replica appends, any replica's SSE client reads."""

    def __init__(
        self, client: aioredis.Redis, blocking: aioredis.Redis, retention_seconds: float
    ) -> None:
        self._r = client
        self._blocking = blocking
        # Whole seconds, at least one: an expiry of 0 would leave the stream as it was.
        self._retention = max(1, math.ceil(retention_seconds))
        # EVALSHA, loading the script again if Redis lost it (a restart).
        self._append_events = client.register_script(_APPEND_EVENTS)

    @staticmethod
    def _key(request_id: uuid.UUID) -> str:
        return f"{PREFIX}events:{request_id}"

    @staticmethod
    def _event(request_id: uuid.UUID, entry_id: bytes, fields: dict[bytes, bytes]) -> RequestEvent:
        return RequestEvent(
            request_id=request_id,
            type=fields[b"type"].decode(),
            data=orjson.loads(fields[b"data"]),
            id=entry_id.decode(),
        )

    async def append(self, event: RequestEvent) -> RequestEvent:
        replies = await self._write([event])
        return dataclasses.replace(event, id=_text(replies[0]))

    async def append_all(self, events: Sequence[RequestEvent]) -> None:
        if events:
            await self._write(events)

    async def _write(self, events: Sequence[RequestEvent]) -> list[Any]:
        # One round trip for a batch; each stream still gets its events in order.
        finished: list[str] = []
        keys: list[str] = []
        per_event: list[Any] = []
        for event in events:
            status = event.data.get("status") if event.type == "status" else None
            # A stream lives for a day while its request runs, ``retention`` once it ended:
            # set as the request starts (or starts again) and as it ends; 0 leaves it.
            expiry = 0
            if status in TERMINAL_NAMES:
                expiry = self._retention
                finished.append(str(event.request_id))
            elif status == "PENDING":
                expiry = max(self._retention, 86_400)
            keys.append(self._key(event.request_id))
            per_event += [event.type, orjson.dumps(event.data), expiry]
        args = [MAX_EVENTS_PER_REQUEST, FINISHED_CHANNEL, ",".join(finished), *per_event]
        replies: list[Any] = await self._append_events(keys=keys, args=args)
        return replies

    async def finished_feed(self) -> AsyncIterator[Sequence[uuid.UUID] | None]:
        pubsub = self._blocking.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(FINISHED_CHANNEL)
            # Whatever was announced before the subscription took hold is unheard.
            yield None
            while True:
                # Not forever: each read also lets the client's health check ping a
                # connection that went quiet.
                message = await pubsub.get_message(timeout=1.0)
                if message is None:
                    continue
                yield _uuids(_text(message["data"]).split(","))
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def history(self, request_id: uuid.UUID, after: str | None) -> list[RequestEvent]:
        start = f"({after}" if after else "-"
        entries: Any
        try:
            entries = await self._r.xrange(self._key(request_id), min=start, max="+")
        except aioredis.ResponseError:  # not a stream id: a client's stale or foreign id
            entries = await self._r.xrange(self._key(request_id), min="-", max="+")
        return [self._event(request_id, i, f) for i, f in entries]

    @asynccontextmanager
    async def follow(
        self, request_id: uuid.UUID, after: str | None, idle_timeout: float
    ) -> AsyncIterator[AsyncIterator[RequestEvent | None]]:
        yield self._iterate(request_id, after or "0-0", idle_timeout)

    async def _iterate(
        self, request_id: uuid.UUID, last: str, idle_timeout: float
    ) -> AsyncIterator[RequestEvent | None]:
        key = self._key(request_id)
        while True:
            try:
                reply: Any = await self._blocking.xread(
                    {key: last}, count=500, block=int(idle_timeout * 1000)
                )
            except aioredis.ResponseError:
                last = "0-0"
                continue
            if not reply:
                yield None
                continue
            for _stream, entries in reply:
                for entry_id, fields in entries:
                    last = _text(entry_id)
                    yield self._event(request_id, entry_id, fields)


@dataclasses.dataclass(slots=True)
class _Lease:
    window: int
    left: int


class RedisRateLimiter:
    """Fixed windows shared by every replica.

    A replica takes calls from the shared counter in blocks of up to 1% of the limit (at
    most ``max_block``) and spends them locally, so that most calls cost no round trip. The
    limit is never exceeded: a block is counted as taken whole, so with several replicas a
    caller may be refused up to one block per replica early. Limits under 200 a window are
    counted call by call.
    """

    def __init__(self, client: aioredis.Redis, max_block: int = 64) -> None:
        self._r = client
        self._max_block = max_block
        self._leases: dict[str, _Lease] = {}
        self._refills: dict[str, asyncio.Lock] = {}

    async def hit(self, key: str, limit: int, window_seconds: int, now: datetime) -> int | None:
        window = int(now.timestamp()) // window_seconds
        if self._take(key, window):
            return None
        # One refill at a time per key: callers that arrive meanwhile spend its block.
        async with self._refills.setdefault(key, asyncio.Lock()):
            if self._take(key, window):
                return None
            block = max(1, min(self._max_block, limit // 100))
            counter = f"{PREFIX}rl:{key}:{window}"
            # Pipelined, not MULTI/EXEC: the EXPIRE always follows its INCRBY.
            async with self._r.pipeline(transaction=False) as pipe:
                pipe.incrby(counter, block)
                pipe.expire(counter, window_seconds + 1)
                count, _ = await pipe.execute()
            granted = min(block, limit - (int(count) - block))
            if granted <= 0:
                return (window + 1) * window_seconds - int(now.timestamp())
            self._leases[key] = _Lease(window, granted - 1)
            return None

    def _take(self, key: str, window: int) -> bool:
        lease = self._leases.get(key)
        if lease is None or lease.window != window or lease.left <= 0:
            return False
        lease.left -= 1
        return True


class RedisRequestCache:
    """Finished requests, which never change again, so the cache can never be stale."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int = 3600) -> None:
        self._r = client
        self._ttl = ttl_seconds

    async def get(self, request_id: uuid.UUID) -> Request | None:
        raw = await self._r.get(f"{PREFIX}request:{request_id}")
        return request_from_json(raw) if raw else None

    async def put_all(self, requests: Sequence[Request]) -> None:
        finished = [r for r in requests if r.terminal]
        if not finished:
            return
        async with self._r.pipeline(transaction=False) as pipe:
            for request in finished:
                pipe.set(f"{PREFIX}request:{request.id}", request_to_json(request), ex=self._ttl)
            await pipe.execute()


class RedisCache:
    def __init__(self, client: aioredis.Redis) -> None:
        self._r = client

    async def ping(self) -> None:
        await self._r.ping()
