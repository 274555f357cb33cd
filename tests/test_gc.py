"""The worker's start-up heap is frozen: full collections do not walk it while it relays."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from pathlib import Path

from consumer.app import serve
from consumer.settings import load_settings
from tests.helpers import wait_until


async def test_serve_freezes_what_it_built_before_consuming(tokens_dir: Path) -> None:
    """Before the worker starts its broker sessions, every object alive (the imported
    libraries, the worker's collaborators: tens of thousands) is moved to the permanent
    generation, so that a full collection on the hot path does not walk them: those walks
    stalled the event loop for 50-170 ms (the bench's paced p99)."""
    gc.unfreeze()
    settings = load_settings(
        amqp_url="amqp://guest:guest@127.0.0.1:1/",  # nothing listens: it keeps retrying
        vercel_tokens_dir=tokens_dir,
        health_port=0,
    )
    task = asyncio.create_task(serve(settings))
    try:
        await wait_until(lambda: gc.get_freeze_count() > 10_000)
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # serve's own handler: a clean stop
        await asyncio.wait_for(task, 10)
        gc.unfreeze()
