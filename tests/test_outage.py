"""Vercel-wide outages open the circuit: consumption pauses, no retry budget is spent, and a
probe resumes it. Per-installation failures do not; old messages age out."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel

from consumer.headers import FIRST_ATTEMPT_AT
from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.helpers import drain_queue, event, wait_for_dead_letters, wait_until

OUTAGE = {
    "retry_delays": (0.1, 0.2),
    "max_attempts": 2,  # without the breaker, two failures would dead-letter a message
    "breaker_window": 10,
    "breaker_probe_delays": (0.3, 0.6),
}


async def test_an_outage_pauses_consumption_and_dead_letters_nothing(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
) -> None:
    """Vercel answering 503 to everyone opens the circuit: readiness says circuit_open,
    messages wait, probes go one at a time; when Vercel is back everything is delivered and
    nothing was dead-lettered although each message had only two attempts."""
    relay = await start_relay(**OUTAGE)
    sim.add_fault(Fault(status=503))
    events = [
        event(installation_id=f"icfg_{name}", resource_id=f"res_{i}")
        for i, name in enumerate(("alpha", "beta") * 30)
    ]
    for item in events:
        await publisher.publish(item)
    await wait_until(lambda: relay.worker.readiness()[1].get("reason") == "circuit_open")
    ready, detail = relay.worker.readiness()
    assert not ready
    assert detail["circuit"] in ("open", "half_open")
    requests_when_open = sim.requests
    await wait_until(lambda: sim.requests >= requests_when_open + 2)  # probes keep coming
    assert sim.max_in_flight <= 16
    sim.clear_faults()
    await wait_until(lambda: relay.worker.consuming)
    await wait_until(lambda: _accepted_ids(sim) == {e["resource_id"] for e in events})
    assert await drain_queue(channel, f"{relay.topology.queue}.dlq") == []
    logs = relay.log_text()
    assert '"circuit":"open"' in logs
    assert '"circuit":"closed"' in logs
    assert '"deferred"' in logs


async def test_one_failing_installation_does_not_pause_the_others(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
) -> None:
    """icfg_alpha's 503s dead-letter its own messages; icfg_beta's keep flowing, circuit closed."""
    relay = await start_relay(**OUTAGE)
    sim.add_fault(Fault(status=503, installation="icfg_alpha"))
    for _ in range(30):
        await publisher.publish(event(installation_id="icfg_alpha"))
        await publisher.publish(event(installation_id="icfg_beta"))
    await wait_until(lambda: len(sim.accepted) == 30)
    dead = await wait_for_dead_letters(channel, relay.topology.queue, 30)
    assert {m.headers["dead-letter-reason"] for m in dead} == {"retries_exhausted"}
    assert relay.worker.readiness() == (True, {"status": "consuming", "circuit": "closed"})
    assert '"circuit":"open"' not in relay.log_text()


async def test_a_message_older_than_the_max_retry_age_is_dead_lettered(
    start_relay: Any, sim: VercelSimulator, channel: AbstractChannel
) -> None:
    """A failing message first tried two days ago is retries_exhausted, attempts left or not."""
    relay = await start_relay(max_attempts=100, max_retry_age=86_400)
    sim.add_fault(Fault(status=503))
    first_try = datetime.now(UTC) - timedelta(days=2)
    message = aio_pika.Message(
        orjson.dumps(event()),
        headers={FIRST_ATTEMPT_AT: first_try.isoformat(), "delivery-attempts": 1},
    )
    await channel.default_exchange.publish(message, routing_key=relay.topology.queue)
    [dead] = await wait_for_dead_letters(channel, relay.topology.queue, 1)
    assert dead.headers["dead-letter-reason"] == "retries_exhausted"
    assert "max retry age 86400 s" in str(dead.headers["dead-letter-detail"])
    assert sim.requests == 1


def _accepted_ids(sim: VercelSimulator) -> set[str]:
    return {a.event.get("resourceId", "") for a in sim.accepted}
