"""The outbox relay's throughput and commit-to-publish latency, against the real PostgreSQL and
RabbitMQ of this machine (scripts/postgres, scripts/rabbitmq). Prints numbers; judges nothing.

    python bench/outbox_bench.py [--rows 20000] [--installations 50] [--batch 500]
                                 [--paced 200] [--rate 50] [--poll 1.0] [--json FILE]

1. Throughput: `--rows` events of `--installations` installations are committed first, then
   one relay (in this process) publishes them all; rows/s = rows / seconds from its start to
   the last row marked sent (the goal in issue 13: 5,000/s on these 2 cores).
2. Latency: `--paced` events are committed one per transaction at `--rate`/s while a relay
   runs; for each, the time from the writer's COMMIT returning to the message arriving at a
   consumer of a queue bound to the exchange, p50/p99: once woken by NOTIFY (and polling
   every `--poll` s), once polling only (every `--poll` s).

Each run has its own database and its own exchange and queue, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from consumer.contract import example_event
from consumer.logs import get_logger
from consumer.outbox.metrics import OutboxMetrics
from consumer.outbox.relay import OutboxRelay, RelayConfig
from consumer.outbox.store import init_schema
from consumer.outbox.write import add_event_psycopg_async
from tests.postgres import create_database, drop_database

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")


def body(installation: str) -> dict[str, Any]:
    event_id = f"evt_{uuid.uuid4().hex}"
    return example_event(
        "resource.renamed", id=event_id, installation_id=installation, resource_id=event_id
    )


async def fill(dsn: str, rows: int, installations: int) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        for start in range(0, rows, 1000):
            for n in range(start, min(rows, start + 1000)):
                await add_event_psycopg_async(connection, body(f"icfg_{n % installations}"))
            await connection.commit()


async def unsent(connection: Any) -> int:
    cursor = await connection.execute("SELECT count(*) FROM vercel_outbox WHERE sent_at IS NULL")
    row = await cursor.fetchone()
    return int(row[0]) if row else 0


class Relay:
    def __init__(self, config: RelayConfig) -> None:
        self.relay = OutboxRelay(config, OutboxMetrics(), get_logger("bench"))
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Relay:
        self.task = asyncio.create_task(self.relay.run(self.stop))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        assert self.task is not None
        await self.task


async def throughput(config: RelayConfig, rows: int, installations: int) -> dict[str, Any]:
    await fill(config.dsn, rows, installations)
    started = time.perf_counter()
    cpu = time.process_time()
    async with (
        Relay(config),
        await psycopg.AsyncConnection.connect(config.dsn, autocommit=True) as watcher,
    ):
        while await unsent(watcher):  # noqa: ASYNC110 - polling the database
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - started
    return {
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_second": round(rows / seconds),
        "cpu_seconds_per_1k": round((time.process_time() - cpu) / rows * 1000, 3),
    }


async def latency(config: RelayConfig, queue: Any, count: int, rate: float) -> dict[str, Any]:
    arrived: dict[str, float] = {}

    async def on_message(message: Any) -> None:
        arrived[orjson.loads(message.body)["id"]] = time.perf_counter()
        await message.ack()

    tag = await queue.consume(on_message)
    committed: dict[str, float] = {}
    async with Relay(config), await psycopg.AsyncConnection.connect(config.dsn) as connection:
        await asyncio.sleep(0.5)  # the listener is in place
        for n in range(count):
            event = body(f"icfg_{n % 10}")
            await add_event_psycopg_async(connection, event)
            await connection.commit()
            committed[event["id"]] = time.perf_counter()
            await asyncio.sleep(1 / rate)
        deadline = time.monotonic() + 60
        while len(arrived) < count and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)
    await queue.cancel(tag)
    waits = sorted((arrived[i] - t) * 1000 for i, t in committed.items() if i in arrived)
    return {
        "events": count,
        "arrived": len(waits),
        "p50_ms": round(statistics.median(waits), 1),
        "p99_ms": round(waits[min(len(waits) - 1, int(len(waits) * 0.99))], 1),
        "max_ms": round(waits[-1], 1),
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    dsn = await asyncio.to_thread(create_database)
    suffix = uuid.uuid4().hex[:8]
    exchange_name, queue_name = f"bench-outbox-{suffix}", f"bench-outbox-q-{suffix}"
    connection = await aio_pika.connect(AMQP_URL)
    try:
        await init_schema(dsn)
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(queue_name, durable=True)
        await queue.bind(exchange, "#")
        base = RelayConfig(
            dsn=dsn,
            amqp_url=AMQP_URL,
            exchange=exchange_name,
            dead_letter_queue=f"{queue_name}.dlq",
            batch_size=args.batch,
            poll_interval=args.poll,
        )
        results: dict[str, Any] = {"batch": args.batch, "load_average": os.getloadavg()[0]}
        print(f"load average at the start: {results['load_average']:.1f}", flush=True)
        results["throughput"] = await throughput(base, args.rows, args.installations)
        print(f"throughput: {json.dumps(results['throughput'])}", flush=True)
        await queue.purge()
        results["latency_notify"] = await latency(base, queue, args.paced, args.rate)
        print(f"latency with NOTIFY: {json.dumps(results['latency_notify'])}", flush=True)
        results["latency_polling"] = await latency(
            replace(base, listen=False), queue, args.paced, args.rate
        )
        print(
            f"latency polling only (every {args.poll} s): {json.dumps(results['latency_polling'])}",
            flush=True,
        )
        await channel.queue_delete(queue_name)
        await channel.exchange_delete(exchange_name)
        return results
    finally:
        await connection.close()
        await asyncio.to_thread(drop_database, dsn)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--installations", type=int, default=50)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--paced", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--poll", type=float, default=1.0)
    parser.add_argument("--json", type=Path)
    arguments = parser.parse_args()
    figures = asyncio.run(main(arguments))
    if arguments.json:
        arguments.json.write_text(json.dumps(figures, indent=2))
