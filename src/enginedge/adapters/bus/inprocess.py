"""The embedded message bus: topics and consumer groups inside one process.

Same semantics as the Kafka adapter where the use cases can tell: each consumer group gets
every message of its topics, the members of a group share them, and messages published
before any group subscribed wait for the first one (as Kafka keeps them). Nothing outlives
the process, which the orchestrator knows through ``durable = False``.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from enginedge.application.ports import BusMessage

UNCLAIMED_LIMIT = 10_000


@dataclass(slots=True)
class _Group:
    topics: set[str]
    queue: asyncio.Queue[BusMessage] = field(default_factory=asyncio.Queue)


class InProcessSubscription:
    def __init__(self, group: _Group) -> None:
        self._group = group

    async def next_batch(self, max_messages: int, timeout: float) -> list[BusMessage]:
        if max_messages <= 0:
            return []
        queue = self._group.queue
        if queue.empty():
            try:
                async with asyncio.timeout(timeout):
                    first = await queue.get()
            except TimeoutError:
                return []
            batch = [first]
        else:
            batch = []
        while len(batch) < max_messages and not queue.empty():
            batch.append(queue.get_nowait())
        return batch

    async def commit(self) -> None:
        """Nothing to do: a message is gone from the queue once returned."""

    async def close(self) -> None:
        """Nothing to release: the group's queue stays for its other members."""


class InProcessBus:
    """A :class:`~enginedge.application.ports.MessageBus` in memory."""

    durable = False

    def __init__(self) -> None:
        self._groups: dict[str, _Group] = {}
        self._unclaimed: dict[str, deque[BusMessage]] = {}
        self._readers = itertools.count()

    async def publish(self, messages: Sequence[BusMessage]) -> None:
        for message in messages:
            delivered = False
            for group in self._groups.values():
                if message.topic in group.topics:
                    group.queue.put_nowait(message)
                    delivered = True
            if not delivered:
                self._unclaimed.setdefault(message.topic, deque(maxlen=UNCLAIMED_LIMIT)).append(
                    message
                )

    async def subscribe(
        self, topics: Sequence[str], group: str | None, *, urgent: bool = True
    ) -> InProcessSubscription:
        if group is None:  # a reader of its own: a group no one else joins
            group = f"\0reader-{next(self._readers)}"
        state = self._groups.setdefault(group, _Group(set()))
        new_topics = set(topics) - state.topics
        state.topics |= new_topics
        for topic in new_topics:
            for message in self._unclaimed.pop(topic, ()):
                state.queue.put_nowait(message)
        return InProcessSubscription(state)

    async def prepare(self, topics: Sequence[str]) -> None:
        """Nothing to create: topics exist as soon as they are used."""

    async def ping(self) -> None:
        """Always reachable: it lives in this process."""

    async def close(self) -> None:
        self._groups.clear()
