"""The broker ceiling: consume + ack the preloaded queue with aio-pika, no HTTP, no parsing.

    python bench/broker_only.py --queue Q --messages N [--concurrency C] [--uvloop]

A callback consumer with prefetch C on one channel acks each delivery at once, as the relay's
worker consumes (a task per delivery, prefetch = concurrency). Prints `done` after N acks.
"""

from __future__ import annotations

import asyncio

import aio_pika
from _contender import parse_args, ready_then_go, run
from aio_pika.abc import AbstractIncomingMessage


async def consume_and_ack(url: str, queue_name: str, messages: int, prefetch: int) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        queue = await channel.get_queue(queue_name)
        acked = 0
        finished = asyncio.Event()

        async def ack(message: AbstractIncomingMessage) -> None:
            nonlocal acked
            await message.ack()
            acked += 1
            if acked == messages:
                finished.set()

        await ready_then_go()
        await queue.consume(ack)
        await finished.wait()
        print("done", flush=True)
        await asyncio.Event().wait()  # until the bench terminates us


if __name__ == "__main__":
    args = parse_args(__doc__)
    run(
        consume_and_ack(args.amqp_url, args.queue, args.messages, args.concurrency),
        use_uvloop=args.uvloop,
    )
