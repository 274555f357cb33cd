"""What a node restart costs with many quorum queues or few: the retry-tier count question.

The relay declares one quorum queue per retry tier (6 delays x 5 jitter spreads = 30, plus the
work queue and the DLQ). This starts a private node of its own (tests/brokers.py), declares N
queues shaped like ours (quorum, at-least-once dead-lettering, TTL), each holding a few
messages, then restarts the node and times: the shutdown, the start until the AMQP handshake,
and until every queue has a leader again (a publish with confirm to each succeeds). Prints a
table; asserts nothing. Run as root on a machine with scripts/rabbitmq's install:

    .venv/bin/python bench/queue_count_bench.py --version 4.0 --port 5711 --counts 2,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import aio_pika

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.brokers import BrokerVersion, PrivateBroker

MESSAGES_PER_QUEUE = 10


def queue_arguments(index: int) -> dict[str, object]:
    base: dict[str, object] = {"x-queue-type": "quorum"}
    if index == 0:
        return base
    return {
        **base,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": "qcount-0",
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
        "x-message-ttl": 3_600_000,
    }


async def declare_and_fill(url: str, count: int) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel(publisher_confirms=True)
        for index in range(count):
            name = f"qcount-{index}"
            await channel.declare_queue(name, durable=True, arguments=queue_arguments(index))
            for _ in range(MESSAGES_PER_QUEUE):
                await channel.default_exchange.publish(
                    aio_pika.Message(b"x" * 200, delivery_mode=2), routing_key=name
                )


async def all_have_leaders(url: str, count: int) -> None:
    """Until a confirmed publish to every queue succeeds (each needs its Raft leader)."""
    while True:
        try:
            async with await aio_pika.connect(url) as connection:
                channel = await connection.channel(publisher_confirms=True)
                for index in range(count):
                    await channel.default_exchange.publish(
                        aio_pika.Message(b"probe"), routing_key=f"qcount-{index}", mandatory=True
                    )
                return
        except Exception:
            await asyncio.sleep(0.1)


async def delete_all(url: str, count: int) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for index in range(count):
            await channel.queue_delete(f"qcount-{index}")


def measure(broker: PrivateBroker, count: int) -> tuple[float, float, float]:
    asyncio.run(declare_and_fill(broker.url, count))
    started = time.monotonic()
    broker.stop()
    stopped = time.monotonic()
    broker.start(timeout=300)
    answering = time.monotonic()
    asyncio.run(all_have_leaders(broker.url, count))
    led = time.monotonic()
    asyncio.run(delete_all(broker.url, count))
    return stopped - started, answering - stopped, led - answering


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", choices=[v.value for v in BrokerVersion], default="4.0")
    parser.add_argument("--port", type=int, default=5711)
    parser.add_argument("--counts", default="2,8,32")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    broker = PrivateBroker(args.port, "queue-count-bench", version=BrokerVersion(args.version))
    broker.start(timeout=300)
    print(f"RabbitMQ {args.version}, {MESSAGES_PER_QUEUE} messages in each queue")
    print("queues | round | shutdown s | start to handshake s | handshake to all led s | total s")
    try:
        for count in (int(part) for part in args.counts.split(",")):
            for round_number in range(1, args.rounds + 1):
                stop, start, lead = measure(broker, count)
                total = stop + start + lead
                print(
                    f"{count:6} | {round_number:5} | {stop:10.1f} | {start:20.1f} |"
                    f" {lead:22.1f} | {total:7.1f}"
                )
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
