"""examples/typescript-publisher end to end: the Node program (amqplib with confirms, our plain
body or the CloudEvents JavaScript SDK) publishes to the real broker, a real worker relays,
and the simulator receives the translated events. Its packages come from scripts/node-tools."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractChannel

from consumer.testing.vercel_sim import VercelSimulator
from tests.helpers import AMQP_URL, wait_until

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "typescript-publisher"


async def run_example(**env: str) -> tuple[int, str, str]:
    assert (EXAMPLE / "node_modules").is_dir(), "run scripts/node-tools first"
    process = await asyncio.create_subprocess_exec(
        str(EXAMPLE / "node_modules" / ".bin" / "tsx"),
        "publish.ts",
        cwd=EXAMPLE,
        env={**os.environ, "AMQP_URL": AMQP_URL, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.mark.parametrize("event_format", ["plain", "cloudevents", "cloudevents-binary"])
async def test_typescript_events_reach_vercel_translated(
    event_format: str, start_relay: Any, sim: VercelSimulator, names: dict[str, str]
) -> None:
    """Five events published by the TypeScript example, each confirmed (printed), arrive at
    Vercel as resource.updated for their installation and resource. (One call per event:
    coalescing, which would merge these five updates of one resource, is off here.)"""
    await start_relay(coalesce=False)
    status, stdout, stderr = await run_example(
        EXCHANGE=names["exchange"],
        FORMAT=event_format,
        COUNT="5",
        INSTALLATION_ID="icfg_alpha",
        RESOURCE_ID="db_ts",
    )
    assert status == 0, stderr
    published = [line.split()[-1] for line in stdout.splitlines() if line.startswith("published")]
    assert len(published) == 5
    await wait_until(lambda: len(sim.accepted) == 5)
    for accepted in sim.accepted:
        assert accepted.installation_id == "icfg_alpha"
        assert accepted.event == {"type": "resource.updated", "resourceId": "db_ts"}


async def test_an_unroutable_typescript_publish_fails_loudly(
    names: dict[str, str], channel: AbstractChannel
) -> None:
    """With no queue bound, the example reports the event as not published and exits 1."""
    status, stdout, stderr = await run_example(EXCHANGE=names["exchange"])
    await channel.exchange_delete(names["exchange"])
    assert status == 1
    assert "no queue bound" in stderr
    assert "published" not in stdout


async def test_the_example_typechecks() -> None:
    """`tsc --noEmit` (strict) finds no type error in publish.ts."""
    process = await asyncio.create_subprocess_exec(
        str(EXAMPLE / "node_modules" / ".bin" / "tsc"),
        "--noEmit",
        cwd=EXAMPLE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, output.decode()
