"""Shared fixtures: a real RabbitMQ (started by scripts/rabbitmq), the simulator, a relay.

`TEST_BROKER_VERSION=4.0` runs every broker-facing test against RabbitMQ 4.0 (shared node on
5674, private nodes in the chroot, see tests/brokers.py) instead of 3.10; such tests are marked
`broker` at collection (they use a broker fixture, or their module says so), so CI can run
`-m broker` a second time on the other version.

Every test gets its own exchange and queue names, so tests never see each other's messages,
and everything a test declared is deleted afterwards.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage
from prometheus_client.parser import text_string_to_metric_families

from consumer.app import build_worker
from consumer.contract import example_event
from consumer.health import HealthServer
from consumer.logs import configure_logging, get_logger
from consumer.metrics import Metrics
from consumer.otel import NO_TRACER, Tracer
from consumer.publish.publisher import EventPublisher
from consumer.settings import Settings, load_settings
from consumer.testing.vercel_sim import VercelSimulator
from consumer.topology import Topology
from consumer.vercel import VercelClient
from consumer.worker import Worker
from tests.brokers import SHARED_PORT, VERSION, PrivateBroker, shared_ctl
from tests.chaos import REPORTS

AMQP_URL = os.environ.get("TEST_AMQP_URL", f"amqp://guest:guest@127.0.0.1:{SHARED_PORT}/")
# Port of the private node that fault tests break. Developers running test sessions side by side
# on one machine give each session its own (the node is stopped when a session ends).
PRIVATE_BROKER_PORT = int(os.environ.get("TEST_PRIVATE_BROKER_PORT", "5673"))
TOKENS = {"icfg_alpha": "tok_alpha_s3cr3t", "icfg_beta": "tok_beta_s3cr3t"}


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
BROKER_FIXTURES = frozenset({"amqp", "channel", "private_node", "private_broker", "start_relay"})


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "broker: talks to RabbitMQ (runs once per version in CI)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a broker fixture `broker` (modules that reach the broker
    without one set `pytestmark = pytest.mark.broker` themselves)."""
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def pytest_report_header() -> str:
    return f"broker: RabbitMQ {VERSION} ({AMQP_URL.split('@')[-1]})"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Print each chaos scenario's numbers (published, delivered, lost, ...) after the run."""
    if REPORTS:
        terminalreporter.section("chaos scenarios")
        for report in REPORTS:
            terminalreporter.write_line(report.line())


@pytest.fixture
async def amqp() -> AsyncIterator[AbstractConnection]:
    try:
        connection = await aio_pika.connect(AMQP_URL)
    except Exception as exc:  # pragma: no cover - environment problem, said plainly
        pytest.fail(f"RabbitMQ is not reachable at {AMQP_URL} ({exc}); run scripts/rabbitmq")
    async with connection:
        yield connection


@pytest.fixture
async def channel(amqp: AbstractConnection) -> AbstractChannel:
    return await amqp.channel()


@pytest.fixture(scope="session")
def private_node() -> Iterator[PrivateBroker]:
    """A RabbitMQ node of its own, for tests that stop, restart or cut off the broker. Left
    running if it was already (another test session on this machine may be using it)."""
    broker = PrivateBroker(port=PRIVATE_BROKER_PORT, version=VERSION)
    was_running = broker.is_ready()
    broker.start()
    yield broker
    if not was_running:
        broker.stop()


@pytest.fixture
def private_broker(private_node: PrivateBroker) -> PrivateBroker:
    """The private node, up and healthy for this test (an earlier one may have broken it)."""
    private_node.ensure_healthy()
    return private_node


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


@pytest.fixture
async def outbox_dsn() -> AsyncIterator[str]:
    """A database of this test's own on the real PostgreSQL, with the outbox schema."""
    from consumer.outbox.store import init_schema
    from tests.postgres import create_database, drop_database

    dsn = await asyncio.to_thread(create_database)
    await init_schema(dsn)
    yield dsn
    await asyncio.to_thread(drop_database, dsn)


@pytest.fixture
def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on (the health endpoint's, say)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def names() -> dict[str, str]:
    suffix = uuid.uuid4().hex[:10]
    return {"exchange": f"test-events-{suffix}", "queue": f"test-q-{suffix}"}


@pytest.fixture
async def sim() -> AsyncIterator[VercelSimulator]:
    async with VercelSimulator(dict(TOKENS)) as simulator:
        yield simulator


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


@pytest.fixture
def tokens_dir(tmp_path: Path) -> Path:
    """A Kubernetes-Secret-shaped directory holding the simulator's tokens."""
    directory = tmp_path / "tokens"
    directory.mkdir()
    for installation_id, token in TOKENS.items():
        (directory / installation_id).write_text(token)
    return directory


@pytest.fixture
async def start_relay(
    sim: VercelSimulator, names: dict[str, str], amqp: AbstractConnection, tokens_dir: Path
) -> AsyncIterator[Callable[..., Awaitable[Relay]]]:
    """Start a relay and wait until it consumes; keyword arguments override settings."""
    relays: list[Relay] = []
    clients: list[VercelClient] = []

    async def start(
        wait_consuming: bool = True, tracer: Tracer = NO_TRACER, **overrides: Any
    ) -> Relay:
        values: dict[str, Any] = {
            "amqp_url": AMQP_URL,
            "vercel_api_url": sim.url,
            "retry_delays": (0.2, 0.4),
            "max_attempts": 4,
            "concurrency": 16,
            "http_timeout": 2.0,
            "shutdown_timeout": 5.0,
            "vercel_tokens_dir": tokens_dir,
            **names,
        }
        values.update(overrides)
        settings = load_settings(**values)
        logs = io.BytesIO()
        configure_logging("json", "debug", stream=logs)
        vercel = VercelClient(settings.vercel_api_url, timeout=settings.http_timeout)
        clients.append(vercel)
        metrics = Metrics()
        worker = build_worker(settings, vercel, get_logger("test"), metrics, tracer)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        relay = Relay(settings, worker, worker.topology, logs, task, stop, metrics)
        relays.append(relay)
        if wait_consuming:
            await wait_until(lambda: worker.consuming)
        return relay

    yield start
    for relay in relays:
        await relay.shutdown()
    for client in clients:
        await client.aclose()
    await delete_topology(amqp, names, [relay.topology for relay in relays])


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


@pytest.fixture
async def serve_health() -> AsyncIterator[Callable[[Relay], Awaitable[HealthServer]]]:
    """Serve a relay's /livez, /readyz and /metrics on a free port of 127.0.0.1."""
    servers: list[HealthServer] = []

    async def serve(relay: Relay) -> HealthServer:
        server = HealthServer(relay.worker.readiness, relay.metrics)
        servers.append(server)
        await server.start("127.0.0.1", 0)
        return server

    yield serve
    for server in servers:
        await server.stop()


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


@pytest.fixture
async def publisher(names: dict[str, str], start_relay: Any) -> AsyncIterator[EventPublisher]:
    async with await EventPublisher.connect(AMQP_URL, exchange=names["exchange"]) as pub:
        yield pub


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
