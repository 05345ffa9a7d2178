"""The Kafka adapter against the test broker (tansu)."""

from __future__ import annotations

import uuid

from enginedge.adapters.bus.kafka import KafkaBus, KafkaSettings


async def test_a_closed_kafka_subscription_is_forgotten_by_its_bus(broker: str) -> None:
    """Subscriptions come and go (a member of a group, a reader of its own such as an
    embedded worker's inbox, each time one starts): the bus keeps the open ones only (for its
    own close), not every one it ever made."""
    bus = KafkaBus(KafkaSettings(brokers=broker, partitions=1))
    topic, group = f"bus-test-{uuid.uuid4().hex[:8]}", "bus-test"
    try:
        await bus.prepare([topic])
        staying = await bus.subscribe([topic], f"{group}-staying")
        for _ in range(3):
            for own in (group, None):
                leaving = await bus.subscribe([topic], own)
                await leaving.next_batch(1, 0.1)  # a consumer in the group, or on its own
                await leaving.close()
        assert list(bus._subscriptions) == [staying]
        # Used again after its close (nothing does so today), it is the bus's to close again.
        await leaving.next_batch(1, 0.1)
        assert set(bus._subscriptions) == {staying, leaving}
    finally:
        await bus.close()
    assert not bus._subscriptions
