"""The worker's lifecycle under single, targeted faults: each test pins down one behaviour
(and, where one was found, the bug it fixed). The broker-breaking ones use the private node."""

from __future__ import annotations

import asyncio
import re
import signal
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from consumer.app import build_worker
from consumer.breaker import CircuitBreaker
from consumer.errors import BrokerError
from consumer.testing.vercel_sim import Fault, VercelSimulator
from consumer.topology import Topology, broker_errors, connect, open_channel
from consumer.vercel import VercelClient
from consumer.worker import Worker
from tests.brokers import PrivateBroker
from tests.chaos import CHAOS_TOKENS, Scenario, TcpProxy
from tests.helpers import AMQP_URL, broker_connections, private_settings, wait_until


class ListLog:
    """A stand-in for the structlog logger that keeps (event, fields) pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    info = warning = error = exception = debug = _record


async def _ack(message: AbstractIncomingMessage) -> None:
    await message.ack()


async def _delete(topology: Topology, url: str = AMQP_URL) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for queue in (topology.queue, topology.dead_letter_queue):
            await channel.queue_delete(queue)
        for delay_ms in topology.retry_tiers_ms:
            await channel.queue_delete(topology.retry_queue(delay_ms))
        await channel.exchange_delete(topology.exchange)


@pytest.mark.broker
async def test_calls_on_a_closed_channel_or_connection_are_broker_errors() -> None:
    """A channel or connection that closed between two calls makes the next call a
    BrokerError, like any other broker failure (aio-pika says so with RuntimeError)."""
    connection = await connect(AMQP_URL)
    channel = await open_channel(connection)
    await channel.close()
    with pytest.raises(BrokerError, match="declaring"), broker_errors("declaring"):
        await channel.declare_queue("chaos-never-declared", passive=True)
    await connection.close()
    with pytest.raises(BrokerError, match="opening a channel"):
        await open_channel(connection)


@pytest.mark.broker
async def test_worker_outlives_a_connection_that_closes_before_its_channel_opens(
    names: dict[str, str],
) -> None:
    """A connection that is gone by the time the worker opens its channel is one more
    `broker unavailable`: the worker reconnects and consumes instead of dying (the
    RuntimeError used to escape `Worker.run`)."""
    connections = 0

    async def connect_closing_the_first() -> AbstractConnection:
        nonlocal connections
        connections += 1
        connection = await connect(AMQP_URL)
        if connections == 1:
            await connection.close()
        return connection

    log = ListLog()
    topology = Topology(names["exchange"], names["queue"], (100,))
    worker = Worker(
        connect=connect_closing_the_first,
        topology=topology,
        make_handler=lambda channel: _ack,
        breaker=CircuitBreaker(),
        concurrency=1,
        shutdown_timeout=1,
        log=log,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_until(lambda: worker.consuming or task.done(), timeout=10)
        assert not task.done(), task.exception()
        assert [e for e, _ in log.lines].count("broker unavailable") == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await _delete(topology)


def broker_heartbeats() -> dict[str, int]:
    """Heartbeat timeout (s) of each named client connection, as the shared broker sees it."""
    found = {}
    for properties, timeout in broker_connections("client_properties", "timeout"):
        name = re.search(r'\{"connection_name","([^"]+)"\}', properties)
        if name:
            found[name.group(1)] = int(timeout)
    return found


@pytest.mark.broker
@pytest.mark.parametrize(("query", "expected"), [("", 10), ("?heartbeat=30", 30)])
async def test_connections_ask_for_heartbeats_every_ten_seconds(query: str, expected: int) -> None:
    """The worker's connections heartbeat every 10 s (aiormq's default, 60 s, let a silent
    partition go unnoticed for three minutes); `?heartbeat=` in the URL still decides."""
    name = f"heartbeat-check-{uuid.uuid4().hex[:8]}"
    connection = await connect(AMQP_URL.rstrip("/") + "/" + query, name=name)
    try:
        assert (await asyncio.to_thread(broker_heartbeats))[name] == expected
    finally:
        await connection.close()


async def test_silent_partition_is_noticed_and_survived(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """A partition that drops every byte but closes nothing (like iptables DROP) is noticed by
    the missing heartbeats: the worker reports the broker unavailable, reconnects once the
    network is back, and loses nothing that was in flight."""
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.05) as sim,
        Scenario(private_broker.url, sim, tmp_path, concurrency=8) as scenario,
        TcpProxy.for_url(private_broker.url) as proxy,
    ):
        await scenario.publish(400)
        worker = scenario.worker(amqp_url=proxy.url(private_broker.url) + "?heartbeat=2")
        worker.start()
        await worker.wait_consuming()
        await wait_until(lambda: len(sim.accepted) >= 50, timeout=30)
        proxy.blackhole(True)
        cut = time.monotonic()
        await worker.wait_for("broker unavailable", timeout=60)
        noticed = time.monotonic() - cut
        proxy.blackhole(False)
        await worker.wait_consuming(sessions=2, timeout=60)
        report = await scenario.finish("silent partition (heartbeat 2 s)")
    print(f"partition noticed after {noticed:.1f} s")
    assert report.delivered == 400


async def test_second_signal_exits_at_once_without_acking(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """SIGTERM starts a drain; a second SIGTERM ends the process at once (status 128 + 15),
    and the deliveries still in flight were not acked: all of them are back in the queue."""
    async with (
        VercelSimulator(CHAOS_TOKENS) as sim,
        Scenario(private_broker.url, sim, tmp_path, shutdown_timeout=60) as scenario,
    ):
        sim.add_fault(Fault(latency=30, times=5))
        await scenario.publish(5)
        worker = scenario.worker()
        worker.start()
        await wait_until(lambda: sim.in_flight == 5, timeout=30)
        worker.send(signal.SIGTERM)
        await worker.wait_for("draining", timeout=10)
        worker.send(signal.SIGTERM)
        assert await worker.wait_exit(10) == 128 + signal.SIGTERM
        assert worker.count("second signal; exiting now") == 1
        await wait_until(_queued_becomes(scenario, 5), timeout=20)
        sim.clear_faults()
        worker.start()
        report = await scenario.finish("second signal")
    assert report.delivered == 5


def _queued_becomes(scenario: Scenario, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return await scenario.queued() == count

    return check


async def test_not_ready_while_the_broker_is_down(
    private_broker: PrivateBroker, tmp_path: Path, sim: VercelSimulator, tokens_dir: Path
) -> None:
    """While the broker is stopped the worker reports not consuming (readiness), keeps
    retrying, and consumes again once the broker is back."""
    settings = private_settings(private_broker.url, sim, tokens_dir, "chaos-ready")
    vercel = VercelClient(settings.vercel_api_url)
    worker = build_worker(settings, vercel, ListLog())
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_until(lambda: worker.consuming, timeout=20)
        await asyncio.to_thread(private_broker.stop)
        await wait_until(lambda: not worker.consuming, timeout=10)
        await asyncio.sleep(1)
        assert not worker.consuming
        assert not task.done()
        await asyncio.to_thread(private_broker.start)
        await wait_until(lambda: worker.consuming, timeout=60)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await vercel.aclose()
        await _delete(worker.topology, private_broker.url)
