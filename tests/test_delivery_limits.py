"""Delivery limits: what RabbitMQ's own count of returns does to the work queue and the DLQ.

RabbitMQ 4.0-4.2 give a quorum queue a limit of 20 returns unless told otherwise, and drop a
message over it where the queue has no dead-letter target (the DLQ). `declare` gives the DLQ a
limit no one reaches and the work queue one above CONSUMER_MAX_REDELIVERIES, whose overflow the
broker dead-letters into the DLQ; queues declared by an earlier release are reported.
"""

from __future__ import annotations

import uuid
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from consumer.topology import (
    DLQ_DELIVERY_LIMIT,
    QUORUM,
    WORK_QUEUE_DELIVERY_LIMIT,
    Topology,
    dead_lettering_to,
    declare,
)
from tests.brokers import VERSION, BrokerVersion, shared_ctl
from tests.helpers import Relay, drain_queue, wait_until

ONLY_ON_4 = pytest.mark.skipif(
    VERSION is not BrokerVersion.V4_0, reason="the default delivery limit exists on 4.x only"
)


@pytest.fixture
async def topology(amqp: AbstractConnection) -> Any:
    suffix = uuid.uuid4().hex[:10]
    made = Topology(f"test-events-{suffix}", f"test-q-{suffix}", (1000,))
    yield made
    channel = await amqp.channel()
    for queue in (made.queue, made.dead_letter_queue, made.retry_queue(1000)):
        await channel.queue_delete(queue)
    await channel.exchange_delete(made.exchange)


async def returns_until_gone(channel: AbstractChannel, queue: str, most: int) -> int:
    """Fetch the one message of `queue` and put it back (reject, requeue) until it is gone or
    `most` deliveries were made; return the number of deliveries."""
    declared = await channel.get_queue(queue, ensure=False)
    for deliveries in range(most):
        message = await declared.get(fail=False, no_ack=False)
        if message is None:
            return deliveries
        await message.reject(requeue=True)
    return most


async def publish_and_wait(channel: AbstractChannel, queue: str, body: bytes) -> None:
    await channel.default_exchange.publish(aio_pika.Message(body), routing_key=queue)
    declared = await channel.get_queue(queue, ensure=False)

    async def ready() -> bool:
        probe = await channel.declare_queue(declared.name, passive=True)
        return (probe.declaration_result.message_count or 0) >= 1

    await wait_until(ready)


async def test_a_dead_letter_survives_many_returns_in_a_new_dlq(
    channel: AbstractChannel, topology: Topology
) -> None:
    """The DLQ `declare` makes keeps a dead letter through 50 returns (past 4.0's default 20)."""
    await declare(channel, topology)
    await publish_and_wait(channel, topology.dead_letter_queue, b"kept")
    assert await returns_until_gone(channel, topology.dead_letter_queue, 50) == 50
    assert [m.body for m in await drain_queue(channel, topology.dead_letter_queue)] == [b"kept"]


async def test_a_message_over_the_work_queues_limit_ends_in_the_dlq(
    channel: AbstractChannel, topology: Topology
) -> None:
    """Past the work queue's delivery limit the broker dead-letters the message into our DLQ
    (never drops it), marked by `x-death` with reason delivery_limit."""
    await declare(channel, topology)
    await publish_and_wait(channel, topology.queue, b"poison")
    deliveries = await returns_until_gone(channel, topology.queue, WORK_QUEUE_DELIVERY_LIMIT + 5)
    assert deliveries == WORK_QUEUE_DELIVERY_LIMIT + 1
    await wait_until(lambda: _has_one(channel, topology.dead_letter_queue))
    [dead] = await drain_queue(channel, topology.dead_letter_queue)
    assert dead.body == b"poison"
    assert dead.headers["x-first-death-reason"] == "delivery_limit"


async def _has_one(channel: AbstractChannel, queue: str) -> bool:
    probe = await channel.declare_queue(queue, passive=True)
    return (probe.declaration_result.message_count or 0) >= 1


