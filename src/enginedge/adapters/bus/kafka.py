"""The Kafka message bus (SPEC §6), on aiokafka.

Producers and consumers connect lazily and reconnect by themselves, so that a service whose
broker is down starts, reports not-ready, and catches up when the broker returns. Offsets are
committed only when the caller says its batch is processed (at-least-once).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from enginedge.application.ports import BusMessage

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    brokers: str
    username: str | None = None
    password: str | None = None
    partitions: int = 3
    client_id: str = "enginedge"
    # Milliseconds a fetch may wait for data; short keeps dispatch latency low.
    fetch_max_wait_ms: int = 10
    linger_ms: int = 1

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


class KafkaSubscription:
    """One consumer in a consumer group; started on first use, restarted after a failure."""

    def __init__(self, settings: KafkaSettings, topics: Sequence[str], group: str) -> None:
        self._settings = settings
        self._topics = list(topics)
        self._group = group
        self._consumer: AIOKafkaConsumer | None = None
        self._paused = False

    async def _ensure(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            consumer = AIOKafkaConsumer(
                *self._topics,
                group_id=self._group,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=self._settings.fetch_max_wait_ms,
                metadata_max_age_ms=5000,
                # Workers pause their partitions while full but keep polling, so a long task
                # never looks like a dead consumer.
                max_poll_interval_ms=300_000,
                **self._settings.common(),
            )
            await consumer.start()
            self._consumer = consumer
        return self._consumer

    async def next_batch(self, max_messages: int, timeout: float) -> list[BusMessage]:
        consumer = await self._ensure()
        if max_messages <= 0:
            await self._pause(consumer)
            await consumer.getmany(timeout_ms=int(timeout * 1000))
            return []
        if self._paused:
            consumer.resume(*consumer.assignment())
            self._paused = False
        records = await consumer.getmany(timeout_ms=int(timeout * 1000), max_records=max_messages)
        batch = []
        for messages in records.values():
            for m in messages:
                batch.append(
                    BusMessage(
                        topic=m.topic,
                        key=m.key.decode(errors="replace") if m.key else "",
                        value=m.value or b"",
                        headers={k: v.decode(errors="replace") for k, v in (m.headers or ())},
                    )
                )
        return batch

    async def _pause(self, consumer: AIOKafkaConsumer) -> None:
        assigned: set[TopicPartition] = consumer.assignment()
        if assigned:
            consumer.pause(*assigned)
            self._paused = True

    async def commit(self) -> None:
        if self._consumer is not None:
            await self._consumer.commit()

    async def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(Exception):
                await self._consumer.stop()
            self._consumer = None


class KafkaBus:
    """A :class:`~enginedge.application.ports.MessageBus` on Kafka."""

    durable = True

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()
        self._subscriptions: list[KafkaSubscription] = []
        self._known_topics: set[str] = set()

    async def _ensure_producer(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    acks="all",
                    linger_ms=self.settings.linger_ms,
                    request_timeout_ms=10_000,
                    **self.settings.common(),
                )
                try:
                    await producer.start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise
                self._producer = producer
            return self._producer

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
        producer = await self._ensure_producer()
        try:
            futures = [
                await producer.send(m.topic, value=m.value, key=m.key.encode(), headers=_headers(m))
                for m in messages
            ]
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise ConnectionError(f"Kafka did not take the messages: {exc}") from exc

    async def subscribe(self, topics: Sequence[str], group: str) -> KafkaSubscription:
        subscription = KafkaSubscription(self.settings, topics, group)
        self._subscriptions.append(subscription)
        return subscription

    async def ping(self) -> None:
        producer = await self._ensure_producer()
        metadata = await producer.client.fetch_all_metadata()
        if not metadata.brokers():
            raise ConnectionError("no Kafka broker answers")

    async def close(self) -> None:
        for subscription in self._subscriptions:
            await subscription.close()
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await self._producer.stop()
            self._producer = None
