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
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import aiohttp
import httpx
from _contender import TOKEN, parse_args, ready_then_go, run
from faststream.rabbit import Channel, QueueType, RabbitBroker, RabbitQueue
from faststream.rabbit.annotations import RabbitMessage

from consumer.contract import parse_event
from consumer.translate import VercelRequest, translate

HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
Post = Callable[[VercelRequest], Awaitable[None]]


async def open_client(stack: AsyncExitStack, client: str, url: str, concurrency: int) -> Post:
    """POST one request with the chosen HTTP client, raising on a non-2xx answer."""
    if client == "httpx":
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        http = httpx.AsyncClient(base_url=url, headers=HEADERS, limits=limits)
        await stack.enter_async_context(http)

        async def post_httpx(request: VercelRequest) -> None:
            (await http.post(request.path, content=request.body)).raise_for_status()

        return post_httpx
    connector = aiohttp.TCPConnector(limit=concurrency)
    session = aiohttp.ClientSession(url, connector=connector, headers=HEADERS)
    await stack.enter_async_context(session)

    async def post_aiohttp(request: VercelRequest) -> None:
        async with session.post(request.path, data=request.body) as response:
            await response.read()
            response.raise_for_status()

    return post_aiohttp


async def main(url: str, queue: str, sim_url: str, concurrency: int, client: str) -> None:
    broker = RabbitBroker(url, default_channel=Channel(prefetch_count=concurrency), logger=None)
    async with AsyncExitStack() as stack:
        post = await open_client(stack, client, sim_url, concurrency)

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
