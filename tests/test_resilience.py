"""The worker's lifecycle under single, targeted faults: each test pins down one behaviour
(and, where one was found, the bug it fixed). The broker-breaking ones use the private node."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from consumer.errors import BrokerError
from consumer.topology import Topology, broker_errors, connect, open_channel
from consumer.worker import Worker
from tests.conftest import AMQP_URL, wait_until


class ListLog:
    """A stand-in for the structlog logger that keeps (event, fields) pairs."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    info = warning = error = exception = debug = _record


async def _ack(message: AbstractIncomingMessage) -> None:
    await message.ack()


async def _delete(names: dict[str, str], tiers_ms: tuple[int, ...]) -> None:
    topology = Topology(names["exchange"], names["queue"], tiers_ms)
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel()
        for queue in (topology.queue, topology.dead_letter_queue):
            await channel.queue_delete(queue)
        for delay_ms in tiers_ms:
            await channel.queue_delete(topology.retry_queue(delay_ms))
        await channel.exchange_delete(topology.exchange)


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
    worker = Worker(
        connect=connect_closing_the_first,
        topology=Topology(names["exchange"], names["queue"], (100,)),
        make_handler=lambda channel: _ack,
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
        await _delete(names, (100,))
