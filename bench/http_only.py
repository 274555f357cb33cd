"""The HTTP-client ceiling: N Create Event POSTs to the simulator, C in flight, no broker.

    python bench/http_only.py --sim-url URL --messages N [--concurrency C] [--client NAME]

`--client` picks what sends them (one client, built once, C workers sharing it): `vercel`
(default), the relay's own `VercelClient`, timeout and answer mapping included: the relay's
HTTP half exactly; or a plain client, as `_contender.open_client` describes: `httpx`,
`httpx-limits`, `httpx-aiohttp`, `aiohttp`. Each request is what the relay sends for one
`resource.renamed` event.
"""

from __future__ import annotations

import asyncio
import itertools
from contextlib import AsyncExitStack

import orjson
from _contender import (
    INSTALLATION,
    PLAIN_CLIENTS,
    TOKEN,
    Post,
    open_client,
    parse_args,
    ready_then_go,
    run,
)

from consumer.contract import example_event, parse_event
from consumer.translate import VercelRequest, translate
from consumer.vercel import VercelClient


async def open_sender(stack: AsyncExitStack, client: str, url: str, concurrency: int) -> Post:
    if client != "vercel":
        return await open_client(stack, client, url, concurrency)
    vercel = VercelClient(url, max_connections=concurrency)
    stack.push_async_callback(vercel.aclose)

    async def send_vercel(request: VercelRequest) -> None:
        await vercel.send(request, TOKEN)

    return send_vercel


async def post_all(client: str, url: str, messages: int, concurrency: int) -> None:
    event = orjson.dumps(example_event(installation_id=INSTALLATION))
    template = parse_event(event, max_bytes=len(event))
    counter = itertools.count()

    async def worker(send: Post) -> None:
        while (index := next(counter)) < messages:
            await send(translate(template.model_copy(update={"resource_id": f"res_{index}"})))

    async with AsyncExitStack() as stack:
        send = await open_sender(stack, client, url, concurrency)
        await ready_then_go()
        await asyncio.gather(*(worker(send) for _ in range(concurrency)))
        await asyncio.Event().wait()  # until the bench terminates us


if __name__ == "__main__":
    clients = ("vercel", *PLAIN_CLIENTS)
    args = parse_args(__doc__, ("--client", {"default": "vercel", "choices": clients}))
    run(
        post_all(args.client, args.sim_url, args.messages, args.concurrency),
        use_uvloop=args.uvloop,
    )