async def declare_as_an_earlier_release(channel: AbstractChannel, topology: Topology) -> None:
    """The DLQ and work queue exactly as the release before delivery limits declared them."""
    await channel.declare_queue(topology.dead_letter_queue, durable=True, arguments=QUORUM)
    await channel.declare_queue(
        topology.queue, durable=True, arguments=dead_lettering_to(topology.dead_letter_queue)
    )


async def test_queues_of_an_earlier_release_are_kept_and_reported(
    amqp: AbstractConnection, topology: Topology
) -> None:
    """`declare` accepts a DLQ and work queue declared without a delivery limit (the broker
    cannot change their arguments), keeps what they hold, and names them."""
    channel = await amqp.channel()
    await declare_as_an_earlier_release(channel, topology)
    await publish_and_wait(channel, topology.dead_letter_queue, b"old dead letter")
    declared = await declare(await amqp.channel(), topology)
    assert declared.without_delivery_limit == (topology.dead_letter_queue, topology.queue)
    assert declared.broker_version.startswith(VERSION.value)
    again = await declare(await amqp.channel(), topology)  # and it stays so, every time
    assert again.without_delivery_limit == declared.without_delivery_limit
    held = await drain_queue(await amqp.channel(), topology.dead_letter_queue)
    assert [m.body for m in held] == [b"old dead letter"]


async def test_the_worker_warns_about_a_dlq_without_a_limit(
    amqp: AbstractConnection, names: dict[str, str], start_relay: Any
) -> None:
    """A worker started on an earlier release's queues consumes, and says once, in one warning,
    which queue is exposed and the policy that protects it."""
    topology = Topology(names["exchange"], names["queue"], ())
    await declare_as_an_earlier_release(await amqp.channel(), topology)
    relay: Relay = await start_relay()
    warnings = [line for line in relay.log_text().splitlines() if "without delivery limit" in line]
    assert len(warnings) == 2
    assert f"queue {topology.dead_letter_queue} was declared by an earlier release" in warnings[0]
    assert f'delivery-limit\\":{DLQ_DELIVERY_LIMIT}' in warnings[0]


@ONLY_ON_4
async def test_on_4_an_earlier_dlq_drops_after_20_returns_unless_a_policy_protects_it(
    amqp: AbstractConnection, topology: Topology
) -> None:
    """What the documented policy is for: on 4.0 an earlier release's DLQ drops a dead letter
    after 21 deliveries; with the policy the worker's warning names it keeps it through 50."""
    channel = await amqp.channel()
    await declare_as_an_earlier_release(channel, topology)
    await publish_and_wait(channel, topology.dead_letter_queue, b"dropped")
    assert await returns_until_gone(channel, topology.dead_letter_queue, 50) == 21
    name = f"{topology.dead_letter_queue}-limit"
    pattern = f"^{topology.dead_letter_queue.replace('.', '[.]')}$"
    policy = f'{{"delivery-limit":{DLQ_DELIVERY_LIMIT}}}'
    shared_ctl("set_policy", "--apply-to", "queues", name, pattern, policy)
    try:
        await publish_and_wait(channel, topology.dead_letter_queue, b"kept")
        assert await returns_until_gone(channel, topology.dead_letter_queue, 50) == 50
    finally:
        shared_ctl("clear_policy", name)


@ONLY_ON_4
async def test_on_4_an_earlier_work_queue_dead_letters_after_20_returns(
    amqp: AbstractConnection, topology: Topology
) -> None:
    """On 4.0 an earlier release's work queue hands a message to the DLQ (it has a dead-letter
    target) after 21 deliveries, with x-death reason delivery_limit: nothing is dropped."""
    channel = await amqp.channel()
    await declare_as_an_earlier_release(channel, topology)
    await publish_and_wait(channel, topology.queue, b"returned")
    assert await returns_until_gone(channel, topology.queue, 50) == 21
    await wait_until(lambda: _has_one(channel, topology.dead_letter_queue))
    [dead] = await drain_queue(channel, topology.dead_letter_queue)
    assert dead.headers["x-first-death-reason"] == "delivery_limit"
