"""The worker's lifecycle: start without a broker, reconnect, drain on shutdown."""

from __future__ import annotations

import asyncio
from typing import Any

from aio_pika.abc import AbstractChannel

from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from consumer.topology import connection_name
from tests.brokers import shared_ctl
from tests.helpers import broker_connections, event, wait_until


async def queue_depth(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    assert declared.declaration_result.message_count is not None
    return declared.declaration_result.message_count


def close_consumer_connections() -> int:
    """Close, from the broker's side, this process's worker connections; return how many."""
    named = f'{{"connection_name","{connection_name()}"}}'
    pids = [
        pid
        for pid, properties in broker_connections("pid", "client_properties")
        if named in properties
    ]
    for pid in pids:
        shared_ctl("-q", "close_connection", pid, "test: connection dropped")
    return len(pids)


async def hold_in_flight(
    sim: VercelSimulator, publisher: EventPublisher, count: int, *, latency: float
) -> set[str]:
    """Publish `count` events that Vercel answers only after `latency` seconds; return their
    resource ids once all of them are in flight."""
    sim.add_fault(Fault(latency=latency, times=count))
    resource_ids = {f"res_{number}" for number in range(count)}
    for resource_id in sorted(resource_ids):
        await publisher.publish(event(resource_id=resource_id))
    await wait_until(lambda: sim.in_flight == count)
    return resource_ids


async def depth_becomes(channel: AbstractChannel, queue: str, depth: int) -> None:
    async def reached() -> bool:
        return await queue_depth(channel, queue) == depth

    await wait_until(reached, timeout=5)


async def test_worker_waits_for_an_unreachable_broker_without_crashing(
    start_relay: Any,
) -> None:
    """With no broker at the URL the worker keeps retrying, not consuming, and stops on request;
    its log names the broker but not the password."""
    broken = await start_relay(
        wait_consuming=False, amqp_url="amqp://guest:hunter2-pw@127.0.0.1:1/"
    )
    await asyncio.sleep(1.5)
    assert not broken.task.done()
    assert not broken.worker.consuming
    assert "broker unavailable" in broken.log_text()
    assert "127.0.0.1:1" in broken.log_text()
    assert "hunter2-pw" not in broken.log_text()
    await asyncio.wait_for(broken.shutdown(), 5)


async def test_worker_reconnects_after_the_broker_drops_it(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """A connection closed by the broker is re-opened; events in flight then and after arrive."""
    relay = await start_relay(concurrency=4)
    in_flight = await hold_in_flight(sim, publisher, 4, latency=0.5)
    before = relay.worker.reconnects
    assert await asyncio.to_thread(close_consumer_connections) >= 1
    # The loss itself, not a pause in consuming: the worker reconnects at once, and a poll can
    # miss the milliseconds between.
    await wait_until(lambda: relay.worker.reconnects > before, timeout=10)
    await wait_until(lambda: relay.worker.consuming, timeout=20)
    await publisher.publish(event(resource_id="res_after"))
    expected = in_flight | {"res_after"}
    await wait_until(lambda: {a.event["resourceId"] for a in sim.accepted} >= expected)
    await depth_becomes(channel, names["queue"], 0)


async def test_shutdown_lets_deliveries_in_flight_finish(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """On stop, requests already sent complete and are acked before the worker exits."""
    relay = await start_relay(shutdown_timeout=10)
    await hold_in_flight(sim, publisher, 5, latency=0.5)
    await relay.shutdown()
    assert len(sim.accepted) == 5
    assert await queue_depth(channel, names["queue"]) == 0


async def test_shutdown_timeout_leaves_unfinished_deliveries_for_redelivery(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """Deliveries still running at the shutdown timeout are not acked: they return to the queue."""
    relay = await start_relay(shutdown_timeout=0.3)
    await hold_in_flight(sim, publisher, 3, latency=5)
    await asyncio.wait_for(relay.shutdown(), 5)
    await depth_becomes(channel, names["queue"], 3)
    assert sim.accepted == []


async def test_conflicting_queue_is_reported_not_crashed_on(
    start_relay: Any, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """A work queue that exists with other arguments (a classic queue) is reported by name and
    the worker keeps retrying instead of exiting into a crash loop."""
    await channel.declare_queue(names["queue"], durable=True)
    relay = await start_relay(wait_consuming=False)
    await wait_until(lambda: "PRECONDITION_FAILED" in relay.log_text())
    assert names["queue"] in relay.log_text()
    assert not relay.task.done()
    assert not relay.worker.consuming
