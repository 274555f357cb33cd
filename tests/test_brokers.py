"""The private broker node that fault tests break on purpose is really separate and restartable."""

from __future__ import annotations

import aio_pika

from tests.brokers import PrivateBroker


async def test_private_broker_keeps_quorum_messages_across_a_restart(
    private_broker: PrivateBroker,
) -> None:
    """A message in a quorum queue survives `restart()`, and the shared broker never sees it."""
    connection = await aio_pika.connect(private_broker.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            "private-broker-check", durable=True, arguments={"x-queue-type": "quorum"}
        )
        await channel.default_exchange.publish(aio_pika.Message(b"kept"), routing_key=queue.name)
    private_broker.restart()
    connection = await aio_pika.connect(private_broker.url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue("private-broker-check")
        message = await queue.get(fail=False, no_ack=True)
        await queue.delete(if_unused=False, if_empty=False)
    assert message is not None
    assert message.body == b"kept"
