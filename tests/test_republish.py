"""The relay's copies (retry tiers, DLQ) against a hostile or broken broker side: duplicate
event ids in flight, headers a publisher forged, confirms that never come, header keys that
do not fit. Every test runs a real worker against a real broker and the simulator."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import orjson
import pytest
from aio_pika.abc import AbstractChannel

from consumer.contract import example_event
from consumer.testing.vercel_sim import Fault, VercelSimulator
from consumer.topology import Topology
from tests.brokers import PrivateBroker
from tests.conftest import AMQP_URL, drain_queue, wait_until


@pytest.fixture
async def pub_channel() -> AsyncIterator[AbstractChannel]:
    async with await aio_pika.connect(AMQP_URL) as connection:
        yield await connection.channel(publisher_confirms=True)


def body(event_id: str, resource_id: str, **fields: Any) -> bytes:
    """A valid event; the simulator's record names it by `resource_id`."""
    event = example_event(
        "resource.hardened", id=event_id, resource_id=resource_id, installation_id="icfg_alpha"
    )
    return orjson.dumps({**event, **fields})


async def publish(
    channel: AbstractChannel, exchange: str, messages: list[aio_pika.Message]
) -> None:
    target = await channel.get_exchange(exchange)
    for message in messages:
        await target.publish(message, routing_key="resource.hardened")


def delivered(sim: VercelSimulator) -> set[str]:
    return {str(accepted.event.get("resourceId")) for accepted in sim.accepted}


async def test_duplicate_ids_whose_retry_is_unroutable_are_never_lost(
    start_relay: Callable[..., Awaitable[Any]],
    sim: VercelSimulator,
    pub_channel: AbstractChannel,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """Two messages with one event id (publishers send duplicates) fail at once and both
    retry copies are unroutable (the tiers were deleted under the worker). aiormq pairs a
    `basic.return` with its publish by message_id, so it used to hand the return of one copy
    to the other and take the unroutable one for confirmed: its original was acked and lost
    (5 to 8 of 40). Now every one of the 40 is delivered once the 503s are spent."""
    relay = await start_relay(concurrency=16, retry_delays=(0.05,), max_attempts=50)
    for delay_ms in relay.topology.retry_tiers_ms:
        await channel.queue_delete(relay.topology.retry_queue(delay_ms))
    pairs = [f"evt_dup_{uuid.uuid4().hex[:10]}" for _ in range(20)]
    resources = {f"{event_id}-{copy}": event_id for event_id in pairs for copy in "ab"}
    sim.add_fault(Fault(status=503, times=len(resources)))
    messages = [
        aio_pika.Message(body(event_id, resource), message_id=event_id)
        for resource, event_id in resources.items()
    ]
    await publish(pub_channel, names["exchange"], messages)

    # A lost message never arrives: the wait runs out and names how many are missing.
    try:
        await wait_until(lambda: delivered(sim) >= set(resources), timeout=60, interval=0.2)
    except AssertionError:
        missing = set(resources) - delivered(sim)
        raise AssertionError(f"{len(missing)} of {len(resources)} never delivered") from None
    assert not await drain_queue(channel, relay.topology.dead_letter_queue)


def _ra_servers(queues: list[str], action: str) -> str:
    """Erlang for `rabbitmqctl eval`: suspend or resume the Raft servers of quorum `queues`."""
    names = ", ".join(f'<<"{queue}">>' for queue in queues)
    return (
        '[begin {ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, N)),'
        f" {{Server, _}} = amqqueue:get_pid(Q), sys:{action}(Server) end || N <- [{names}]]."
    )


async def test_a_copy_the_broker_never_confirms_is_handed_back_not_held(
    start_relay: Callable[..., Awaitable[Any]],
    sim: VercelSimulator,
    private_broker: PrivateBroker,
) -> None:
    """A retry tier that cannot commit (a quorum queue without a quorum; here its Raft server
    is suspended) never confirms the copy, and the broker's channel is stuck on its first
    publish to it: it delivers nothing more. The wait used to be unbounded: the slot was held
    for good, and the channel with it, while /readyz stayed green. Now the copy counts as not
    made after CONSUMER_CONFIRM_TIMEOUT, the channel is given up and the worker consumes on a
    new one: later events are delivered while the tier is still stuck. Once the tier is back the
    broker lets go of what the old channel held and those are delivered: nothing acked early,
    nothing lost."""
    relay = await start_relay(
        amqp_url=private_broker.url, retry_delays=(0.05,), confirm_timeout=1.0
    )
    tiers = [relay.topology.retry_queue(ms) for ms in relay.topology.retry_tiers_ms]
    private_broker.ctl("eval", _ra_servers(tiers, "suspend"))
    first, *later = (f"evt_{uuid.uuid4().hex[:12]}" for _ in range(5))
    try:
        sim.add_fault(Fault(status=503, times=1))
        async with await aio_pika.connect(private_broker.url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = relay.topology.exchange
            await publish(channel, exchange, [aio_pika.Message(body(first, first))])
            await wait_until(lambda: "no confirm from the broker within 1 s" in relay.log_text())
            await wait_until(lambda: relay.worker.reconnects == 1 and relay.worker.consuming)
            assert relay.worker.in_flight == 0
            await publish(channel, exchange, [aio_pika.Message(body(i, i)) for i in later])
            # The broker keeps the stuck channel's consumer and gives it its share.
            await wait_until(lambda: bool(delivered(sim) & set(later)), timeout=30)
            private_broker.ctl("eval", _ra_servers(tiers, "resume"))
            await wait_until(lambda: delivered(sim) >= {first, *later}, timeout=60)
    finally:
        private_broker.ctl("eval", _ra_servers(tiers, "resume"), check=False)
        await _delete_topology(private_broker.url, relay.topology)


async def _delete_topology(url: str, topology: Topology) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for delay_ms in topology.retry_tiers_ms:
            await channel.queue_delete(topology.retry_queue(delay_ms))
        await channel.queue_delete(topology.queue)
        await channel.queue_delete(topology.dead_letter_queue)
        await channel.exchange_delete(topology.exchange)
