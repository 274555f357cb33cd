"""Helpers the tests share: the brokers' URLs, polling, the CLI as a subprocess, a running
relay's handle, scraping /metrics, events, queues. Fixtures are in conftest.py."""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from prometheus_client.parser import text_string_to_metric_families

from consumer.contract import example_event
from consumer.deadletter import FRAME_MAX, header_frame_bytes
from consumer.metrics import Metrics
from consumer.nesting import DeepValue
from consumer.settings import Settings, load_settings
from consumer.testing.vercel_sim import VercelSimulator
from consumer.topology import Topology
from consumer.worker import Worker
from tests.brokers import SHARED_PORT, shared_ctl
from tests.chaos import CHAOS_TOKENS

AMQP_URL = os.environ.get("TEST_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{SHARED_PORT}/")


# Port of the private node that fault tests break. Developers running test sessions side by side
# on one machine give each session its own (the node is stopped when a session ends).
PRIVATE_BROKER_PORT = int(os.environ.get("TEST_PRIVATE_BROKER_PORT", "5673"))


# The simulator's installations and tokens; the chaos scenarios use the same ones.
TOKENS = CHAOS_TOKENS


async def wait_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = 20.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
    interval: float = 0.02,
) -> None:
    """Poll `predicate` (plain or async) until it holds; fail clearly at the deadline."""
    deadline = time.monotonic() + timeout
    while not await _holds(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def _holds(predicate: Callable[[], bool | Awaitable[bool]]) -> bool:
    result = predicate()
    return await result if inspect.isawaitable(result) else result


def broker_connections(*columns: str) -> list[list[str]]:
    """`rabbitmqctl list_connections COLUMNS` on the shared broker: one row of fields each."""
    listing = shared_ctl("-s", "list_connections", *columns).stdout
    return [line.split("\t") for line in listing.splitlines()]


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m consumer ARGS` as an operator would; `env` replaces the environment."""
    return subprocess.run(
        [sys.executable, "-m", "consumer", *args],
        env=env if env is not None else {**os.environ, "CONSUMER_AMQP_URL": AMQP_URL},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# Fixtures that reach a broker: a test using one (directly or through another) is `broker`.
# `tls_node` (tests/test_tls.py) and `cluster` (tests/test_cluster.py) start nodes of the
# selected version too; test_tls.py's tests of the settings alone use neither and run once.
BROKER_FIXTURES = frozenset(
    {"amqp", "channel", "private_node", "private_broker", "start_relay", "tls_node", "cluster"}
)


def private_settings(
    url: str, sim: VercelSimulator, tokens_dir: Path, prefix: str, **overrides: Any
) -> Settings:
    """Settings for a worker of this test on broker `url` (a private node, say), with a
    topology of its own named `<prefix>-<random>`."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    return load_settings(
        amqp_url=url,
        vercel_api_url=sim.url,
        vercel_tokens_dir=tokens_dir,
        exchange=name,
        queue=name,
        **overrides,
    )


@dataclass
class Relay:
    """A worker running in this event loop against the real broker and the simulator."""

    settings: Settings
    worker: Worker
    topology: Topology
    logs: io.BytesIO
    task: asyncio.Task[None]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    metrics: Metrics = field(default_factory=Metrics)

    async def shutdown(self) -> None:
        self.stop.set()
        await asyncio.wait_for(self.task, 30)

    def log_text(self) -> str:
        return self.logs.getvalue().decode()


async def delete_topology(
    amqp: AbstractConnection, names: dict[str, str], topologies: list[Topology]
) -> None:
    """Delete the work queue, the DLQ, the exchange and the retry tiers of `topologies`."""
    channel = await amqp.channel()
    queues = {names["queue"], f"{names['queue']}.dlq"}
    for topology in topologies:
        queues.update(topology.retry_queue(ms) for ms in topology.retry_tiers_ms)
    for queue in queues:
        await channel.queue_delete(queue)
    await channel.exchange_delete(names["exchange"])


async def get_json(url: str) -> tuple[int, dict[str, Any]]:
    """GET a JSON endpoint: (status, body)."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.json()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(base_url: str) -> Samples:
    """GET /metrics and parse it with prometheus_client's parser: {(name, labels): value}."""
    async with aiohttp.ClientSession() as session, session.get(f"{base_url}/metrics") as answer:
        assert answer.status == 200
        text = await answer.text()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: Samples, name: str, **labels: str) -> float | None:
    """The value of one series, None when it is not exposed."""
    return samples.get((name, frozenset(labels.items())))


def event(event_type: str = "resource.renamed", **fields: Any) -> dict[str, Any]:
    """A valid event for installation icfg_alpha with a fresh id (and, for a resource event,
    a fresh resource id: events about distinct resources are never coalesced)."""
    values = {"id": f"evt_{uuid.uuid4().hex[:12]}", "installation_id": "icfg_alpha", **fields}
    if event_type.startswith("resource.") and "resource_id" not in fields:
        values["resource_id"] = f"res_{uuid.uuid4().hex[:12]}"
    return example_event(event_type, **values)


async def drain_queue(channel: AbstractChannel, queue: str) -> list[AbstractIncomingMessage]:
    """Take every message from `queue` (acking it) and return them in order."""
    declared = await channel.get_queue(queue, ensure=False)
    messages = []
    while (message := await declared.get(fail=False, no_ack=True)) is not None:
        messages.append(message)
    return messages


async def wait_for_dead_letters(
    channel: AbstractChannel,
    queue: str,
    count: int,
    timeout: float = 20.0,  # noqa: ASYNC109 - a polling deadline, not a cancellation scope
) -> list[AbstractIncomingMessage]:
    """Collect `count` dead letters from `<queue>.dlq`, waiting for them to arrive."""
    collected: list[AbstractIncomingMessage] = []
    deadline = time.monotonic() + timeout
    while len(collected) < count:
        collected += await drain_queue(channel, f"{queue}.dlq")
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(collected)} of {count} dead letters within {timeout} s")
        await asyncio.sleep(0.05)
    return collected


def nested(levels: int, *, tables: bool = False) -> DeepValue:
    """A header value of `levels` arrays (5 bytes each on the wire) or tables with an empty key
    (6 bytes) each inside the next, built as bytes without recursion."""
    inner = b"\x00\x00\x00\x00"
    for _ in range(levels - 1):
        entry = b"\x00F" + inner if tables else b"A" + inner
        inner = len(entry).to_bytes(4, "big") + entry
    return DeepValue.parse((b"F" if tables else b"A") + inner)


def deepest_fitting(make: Callable[[DeepValue], aio_pika.Message]) -> int:
    """The most arrays nested in one another that a `make(value)` message's header frame can
    hold within FRAME_MAX, RabbitMQ's default frame_max (the shared broker's)."""
    base = header_frame_bytes(make(nested(1)))
    levels = 1 + (FRAME_MAX - base) // 5
    assert header_frame_bytes(make(nested(levels))) <= FRAME_MAX
    assert header_frame_bytes(make(nested(levels + 1))) > FRAME_MAX
    return levels
