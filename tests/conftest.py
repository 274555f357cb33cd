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
import io
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection

from consumer import amqptables
from consumer.app import build_worker
from consumer.health import HealthServer
from consumer.logs import configure_logging, get_logger
from consumer.metrics import Metrics
from consumer.otel import NO_TRACER, Tracer
from consumer.publish.publisher import EventPublisher
from consumer.settings import load_settings
from consumer.testing.vercel_sim import VercelSimulator
from consumer.vercel import VercelClient
from tests.brokers import VERSION, PrivateBroker
from tests.chaos import REPORTS
from tests.helpers import (
    AMQP_URL,
    BROKER_FIXTURES,
    PRIVATE_BROKER_PORT,
    TOKENS,
    Relay,
    delete_topology,
    wait_until,
)


def pytest_configure(config: pytest.Config) -> None:
    # The test session is an entry point too: its in-process workers and readers decode as
    # `vercel-consumer` does (consumer/amqptables.py).
    amqptables.install()
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


@pytest.fixture
async def publisher(names: dict[str, str], start_relay: Any) -> AsyncIterator[EventPublisher]:
    async with await EventPublisher.connect(AMQP_URL, exchange=names["exchange"]) as pub:
        yield pub
