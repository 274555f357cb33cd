"""What the bench's own contender scripts share: their command line and the start handshake.

Each contender script (`naive_relay.py`, `faststream_relay.py`, `broker_only.py`,
`http_only.py`) runs in its own process so that the bench can read its CPU time and peak RSS
from /proc. It sets itself up (connects, builds its client), prints `ready`, and starts its
timed work only when the bench writes `go` on its stdin: start-up and imports stay out of the
figures. It runs until the bench terminates it (SIGTERM), except `broker_only.py`, which
prints `done` once it has acked every message.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from consumer.translate import VercelRequest

INSTALLATION = "icfg_bench"
TOKEN = "tok_bench"
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
Post = Callable[[VercelRequest], Awaitable[None]]
PLAIN_CLIENTS = ("httpx", "httpx-limits", "httpx-aiohttp", "aiohttp")


def parse_args(doc: str, *extra: tuple[str, dict[str, Any]]) -> argparse.Namespace:
    """The options every contender takes, plus `extra` (name, add_argument keywords) pairs."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    parser.add_argument("--queue", help="the preloaded work queue")
    parser.add_argument("--sim-url", help="the simulator's base URL")
    parser.add_argument("--messages", type=int, default=0, help="how many to expect")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    for name, options in extra:
        parser.add_argument(name, **options)
    return parser.parse_args()


async def ready_then_go() -> None:
    """Tell the bench we are set up; return when it says `go` (or closes our stdin)."""
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)


def run(main: Coroutine[Any, Any, None], *, use_uvloop: bool) -> None:
    """Run `main` on asyncio's loop or uvloop until it returns or SIGTERM ends the process."""
    if use_uvloop:
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


async def open_client(stack: AsyncExitStack, client: str, url: str, concurrency: int) -> Post:
    """A function that POSTs one request with a plain HTTP client (one of PLAIN_CLIENTS),
    raising on a non-2xx answer; the client is closed with `stack`.

    - `httpx`: `httpx.AsyncClient()` as it comes (httpcore's pool: 100 connections, 20 kept).
    - `httpx-limits`: httpx with `Limits(max_connections=C, max_keepalive_connections=C)`.
    - `httpx-aiohttp`: httpx's API on httpx-aiohttp's `AiohttpTransport` with those limits.
    - `aiohttp`: `aiohttp.ClientSession` with `TCPConnector(limit=C)`, `post()` and `read()`.
    """
    if client == "aiohttp":
        connector = aiohttp.TCPConnector(limit=concurrency)
        session = aiohttp.ClientSession(url, connector=connector, headers=HEADERS)
        await stack.enter_async_context(session)

        async def post_aiohttp(request: VercelRequest) -> None:
            async with session.post(request.path, data=request.body) as response:
                await response.read()
                response.raise_for_status()

        return post_aiohttp
    http = await stack.enter_async_context(_httpx_client(client, url, concurrency))

    async def post_httpx(request: VercelRequest) -> None:
        (await http.post(request.path, content=request.body)).raise_for_status()

    return post_httpx


def _httpx_client(client: str, url: str, concurrency: int) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    if client == "httpx":
        return httpx.AsyncClient(base_url=url, headers=HEADERS)
    if client == "httpx-limits":
        return httpx.AsyncClient(base_url=url, headers=HEADERS, limits=limits)
    if client == "httpx-aiohttp":
        transport = AiohttpTransport(limits=limits)
        return httpx.AsyncClient(base_url=url, headers=HEADERS, transport=transport)
    raise SystemExit(f"unknown client {client!r}; one of {', '.join(PLAIN_CLIENTS)}")
