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
from collections.abc import Coroutine
from typing import Any

INSTALLATION = "icfg_bench"
TOKEN = "tok_bench"


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
