"""The Kafka message bus (SPEC §6), on aiokafka.

Producers and consumers connect lazily and reconnect by themselves, so that a service whose
broker is down starts, reports not-ready, and catches up when the broker returns. Offsets are
committed only when the caller says its batch is processed (at-least-once).

A consumer lives as long as its subscription: aiokafka rejoins the group and refetches the
committed offsets by itself after a broker outage. Replacing consumers after an outage was
tried and made things worse: every new member costs the whole group a rebalance, and a
group that keeps rebalancing fetches nothing. The one thing aiokafka does not mend is a
position past the end of a log that a broker lost (see ``_rewind_past_the_end``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from enginedge.application.ports import BusMessage
from enginedge.domain.errors import ServiceUnavailable

log = logging.getLogger(__name__)

WATCH_INTERVAL = 1.0
REWIND_CHECK_INTERVAL = 1.0
WATCH_TIMEOUT = 5.0
METADATA_MAX_AGE_MS = 5000


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    brokers: str
    username: str | None = None
    password: str | None = None
    partitions: int = 3
    client_id: str = "enginedge"
    # Milliseconds a fetch may wait for data; short keeps dispatch latency low.
    fetch_max_wait_ms: int = 10
    # No linger: a lone message goes out at once. Messages still share produce requests under
    # load, because aiokafka keeps one request in flight per broker and batches what is sent
    # meanwhile, and the relay sends its whole batch before yielding.
    linger_ms: int = 0

    def common(self) -> dict[str, Any]:
        options: dict[str, Any] = {"bootstrap_servers": self.brokers, "client_id": self.client_id}
        if self.username:
            options.update(
                security_protocol="SASL_PLAINTEXT",
                sasl_mechanism="PLAIN",
                sasl_plain_username=self.username,
                sasl_plain_password=self.password or "",
            )
        return options


def _headers(message: BusMessage) -> list[tuple[str, bytes]]:
    return [(k, v.encode()) for k, v in message.headers.items()]


CLOSE_TIMEOUT_SECONDS = 5.0
# The longest a publish may take, topic creation included: the scheduler publishes while it
# holds the deployment's scheduling lock, so a broker that never answers must not hold it.
PUBLISH_TIMEOUT_SECONDS = 12.0
# Group membership timings of every consumer in a group (aiokafka's defaults): a member
# that stops heart-beating is dropped after the session timeout; the others hear of a
# rebalance in the answer to their next heartbeat; the coordinator waits at most the
# rebalance timeout for them to join again (aiokafka's default: the session timeout).
SESSION_TIMEOUT_MS = 10_000
HEARTBEAT_INTERVAL_MS = 3_000
REBALANCE_TIMEOUT_MS = SESSION_TIMEOUT_MS
# Fetch wait of subscriptions that are not urgent: each idle consumer's polls cost the
# broker and the process CPU (about a sixth of a core for four consumers on tansu at 10 ms).
RELAXED_FETCH_MAX_WAIT_MS = 250


class KafkaSubscription:
    """One consumer in a consumer group, or a reader of its own (no group: aiokafka then
    assigns it every partition of its topics, and again when their partitions change, as
    when a broker that lost a topic creates it anew with another count), started on first
    use."""

    def __init__(
        self, bus: KafkaBus, topics: Sequence[str], group: str | None, fetch_max_wait_ms: int
    ) -> None:
        self._bus = bus
        self._fetch_max_wait_ms = fetch_max_wait_ms
        self._topics = list(topics)
        self._group = group
        self._consumer: AIOKafkaConsumer | None = None
        self._paused = False
        self._last_rewind_check = 0.0

    async def _ensure(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            self._bus._subscriptions.add(self)  # again, if used after a close
            if self._group is None:
                await self._bus.prepare(self._topics)  # assigned partitions must exist
            consumer = AIOKafkaConsumer(
                *self._topics,
                group_id=self._group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self._fetch_max_wait_ms,
                metadata_max_age_ms=METADATA_MAX_AGE_MS,
                # Workers pause their partitions while full but keep polling, so a long task
                # never looks like a dead consumer.
                max_poll_interval_ms=300_000,
                session_timeout_ms=SESSION_TIMEOUT_MS,
                heartbeat_interval_ms=HEARTBEAT_INTERVAL_MS,
                rebalance_timeout_ms=REBALANCE_TIMEOUT_MS,
                **self._bus.settings.common(),
            )
            try:
                await consumer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await consumer.stop()
                raise
            self._consumer = consumer
            self._paused = False
        return self._consumer

    async def next_batch(self, max_messages: int, timeout: float) -> list[BusMessage]:
        consumer = await self._ensure()
        await self._rewind_past_the_end(consumer)
        if max_messages <= 0:
            await self._idle(consumer, timeout)
            return []
        if self._paused:
            consumer.resume(*consumer.assignment())
            self._paused = False
        records = await consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_messages)
        return [
            BusMessage(
                topic=m.topic,
                key=m.key.decode(errors="replace") if m.key else "",
                value=m.value or b"",
                headers={k: v.decode(errors="replace") for k, v in (m.headers or ())},
            )
            for messages in records.values()
            for m in messages
        ]

    async def _idle(self, consumer: AIOKafkaConsumer, timeout: float) -> None:
        """Poll without taking anything, so the member stays in its group while full."""
        assigned = consumer.assignment()
        if assigned:
            consumer.pause(*assigned)
            self._paused = True
        records = await consumer.getmany(timeout_ms=int(timeout * 1000))
        # A rebalance during the poll brings partitions that are not paused, and their
        # records come back here: put the positions back so that nothing is skipped.
        for partition, messages in records.items():
            if messages:
                consumer.seek(partition, messages[0].offset)

    async def _rewind_past_the_end(self, consumer: AIOKafkaConsumer) -> None:
        """Read again from the start a partition whose position is past its high watermark.

        That happens when a broker lost a log but kept (or was sent late) offsets committed
        against it: a member that gets such a partition would wait past the end forever.
        On a healthy log a position is never above the high watermark (Kafka answers
        "offset out of range" instead), so this costs nothing there.
        """
        now = time.monotonic()
        if now - self._last_rewind_check < REWIND_CHECK_INTERVAL:
            return
        self._last_rewind_check = now
        for partition in consumer.assignment():
            high = consumer.highwater(partition)
            if high is None:
                continue
            try:
                # Local once the partition has a position; bounded in case it has none yet.
                async with asyncio.timeout(1.0):
                    position = await consumer.position(partition)
            except (TimeoutError, KafkaError):
                continue
            if position > high:
                log.warning(
                    "consumer position past the end of the log; reading it again",
                    extra={
                        "topic": partition.topic,
                        "partition": partition.partition,
                        "position": position,
                        "highWatermark": high,
                    },
                )
                await consumer.seek_to_beginning(partition)

    async def commit(self) -> None:
        if self._consumer is None or self._group is None:
            return
        # A failure (the group rebalanced, the broker forgot it) is the caller's to log:
        # aiokafka rejoins by itself and the uncommitted messages come again.
        await self._consumer.commit()

    async def close(self) -> None:
        """Leave the group (its partitions go to the other members at once) and stop."""
        # Forgotten by its bus: a worker that stalls leaves its group and joins again with a
        # new subscription, and the bus would otherwise keep every closed one.
        self._bus._subscriptions.discard(self)
        if self._consumer is not None:
            if self._group is not None:
                _leave_even_generation_zero(self._consumer)
            # Bounded: leaving the group waits for the broker, which may be gone.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await self._consumer.stop()
            self._consumer = None


def _leave_even_generation_zero(consumer: AIOKafkaConsumer) -> None:
    """aiokafka sends LeaveGroup on stop only past generation 0, as Kafka numbers a group's
    generations from 1; tansu numbers them from 0, and there a member that stopped in its
    group's first generation kept its partitions until its session timed out (10 s, then a
    rebalance). The request names the member, not the generation, so claiming 1 is enough."""
    coordinator = getattr(consumer, "_coordinator", None)
    if coordinator is not None and getattr(coordinator, "generation", None) == 0:
        coordinator.generation = 1


class KafkaBus:
    """A :class:`~enginedge.application.ports.MessageBus` on Kafka."""

    durable = True

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._failing = False
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        # The subscriptions not closed yet, for close(): each one removes itself when closed.
        self._subscriptions: set[KafkaSubscription] = set()
        self._known_topics: set[str] = set()
        self._watcher: asyncio.Task[None] | None = None

    def _failed(self) -> None:
        self._failing = True
        self._known_topics.clear()

    def _answered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("Kafka answers again")

    async def _ensure_producer(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    acks="all",
                    linger_ms=self.settings.linger_ms,
                    request_timeout_ms=10_000,
                    # A key's partition is its hash modulo the partition count the producer
                    # knows: after a topic is recreated with another count, five minutes of
                    # stale metadata (the default) would send records to partitions no
                    # consumer reads. The consumers refresh as often.
                    metadata_max_age_ms=METADATA_MAX_AGE_MS,
                    **self.settings.common(),
                )
                try:
                    await producer.start()
                except BaseException:
                    self._failed()
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise
                self._producer = producer
            if self._watcher is None:
                self._watcher = asyncio.create_task(self._watch(), name="kafka-watch")
            return self._producer

    async def _watch(self) -> None:
        """Notice outages even while nothing is published (an idle orchestrator)."""
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            try:
                async with asyncio.timeout(WATCH_TIMEOUT):
                    await self.ping()
            except Exception:
                self._failed()

    async def prepare(self, topics: Sequence[str]) -> None:
        """Create missing topics with the configured partition count (racing replicas are
        fine: "already exists" is success)."""
        missing = [t for t in topics if t not in self._known_topics]
        if not missing:
            return
        admin = AIOKafkaAdminClient(**self.settings.common())
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            new = [NewTopic(t, self.settings.partitions, 1) for t in missing if t not in existing]
            if new:
                with contextlib.suppress(TopicAlreadyExistsError):
                    await admin.create_topics(new)
        finally:
            await admin.close()
        self._known_topics.update(missing)

    async def publish(self, messages: Sequence[BusMessage]) -> None:
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT_SECONDS):
                producer = await self._ensure_producer()
                # Topics are checked once, and again after any failure: a broker that lost
                # them gets them back with their configured partitions, not auto-created ones.
                await self.prepare(sorted({m.topic for m in messages}))
                futures = [
                    await producer.send(
                        m.topic, value=m.value, key=m.key.encode(), headers=_headers(m)
                    )
                    for m in messages
                ]
                await asyncio.gather(*futures)
        except (KafkaError, OSError, TimeoutError) as exc:
            self._failed()
            reason = str(exc) or f"no answer within {PUBLISH_TIMEOUT_SECONDS:g}s"
            raise ServiceUnavailable(f"message bus unavailable: {reason}") from exc
        self._answered()

    async def subscribe(
        self, topics: Sequence[str], group: str | None, *, urgent: bool = True
    ) -> KafkaSubscription:
        wait = self.settings.fetch_max_wait_ms if urgent else RELAXED_FETCH_MAX_WAIT_MS
        subscription = KafkaSubscription(self, topics, group, wait)
        self._subscriptions.add(subscription)
        return subscription

    async def ping(self) -> None:
        producer = await self._ensure_producer()
        try:
            metadata = await producer.client.fetch_all_metadata()
        except (KafkaError, OSError) as exc:
            self._failed()
            raise ServiceUnavailable(f"message bus unavailable: {exc}") from exc
        if not metadata.brokers():
            self._failed()
            raise ServiceUnavailable("message bus unavailable: no broker answers")
        self._answered()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(BaseException):
                await self._watcher
            self._watcher = None
        # Together, each bounded: a process that stops must not wait on a broker in turn.
        await asyncio.gather(*(s.close() for s in list(self._subscriptions)))
        if self._producer is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                    await self._producer.stop()
            self._producer = None
