"""Events Vercel accepted but whose ack was lost are not sent to Vercel a second time."""

from __future__ import annotations

from typing import Any

from aio_pika.abc import AbstractChannel
from hypothesis import given
from hypothesis import strategies as st

from consumer.accepted import AcceptedMemory
from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.chaos import TcpProxy
from tests.helpers import AMQP_URL, event, wait_until
from tests.test_breaker import Clock


def test_same_id_with_another_body_is_not_held() -> None:
    """A publisher reusing an id for a different event is never taken for a redelivery."""
    memory = AcceptedMemory()
    memory.remember("evt_1", b'{"id":"evt_1","a":1}')
    assert memory.holds("evt_1", b'{"id":"evt_1","a":1}')
    assert not memory.holds("evt_1", b'{"id":"evt_1","a":2}')
    assert not memory.holds("evt_2", b'{"id":"evt_1","a":1}')


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    memory = AcceptedMemory(ttl=60, clock=clock)
    memory.remember("evt_1", b"x")
    clock.now += 59.9
    assert memory.holds("evt_1", b"x")
    clock.now += 0.1
    assert not memory.holds("evt_1", b"x")
    assert len(memory) == 0


@given(st.lists(st.tuples(st.text(max_size=8), st.binary(max_size=8)), max_size=200))
def test_the_memory_is_bounded_and_keeps_the_newest(pairs: list[tuple[str, bytes]]) -> None:
    """Never more than max_entries; the last one remembered is always held."""
    memory = AcceptedMemory(max_entries=16)
    for event_id, body in pairs:
        memory.remember(event_id, body)
        assert len(memory) <= 16
        assert memory.holds(event_id, body)


async def test_a_lost_ack_after_vercels_2xx_is_not_sent_twice(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher, channel: AbstractChannel
) -> None:
    """The worker's connection is cut while 20 Vercel calls are under way: the calls finish
    (Vercel accepted them), their acks are lost, the broker redelivers all 20, and the worker
    acks each redelivery without calling Vercel again: 20 accepted requests, not 40, 20
    skips logged and counted."""
    async with TcpProxy.for_url(AMQP_URL) as proxy:
        relay = await start_relay(amqp_url=proxy.url(AMQP_URL), concurrency=32)
        sim.add_fault(Fault(latency=1.0, times=20))
        events = [event(resource_id=f"res_{i}") for i in range(20)]
        for item in events:
            await publisher.publish(item)
        await wait_until(lambda: sim.in_flight == 20, timeout=20)
        proxy.reset()
        await wait_until(lambda: relay.worker.reconnects == 1 and relay.worker.consuming)
        await wait_until(lambda: relay.log_text().count('"redelivery_skipped"') == 20)
        assert sorted(a.event["resourceId"] for a in sim.accepted) == sorted(
            e["resource_id"] for e in events
        )
        assert relay.log_text().count('"ack failed; message will be redelivered"') == 20
        skipped = relay.metrics.registry.get_sample_value(
            "vercel_consumer_redeliveries_skipped_total"
        )
        assert skipped == 20
        await wait_until(lambda: _empty(channel, relay.topology.queue))


async def _empty(channel: AbstractChannel, name: str) -> bool:
    queue = await channel.declare_queue(name, passive=True)
    return queue.declaration_result.message_count == 0
