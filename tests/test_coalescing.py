"""Coalescing on the real broker and the simulator: a burst of updates to a few resources
becomes a few calls, every message is acked, and the last call for each resource carries its
last update."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from aio_pika.abc import AbstractChannel

from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.helpers import Relay, drain_queue, event, wait_until
from tests.test_worker import queue_depth

RESOURCES = [f"res_{n}" for n in range(10)]
BASE = datetime(2026, 12, 1, tzinfo=UTC)


async def _burst(publisher: EventPublisher, updates: int) -> dict[str, tuple[float, str]]:
    """Publish `updates` updates round-robin over RESOURCES, each with a later occurred_at and
    its number as productId; per resource: (time its last update's publish began, its id)."""
    last: dict[str, tuple[float, str]] = {}
    for n in range(updates):
        resource_id = RESOURCES[n % len(RESOURCES)]
        product_id = f"prod_{n}"
        began = time.time()
        await publisher.publish(
            event(
                resource_id=resource_id,
                product_id=product_id,
                occurred_at=(BASE + timedelta(milliseconds=n)).isoformat(),
            )
        )
        last[resource_id] = (began, product_id)
    return last


def _calls(sim: VercelSimulator) -> dict[str, list[Any]]:
    calls: dict[str, list[Any]] = {}
    for accepted in sorted(sim.accepted, key=lambda a: a.arrived_at):
        calls.setdefault(accepted.event["resourceId"], []).append(accepted)
    return calls


async def _all_settled(relay: Relay, channel: AbstractChannel, names: dict[str, str]) -> None:
    """Shut the relay down and check that no message is left anywhere: work queue (unacked
    ones return there on shutdown), retry tiers, DLQ."""
    await relay.shutdown()
    # A quorum queue's count in a passive declare lags the acks by up to a few seconds, so it
    # is polled; a message that was not acked stays in the queue (no consumer is left) and
    # still fails this.
    queues = [names["queue"], *map(relay.topology.retry_queue, relay.topology.retry_tiers_ms)]

    async def all_empty() -> bool:
        return all([await queue_depth(channel, queue) == 0 for queue in queues])

    await wait_until(all_empty, timeout=15, interval=0.5)
    assert await drain_queue(channel, f"{names['queue']}.dlq") == []


async def test_a_burst_of_updates_to_ten_resources_makes_a_few_calls_each(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """1,000 updates to 10 resources waiting in the queue, the first call for each taking 5 s
    (while the rest arrive): at most 3 calls per resource (not 100), every message acked, and
    each resource's last call arrived after its last update was published and carries that
    update's productId (the newest payload)."""
    first = await start_relay()  # declares the topology
    await first.shutdown()
    last = await _burst(publisher, 1000)
    sim.add_fault(Fault(latency=5, times=len(RESOURCES)))
    relay = await start_relay(concurrency=1000, http_timeout=30)
    await wait_until(lambda: relay.metrics.coalesced._value.get() + len(sim.accepted) >= 1000)
    calls = _calls(sim)
    assert set(calls) == set(RESOURCES)
    for resource_id, (published, product_id) in last.items():
        assert len(calls[resource_id]) <= 3
        final = calls[resource_id][-1]
        assert final.arrived_at > published
        assert final.event["productId"] == product_id
    assert relay.metrics.coalesced._value.get() == 1000 - len(sim.accepted)
    await _all_settled(relay, channel, names)


async def test_a_failure_in_the_middle_of_a_burst_loses_nothing(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """Updates published while the relay runs, and Vercel fails (503) a stretch of calls in
    the middle: the failed combined calls send each message through its own retry, and in the
    end every resource's last call carries its last update, and nothing is left in any queue."""
    relay = await start_relay(concurrency=200, max_attempts=6)
    sim.add_fault(Fault(latency=0.05))
    first_half = asyncio.create_task(_burst(publisher, 300))
    await wait_until(lambda: len(sim.accepted) >= 3)
    sim.clear_faults()
    sim.add_fault(Fault(status=503, times=8))
    last = await first_half
    last.update(await _burst(publisher, 300))

    def final_payloads() -> dict[str, str]:
        return {r: calls[-1].event.get("productId") for r, calls in _calls(sim).items()}

    wanted = {resource_id: product_id for resource_id, (_, product_id) in last.items()}
    await wait_until(lambda: final_payloads() == wanted, timeout=60)
    assert sim.by_status["503"] == 8
    await _all_settled(relay, channel, names)


async def test_coalesce_false_makes_one_call_per_message(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """CONSUMER_COALESCE=false: 20 updates to one resource, Vercel slow enough that they all
    wait together, still make 20 calls."""
    sim.add_fault(Fault(latency=0.3))
    relay = await start_relay(coalesce=False, concurrency=32)
    for _ in range(20):
        await publisher.publish(event(resource_id="res_same"))
    await wait_until(lambda: len(sim.accepted) == 20)
    assert relay.metrics.coalesced._value.get() == 0
