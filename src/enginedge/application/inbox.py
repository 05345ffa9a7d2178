"""The orchestrator's side of the bus: turn consumed messages into use-case calls.

A message that cannot be parsed or applied goes to its topic's dead-letter queue with the
reason and is counted; it never stops the consumer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

from enginedge.application.context import Context
from enginedge.application.fleet import (
    UnknownRequest,
    record_heartbeat,
    record_result,
    record_results,
)
from enginedge.application.ports import BusMessage
from enginedge.domain.errors import IllegalTransition
from enginedge.domain.messages import (
    HEARTBEATS_TOPIC,
    RESULTS_TOPIC,
    HeartbeatMessage,
    MalformedMessage,
    ResultMessage,
    dead_letter,
    dlq_topic,
)

ORCHESTRATOR_TOPICS = (RESULTS_TOPIC, HEARTBEATS_TOPIC)

log = logging.getLogger(__name__)


async def handle_message(ctx: Context, message: BusMessage) -> None:
    """Apply one message from ``worker.results`` or ``worker.heartbeats``."""
    try:
        if message.topic == RESULTS_TOPIC:
            await record_result(ctx, ResultMessage.from_json(message.value))
        elif message.topic == HEARTBEATS_TOPIC:
            await record_heartbeat(ctx, HeartbeatMessage.from_json(message.value))
        else:
            raise MalformedMessage(f"the orchestrator does not consume topic {message.topic}")
    except (MalformedMessage, UnknownRequest, IllegalTransition) as exc:
        await send_to_dlq(ctx, message, str(exc))


async def handle_batch(
    ctx: Context,
    messages: Sequence[BusMessage],
    around: Callable[[BusMessage], AbstractContextManager[object]] | None = None,
) -> None:
    """Apply a consumed batch: its results in one transaction (:func:`record_results`),
    heartbeats one by one; what cannot be parsed or applied goes to the DLQ.

    Safe to run again after a failure: what was recorded is then ignored as a duplicate.
    ``around`` wraps the application of each result (a tracing span).
    """
    parsed: list[ResultMessage] = []
    raw_of: dict[int, BusMessage] = {}  # by id() of the parsed message: dicts don't hash
    for message in messages:
        if message.topic != RESULTS_TOPIC:
            await handle_message(ctx, message)
            continue
        try:
            result = ResultMessage.from_json(message.value)
        except MalformedMessage as exc:
            await send_to_dlq(ctx, message, str(exc))
            continue
        parsed.append(result)
        raw_of[id(result)] = message
    if not parsed:
        return
    refused = await record_results(
        ctx, parsed, (lambda msg: around(raw_of[id(msg)])) if around else None
    )
    for msg, reason in refused:
        await send_to_dlq(ctx, raw_of[id(msg)], str(reason))


async def send_to_dlq(ctx: Context, message: BusMessage, reason: str) -> None:
    topic = dlq_topic(message.topic)
    log.warning(
        "message sent to the dead-letter queue",
        extra={"topic": message.topic, "reason": reason, "key": message.key},
    )
    await ctx.bus.publish(
        [
            BusMessage(
                topic=topic,
                key=message.key,
                value=dead_letter(message.value, reason, ctx.clock.now()),
                headers=dict(message.headers),
            )
        ]
    )
    ctx.metrics.dead_lettered(message.topic)
