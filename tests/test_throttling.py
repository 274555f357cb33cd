"""Rate limits: a throttled installation waits without slowing the others or spending
attempts; CONSUMER_MAX_RPS caps the request rate overall."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractChannel

from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import VercelSimulator
from tests.helpers import drain_queue, event, wait_until

THROTTLED = "icfg_throttled"


async def test_a_throttled_installation_waits_while_nineteen_others_keep_full_speed(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    tokens_dir: Path,
) -> None:
    """One installation limited to 5 requests/s by Vercel (429 + X-RateLimit-*) and 19 free
    ones, 30 events each: all 570 free events are delivered while the throttled installation
    is still far from done; then its 30 arrive too, none dead-lettered although every message
    had a single attempt, after the first burst Vercel's limit is not hit again, and each
    throttled message waits in a retry tier about once."""
    installations = [THROTTLED] + [f"icfg_free_{n:02d}" for n in range(19)]
    for installation in installations:
        sim.set_token(installation, f"tok_{installation}")
        (tokens_dir / installation).write_text(f"tok_{installation}")
    sim.set_rate_limit(THROTTLED, limit=5, seconds=1.0)
    relay = await start_relay(max_attempts=1, concurrency=16, retry_delays=(0.2, 1, 3, 6))
    for n in range(30):
        for installation in installations:
            await publisher.publish(event(installation_id=installation, resource_id=f"r{n}"))

    free_total = 19 * 30
    await wait_until(lambda: _count(sim, free=True) == free_total, timeout=60)
    throttled_then = _count(sim, free=False)
    assert throttled_then < 25  # 30 at 5/s take at least 5 s; the others were not held back

    await wait_until(lambda: _count(sim, free=False) == 30, timeout=60)
    assert await drain_queue(channel, f"{relay.topology.queue}.dlq") == []
    assert sim.by_status["429"] <= 16  # only the first burst, before the quota was known
    assert '"deferred"' in relay.log_text()
    # Deferred messages get successive slots at the installation's rate: each is put away
    # about once, not once per window until its turn comes (57 times for 30 without slots).
    assert relay.log_text().count('"deferred"') <= 45


async def test_max_rps_caps_requests_per_second_overall(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """With CONSUMER_MAX_RPS=20, no one-second window holds more than 21 requests."""
    await start_relay(max_rps=20, concurrency=32)
    for n in range(50):
        await publisher.publish(event(resource_id=f"r{n}"))
    await wait_until(lambda: len(sim.accepted) == 50, timeout=30)
    times = sorted(accepted.received_at for accepted in sim.accepted)
    busiest = max(sum(1 for t in times if start <= t < start + 1.0) for start in times)
    assert busiest <= 21


def _count(sim: VercelSimulator, *, free: bool) -> int:
    return sum((a.installation_id != THROTTLED) == free for a in sim.accepted)
