"""EventPublisher throughput: confirmed events per second into a quorum queue.

    python bench/publisher_bench.py [--messages N] [--in-flight C ...] [--amqp-url URL] [--uvloop]

For each in-flight bound C: a fresh quorum queue bound to a fresh topic exchange, N valid
events published with `publish_many` (contract check, persistent, mandatory, confirms), the
time until the last confirm, and the queue's count afterwards (which must equal N). The same
with aio-pika alone (no contract check, no reconnect, no per-id lock: `exchange.publish` of a
prepared message, C at once) says what the publisher's own layer costs. Prints one line per
C and the machine's load average, since the figures depend on what else runs, and the
client's own CPU seconds per 1,000 messages, which depend much less on it (the broker's CPU
is not counted: on a shared broker it is not ours alone).
Target (issue 12): at least 5,000 confirmed msg/s with a quorum queue on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import aio_pika
import orjson

from consumer.publish.publisher import EventPublisher

TARGET = 5000
Publish = Callable[[str, str, list[dict[str, str]], int], Awaitable[None]]


def events(count: int) -> list[dict[str, str]]:
    now = datetime.now(UTC).isoformat()
    return [
        {
            "id": f"evt_{uuid.uuid4().hex}",
            "type": "resource.renamed",
            "occurred_at": now,
            "installation_id": "icfg_bench",
            "resource_id": f"res_{n}",
        }
        for n in range(count)
    ]


async def with_publisher(url: str, exchange: str, batch: list[dict[str, str]], c: int) -> None:
    async with await EventPublisher.connect(url, exchange=exchange, max_in_flight=c) as pub:
        await pub.publish_many(batch)


async def with_aio_pika(url: str, exchange: str, batch: list[dict[str, str]], c: int) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        slots = asyncio.Semaphore(c)

        async def one(event: dict[str, str]) -> None:
            async with slots:
                message = aio_pika.Message(orjson.dumps(event), message_id=event["id"])
                await target.publish(message, routing_key=event["type"], mandatory=True)

        await asyncio.gather(*(one(event) for event in batch))


async def measure(url: str, messages: int, in_flight: int, publish: Publish) -> tuple[float, int]:
    """(confirmed msg/s, messages counted in the queue afterwards)."""
    suffix = uuid.uuid4().hex[:8]
    exchange_name, queue_name = f"bench-pub-{suffix}", f"bench-pub-{suffix}"
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, "resource.#")
        batch = events(messages)
        started, cpu_started = time.perf_counter(), time.process_time()
        await publish(url, exchange_name, batch, in_flight)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        counted = await queue_count(channel, queue_name, messages)
        await channel.queue_delete(queue_name)
        await channel.exchange_delete(exchange_name)
    return messages / elapsed, cpu / messages * 1000, counted


async def queue_count(channel: aio_pika.abc.AbstractChannel, name: str, expected: int) -> int:
    """The queue's message count, polled for a few seconds (quorum counts lag)."""
    count = 0
    for _ in range(50):
        declared = await channel.declare_queue(name, passive=True)
        count = declared.declaration_result.message_count or 0
        if count >= expected:
            break
        await asyncio.sleep(0.2)
    return count


CONTENDERS: tuple[tuple[str, Publish], ...] = (
    ("EventPublisher", with_publisher),
    ("aio-pika alone", with_aio_pika),
)


async def main(args: argparse.Namespace) -> None:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average before: {load} ({os.cpu_count()} cores)")
    for in_flight in args.in_flight:
        for name, publish in (
            ("EventPublisher", with_publisher),
            ("aio-pika alone", with_aio_pika),
        ):
            rate, cpu, counted = await measure(args.amqp_url, args.messages, in_flight, publish)
            verdict = "met" if rate >= TARGET else "NOT met"
            print(
                f"{name:<15} in flight {in_flight:>5}: {args.messages} confirmed, queue count"
                f" {counted}, {rate:,.0f} msg/s (target {TARGET:,}: {verdict}); client CPU"
                f" {cpu:.3f} s per 1,000 (one free core: at most {1000 / cpu:,.0f} msg/s)"
            )
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    print(f"load average after: {load}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--uvloop", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = parse_args()
    if arguments.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(arguments))
