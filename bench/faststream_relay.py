"""Contender (b): the relay as a Python user would write it with FastStream's RabbitMQ broker.

    python bench/faststream_relay.py --queue Q --sim-url URL [--concurrency C] [--client C]

Written the way FastStream's documentation shows it: a `RabbitBroker` whose channel has
`prefetch_count=C` (aio-pika runs each delivery as its own task, so C are handled at once), a
`@broker.subscriber` on the existing quorum queue (`declare=False`: the bench declared it with
its dead-letter arguments), FastStream's default ack policy (ack after the handler returns,
reject on an exception), its per-message logging off (`logger=None`), and one shared HTTP
client at its documented best settings for C requests in flight:

- `--client httpx`: `httpx.AsyncClient(limits=httpx.Limits(max_connections=C,
  max_keepalive_connections=C))`;
- `--client aiohttp` (default): `aiohttp.ClientSession(connector=TCPConnector(limit=C))`.

The handler parses and translates with the relay's own contract and translation, so only the
framework and the HTTP client differ from the relay.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from _contender import open_client, parse_args, ready_then_go, run
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from consumer.contract import parse_event
from consumer.translate import translate


async def main(url: str, queue: str, sim_url: str, concurrency: int, client: str) -> None:
    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=concurrency), logger=None)
    async with AsyncExitStack() as stack:
        # "httpx" at its documented best: limits sized to C (see _contender.open_client).
        plain = "httpx-limits" if client == "httpx" else client
        post = await open_client(stack, plain, sim_url, concurrency)

        @broker.subscriber(RabbitQueue(queue, queue_type=QueueType.QUORUM, declare=False))
        async def relay(message: RabbitMessage) -> None:
            await post(translate(parse_event(message.body, max_bytes=256 * 1024)))

        await broker.connect()
        stack.push_async_callback(broker.stop)
        await ready_then_go()
        await broker.start()
        await asyncio.Event().wait()  # until the bench terminates us


if __name__ == "__main__":
    args = parse_args(
        __doc__, ("--client", {"default": "aiohttp", "choices": ("httpx", "aiohttp")})
    )
    run(
        main(args.amqp_url, args.queue, args.sim_url, args.concurrency, args.client),
        use_uvloop=args.uvloop,
    )
