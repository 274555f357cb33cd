"""The HTTP-client ceiling: N Create Event POSTs to the simulator, C in flight, no broker.

    python bench/http_only.py --sim-url URL --messages N [--concurrency C] [--client NAME]

`--client` picks what sends them (one client, built once, C workers sharing it):

- `vercel` (default): the relay's own `VercelClient` (httpx's API on aiohttp's pool, the
  timeout and answer mapping included): the relay's HTTP half exactly.
- `httpx`: `httpx.AsyncClient()` as it comes (httpcore's pool, 100 connections, 20 kept alive).
- `httpx-limits`: httpx on httpcore with `Limits(max_connections=C, max_keepalive_connections=C)`.
- `httpx-aiohttp`: httpx's API on httpx-aiohttp's `AiohttpTransport`, a plain `post()`.
- `aiohttp`: `aiohttp.ClientSession` with `TCPConnector(limit=C)`, `post()` and `read()`.

Each request is what the relay sends for one `resource.renamed` event.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import aiohttp
import httpx
import orjson
from _contender import INSTALLATION, TOKEN, parse_args, ready_then_go, run
from httpx_aiohttp import AiohttpTransport

from consumer.contract import example_event, parse_event
from consumer.translate import VercelRequest, translate
from consumer.vercel import VercelClient

Send = Callable[[VercelRequest], Awaitable[None]]
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
CLIENTS = ("vercel", "httpx", "httpx-limits", "httpx-aiohttp", "aiohttp")


async def open_sender(stack: AsyncExitStack, client: str, url: str, concurrency: int) -> Send:
    """A function that POSTs one request with the chosen client; closed with `stack`."""
    if client == "vercel":
        vercel = VercelClient(url, max_connections=concurrency)
        stack.push_async_callback(vercel.aclose)

        async def send_vercel(request: VercelRequest) -> None:
            await vercel.send(request, TOKEN)

        return send_vercel
    if client == "aiohttp":
        connector = aiohttp.TCPConnector(limit=concurrency)
        session = aiohttp.ClientSession(url, connector=connector, headers=HEADERS)
        await stack.enter_async_context(session)

        async def send_aiohttp(request: VercelRequest) -> None:
            async with session.post(request.path, data=request.body) as response:
                await response.read()
                response.raise_for_status()

        return send_aiohttp
    http = await stack.enter_async_context(httpx_client(client, url, concurrency))

    async def send_httpx(request: VercelRequest) -> None:
        (await http.post(request.path, content=request.body)).raise_for_status()

    return send_httpx


def httpx_client(client: str, url: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if client == "httpx":
        return httpx.AsyncClient(base_url=url, headers=HEADERS)
    if client == "httpx-limits":
        return httpx.AsyncClient(base_url=url, headers=HEADERS, limits=limits)
    if client == "httpx-aiohttp":
        transport = AiohttpTransport(limits=limits)
        return httpx.AsyncClient(base_url=url, headers=HEADERS, transport=transport)
    raise SystemExit(f"unknown client {client!r}; one of {', '.join(CLIENTS)}")


async def post_all(client: str, url: str, messages: int, concurrency: int) -> None:
    event = orjson.dumps(example_event(installation_id=INSTALLATION))
    template = parse_event(event, max_bytes=len(event))
    counter = itertools.count()

    async def worker(send: Send) -> None:
        while (index := next(counter)) < messages:
            await send(translate(template.model_copy(update={"resource_id": f"res_{index}"})))

    async with AsyncExitStack() as stack:
        send = await open_sender(stack, client, url, concurrency)
        await ready_then_go()
        await asyncio.gather(*(worker(send) for _ in range(concurrency)))
        await asyncio.Event().wait()  # until the bench terminates us


if __name__ == "__main__":
    args = parse_args(__doc__, ("--client", {"default": "vercel", "choices": CLIENTS}))
    run(
        post_all(args.client, args.sim_url, args.messages, args.concurrency),
        use_uvloop=args.uvloop,
    )
