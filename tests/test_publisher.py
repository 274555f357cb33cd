"""EventPublisher against a real broker: confirms, pipelining, duplicate ids, failures raised,
reconnects after the broker closed its connection (the private node)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from consumer.errors import (
    BrokerError,
    ContractError,
    PublishBatchError,
    PublishNotConfirmed,
    PublishTimeout,
    PublishUnroutable,
)
from consumer.publish.publisher import EventPublisher
from tests.brokers import PrivateBroker
from tests.helpers import AMQP_URL, drain_queue, event, wait_until


async def bound_queue(channel: AbstractChannel, names: dict[str, str], key: str = "#") -> str:
    """A quorum queue bound to the test's exchange with `key`; returns its name."""
    exchange = await channel.declare_exchange(
        names["exchange"], aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(
        names["queue"], durable=True, arguments={"x-queue-type": "quorum"}
    )
    await queue.bind(exchange, key)
    return queue.name


@pytest.fixture
async def topic(channel: AbstractChannel, names: dict[str, str]) -> AsyncIterator[str]:
    yield await bound_queue(channel, names, "resource.#")
    await channel.queue_delete(names["queue"])
    await channel.exchange_delete(names["exchange"])


async def message_ids(channel: AbstractChannel, queue: str, count: int) -> list[str]:
    """The message ids of `count` messages taken from `queue` (waiting for quorum counts)."""
    taken: list[str] = []

    async def enough() -> bool:
        taken.extend(str(m.message_id) for m in await drain_queue(channel, queue))
        return len(taken) >= count

    await wait_until(enough, timeout=30)
    return taken


async def test_publish_many_confirms_every_event_into_the_queue(
    topic: str, names: dict[str, str], channel: AbstractChannel
) -> None:
    """publish_many returns once all are confirmed; every one is in the queue, once."""
    events = [event() for _ in range(500)]
    async with await EventPublisher.connect(
        AMQP_URL, exchange=names["exchange"], max_in_flight=64
    ) as publisher:
        await publisher.publish_many(events)
    assert sorted(await message_ids(channel, topic, 500)) == sorted(e["id"] for e in events)


async def test_concurrent_publishes_of_one_id_are_each_confirmed_or_returned_correctly(
    topic: str, names: dict[str, str], channel: AbstractChannel
) -> None:
    """Two publishes of one id at once, one routable and one not: the unroutable one raises
    PublishUnroutable, the other is confirmed (aiormq pairs returns by message_id; without
    serialising same-id publishes the return can land on the wrong one)."""
    async with await EventPublisher.connect(AMQP_URL, exchange=names["exchange"]) as publisher:
        for _ in range(20):
            shared_id = f"evt_{uuid.uuid4().hex[:8]}"
            unroutable = publisher.publish(event("billing.plan_changed", id=shared_id))
            routable = publisher.publish(event(id=shared_id))
            outcomes = await asyncio.gather(unroutable, routable, return_exceptions=True)
            assert isinstance(outcomes[0], PublishUnroutable)
            assert outcomes[0].event_id == shared_id
            assert outcomes[1] is None
    assert len(await message_ids(channel, topic, 20)) == 20


async def test_many_tasks_share_one_publisher(
    topic: str, names: dict[str, str], channel: AbstractChannel
) -> None:
    """40 tasks publishing 25 events each at once, every fifth id shared by two tasks, with
    at most 8 in flight: every publish returns confirmed and every id is in the queue."""
    shared = [event() for _ in range(100)]
    own = [[event() for _ in range(20)] for _ in range(40)]
    batches = [own[n] + shared[(n % 20) * 5 : (n % 20) * 5 + 5] for n in range(40)]
    async with await EventPublisher.connect(
        AMQP_URL, exchange=names["exchange"], max_in_flight=8
    ) as publisher:

        async def publish_all(batch: list[dict[str, str]]) -> None:
            for item in batch:
                await publisher.publish(item)

        await asyncio.gather(*(publish_all(batch) for batch in batches))
    expected = {e["id"] for batch in batches for e in batch}
    received = await message_ids(channel, topic, 1000)
    assert len(received) == 1000  # 800 own + 100 shared ids published twice each
    assert set(received) == expected


async def test_publish_many_reports_which_ids_were_confirmed(
    topic: str, names: dict[str, str], channel: AbstractChannel
) -> None:
    """A batch with unroutable and invalid events still publishes the rest, then raises
    PublishBatchError listing the confirmed ids and each failure with its own error."""
    good = [event() for _ in range(5)]
    unroutable = event("billing.plan_changed")
    invalid = {"id": "evt_bad", "type": "resource.renamed"}
    async with await EventPublisher.connect(AMQP_URL, exchange=names["exchange"]) as publisher:
        with pytest.raises(PublishBatchError) as caught:
            await publisher.publish_many([*good[:2], unroutable, invalid, *good[2:]])
    assert caught.value.confirmed == [e["id"] for e in good]
    failures = dict(caught.value.failures)
    assert isinstance(failures[unroutable["id"]], PublishUnroutable)
    assert isinstance(failures["evt_bad"], ContractError)
    assert sorted(await message_ids(channel, topic, 5)) == sorted(e["id"] for e in good)


async def test_a_deleted_exchange_is_declared_again_and_the_publish_reported_unroutable(
    names: dict[str, str], channel: AbstractChannel
) -> None:
    """Someone deletes the exchange under the publisher: the broker closes its channel (404);
    the publisher reconnects, declares the exchange again and, since no queue is bound to it
    any more, raises PublishUnroutable rather than timing out or claiming success."""
    async with await EventPublisher.connect(
        AMQP_URL, exchange=names["exchange"], timeout=20
    ) as publisher:
        await channel.exchange_delete(names["exchange"])
        with pytest.raises(PublishUnroutable):
            await publisher.publish(event())
        assert publisher.reconnects == 1
    await channel.exchange_delete(names["exchange"])


async def test_an_unreachable_broker_fails_connect_with_one_sentence() -> None:
    """connect() to a port nothing listens on raises BrokerError naming the address only."""
    with pytest.raises(BrokerError, match=r"127\.0\.0\.1:1\b") as caught:
        await EventPublisher.connect("amqp://guest:s3cret@127.0.0.1:1/")
    assert "s3cret" not in str(caught.value)


async def test_a_publish_that_cannot_reach_the_broker_raises_publish_timeout(
    private_broker: PrivateBroker, names: dict[str, str]
) -> None:
    """With the broker down, a publish keeps reconnecting until its timeout, then raises
    PublishTimeout (a PublishNotConfirmed): never returns as if published."""
    publisher = await EventPublisher.connect(
        private_broker.url, exchange=names["exchange"], timeout=3
    )
    private_broker.stop()
    try:
        with pytest.raises(PublishTimeout) as caught:
            await publisher.publish(event())
        assert isinstance(caught.value, PublishNotConfirmed)
    finally:
        private_broker.start()
        await publisher.close()


async def test_publishes_survive_the_broker_closing_every_connection(
    private_broker: PrivateBroker, names: dict[str, str]
) -> None:
    """After the broker closed the publisher's connection, the next publishes reconnect and
    are confirmed; the publisher counts the reconnect."""
    async with await EventPublisher.connect(
        private_broker.url, exchange=names["exchange"]
    ) as publisher:
        async with await aio_pika.connect(private_broker.url) as connection:
            queue = await bound_queue(await connection.channel(), names)
        await publisher.publish(event())
        private_broker.close_all_connections()
        await publisher.publish_many([event() for _ in range(10)])
        assert publisher.reconnects >= 1
    async with await aio_pika.connect(private_broker.url) as connection:
        channel = await connection.channel()
        assert len(await message_ids(channel, queue, 11)) == 11
        await channel.queue_delete(queue)
        await channel.exchange_delete(names["exchange"])


async def test_close_fails_publishes_that_wait_for_a_connection(
    private_broker: PrivateBroker, names: dict[str, str]
) -> None:
    """A publish waiting to reconnect when the publisher is closed raises PublishNotConfirmed
    at once rather than hanging to its timeout."""
    publisher = await EventPublisher.connect(
        private_broker.url, exchange=names["exchange"], timeout=60
    )
    private_broker.stop()
    try:
        waiting = asyncio.create_task(publisher.publish(event()))
        await asyncio.sleep(0.5)
        await publisher.close()
        with pytest.raises(PublishNotConfirmed):
            await asyncio.wait_for(waiting, 20)
    finally:
        private_broker.start()
