"""Batched acks on the real broker: nothing unfinished is ever acked, nothing is lost when the
channel closes with acks still pending."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from consumer.acking import Acker
from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.helpers import event, wait_until
from tests.test_worker import close_consumer_connections, depth_becomes


async def _deliveries(
    amqp: AbstractConnection, queue_name: str, count: int
) -> tuple[AbstractChannel, list[AbstractIncomingMessage]]:
    """Publish `count` messages to a fresh queue and take delivery of all of them at once."""
    channel = await amqp.channel()
    await channel.set_qos(prefetch_count=count)
    queue = await channel.declare_queue(queue_name, auto_delete=False)
    for number in range(count):
        await channel.default_exchange.publish(
            aio_pika.Message(str(number).encode()), routing_key=queue_name
        )
    received: list[AbstractIncomingMessage] = []

    async def collect(message: AbstractIncomingMessage) -> None:
        received.append(message)

    await queue.consume(collect)
    await wait_until(lambda: len(received) == count)
    return channel, sorted(received, key=lambda m: m.delivery_tag or 0)


async def _left_in_queue(channel: AbstractChannel, queue_name: str) -> list[str]:
    queue = await channel.get_queue(queue_name, ensure=False)
    bodies = []
    while (message := await queue.get(fail=False, no_ack=True)) is not None:
        bodies.append(message.body.decode())
    return sorted(bodies, key=int)


async def test_an_unfinished_delivery_is_never_covered_by_a_multiple_ack(
    amqp: AbstractConnection, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """Deliveries 0-3 and 5-9 finish, 4 does not; the channel then closes. 0-3 were acked with
    one multiple ack; 4 comes back, and so do 5-9, whose acks a gap held back (redelivered, at
    worst a duplicate); none of them was acked unfinished."""
    queue_name = names["queue"]
    consumer, messages = await _deliveries(amqp, queue_name, 10)
    acker = Acker(max_held=100, max_hold=60)
    for message in messages:
        acker.received(message)
    finished = [m for m in messages if m.body != b"4"]
    acks = [asyncio.create_task(acker.ack(m)) for m in finished]
    done, pending = await asyncio.wait(acks, timeout=2)
    assert len(done) == 4  # 0-3: one run; 5-9 wait behind 4
    await consumer.close()
    for task in pending:
        task.cancel()
    assert await _left_in_queue(channel, queue_name) == [str(n) for n in range(4, 10)]
    await channel.queue_delete(queue_name)


async def test_completed_deliveries_above_a_gap_are_acked_alone_after_max_hold(
    amqp: AbstractConnection, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """When the gap below them stays open longer than max_hold, 5-9 are acked one by one
    (their waiters return); 4, never finished, is the only one the broker gives back."""
    queue_name = names["queue"]
    consumer, messages = await _deliveries(amqp, queue_name, 10)
    acker = Acker(max_held=100, max_hold=0.05)
    for message in messages:
        acker.received(message)
    await asyncio.wait_for(
        asyncio.gather(*(acker.ack(m) for m in messages if m.body != b"4")), timeout=10
    )
    await consumer.close()
    assert await _left_in_queue(channel, queue_name) == ["4"]
    await channel.queue_delete(queue_name)


async def test_a_lost_connection_with_acks_pending_loses_nothing(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """300 events, some answered slowly so that acks above them are held, and the broker
    closes the worker's connection in the middle: every event still reaches Vercel and the
    work queue ends empty (held acks were lost with the channel; the broker redelivered)."""
    await start_relay(concurrency=64)
    sim.add_fault(Fault(latency=1.0, times=10))
    resource_ids = {f"res_{n}" for n in range(300)}
    for n, resource_id in enumerate(sorted(resource_ids)):
        await publisher.publish(event(resource_id=resource_id))
        if n == 150:
            assert await asyncio.to_thread(close_consumer_connections) >= 1
    await wait_until(
        lambda: {a.event["resourceId"] for a in sim.accepted} >= resource_ids, timeout=60
    )
    await depth_becomes(channel, names["queue"], 0)


async def test_acks_fail_cleanly_once_the_channel_is_gone(
    amqp: AbstractConnection, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """An ack asked for after its channel closed raises BrokerError (the handler logs it and
    leaves the message to be redelivered) instead of hanging or crashing the flush."""
    queue_name = names["queue"]
    consumer, messages = await _deliveries(amqp, queue_name, 2)
    acker = Acker(max_held=100)
    for message in messages:
        acker.received(message)
    await consumer.close()
    results = await asyncio.wait_for(
        asyncio.gather(*(acker.ack(m) for m in messages), return_exceptions=True), timeout=5
    )
    assert [type(r).__name__ for r in results] == ["BrokerError", "BrokerError"]
    assert len(await _left_in_queue(channel, queue_name)) == 2
    await channel.queue_delete(queue_name)


async def test_a_run_spans_a_rejected_delivery_without_acking_it(
    amqp: AbstractConnection, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """0 and 2 finish, 1 is rejected back to the queue (a republish that was not confirmed):
    one multiple ack up to 2 settles 0 and 2, the broker takes it (no channel error for the
    tag it spans), and 1 is the only message left, requeued."""
    queue_name = names["queue"]
    consumer, messages = await _deliveries(amqp, queue_name, 3)
    acker = Acker(max_held=100, max_hold=60)
    for message in messages:
        acker.received(message)
    await messages[1].reject(requeue=True)
    acker.released(messages[1])
    waiting = asyncio.create_task(acker.ack(messages[2]))
    await asyncio.sleep(0.2)
    assert not waiting.done()  # 0 has not finished: 2 waits behind it
    await asyncio.wait_for(asyncio.gather(acker.ack(messages[0]), waiting), timeout=5)
    assert not consumer.is_closed
    await consumer.close()
    assert await _left_in_queue(channel, queue_name) == ["1"]
    await channel.queue_delete(queue_name)
