"""Resource alarms: the broker blocks the worker's connection (a disk or memory alarm).

While blocked, nothing the worker publishes (retry and dead-letter copies) or acks reaches the
broker. The worker says so (readiness `broker_blocked`, the `vercel_consumer_broker_blocked`
gauge, one warning when it starts and one line when it ends), and once the alarm clears
everything flows again: nothing is lost.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
from pathlib import Path

from consumer.app import build_worker
from consumer.health import HealthServer
from consumer.logs import configure_logging, get_logger
from consumer.metrics import Metrics
from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from consumer.vercel import VercelClient
from tests.brokers import PrivateBroker
from tests.helpers import event, get_json, private_settings, sample, scrape, wait_until
from tests.test_resilience import _delete

EVENTS = 50
DEFAULT_DISK_FREE_LIMIT = "50MB"  # RabbitMQ's default, on 3.10 and 4.0


def raise_disk_alarm(broker: PrivateBroker) -> None:
    """Ask for more free disk than there is: the node raises its disk alarm."""
    free = shutil.disk_usage("/").free
    broker.ctl("set_disk_free_limit", str(free + 100 * 2**30))


def clear_disk_alarm(broker: PrivateBroker) -> None:
    broker.ctl("set_disk_free_limit", DEFAULT_DISK_FREE_LIMIT)


async def test_a_blocked_connection_is_reported_and_nothing_is_lost(
    private_broker: PrivateBroker, sim: VercelSimulator, tokens_dir: Path
) -> None:
    """Vercel answers 503, so the worker republishes retries; the disk alarm blocks its
    connection: /readyz says broker_blocked, the gauge is 1, one warning is logged. When the
    alarm clears and Vercel recovers, one line says so and all 50 events are delivered."""
    settings = private_settings(
        private_broker.url,
        sim,
        tokens_dir,
        "alarm",
        retry_delays=(0.2, 0.4),
        max_attempts=1000,
        breaker_failure_ratio=1.0,
        breaker_window=10_000,
        concurrency=8,
    )
    logs = io.BytesIO()
    configure_logging("json", "debug", stream=logs)
    metrics = Metrics()
    vercel = VercelClient(settings.vercel_api_url, timeout=2.0)
    worker = build_worker(settings, vercel, get_logger("test"), metrics)
    health = HealthServer(worker.readiness, metrics)
    base = await health.start("127.0.0.1", 0)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    sim.add_fault(Fault(status=503))
    try:
        await wait_until(lambda: worker.consuming)
        async with await EventPublisher.connect(
            private_broker.url, exchange=settings.exchange
        ) as pub:
            ids = set()
            for number in range(EVENTS):
                ids.add(f"res_{number}")
                await pub.publish(event(resource_id=f"res_{number}"))
        await wait_until(lambda: sim.by_status["503"] >= EVENTS)
        await asyncio.to_thread(raise_disk_alarm, private_broker)
        await wait_until(lambda: worker.broker_blocked, timeout=60)
        status, body = await get_json(f"{base}/readyz")
        assert (status, body["reason"]) == (503, "broker_blocked")
        assert sample(await scrape(base), "vercel_consumer_broker_blocked") == 1
        sim.clear_faults()
        await asyncio.to_thread(clear_disk_alarm, private_broker)
        await wait_until(lambda: not worker.broker_blocked, timeout=60)
        delivered = lambda: {a.event["resourceId"] for a in sim.accepted}  # noqa: E731
        await wait_until(lambda: ids <= delivered(), timeout=60)
        status, body = await get_json(f"{base}/readyz")
        assert (status, body["ready"]) == (200, True)
        assert sample(await scrape(base), "vercel_consumer_broker_blocked") == 0
    finally:
        await asyncio.to_thread(clear_disk_alarm, private_broker)
        stop.set()
        await asyncio.wait_for(task, 30)
        await health.stop()
        await vercel.aclose()
        await _delete(worker.topology, private_broker.url)
    events = [json.loads(line)["event"] for line in logs.getvalue().decode().splitlines()]
    assert events.count("broker blocked the connection; publishes and acks wait") == 1
    assert events.count("broker unblocked the connection") == 1
