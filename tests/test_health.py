"""The health endpoint: /livez follows the event loop, /readyz the broker session."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import signal
import socket
import sys
import time
from typing import Any

import aio_pika
import aiohttp
import pytest
from aio_pika.abc import AbstractConnection

from consumer.app import build_worker
from consumer.health import HealthServer, LoopMonitor
from consumer.logs import configure_logging, get_logger
from consumer.metrics import Metrics
from consumer.publish.publisher import EventPublisher
from consumer.retry import RetryPolicy
from consumer.settings import load_settings
from consumer.testing.vercel_sim import Fault, VercelSimulator
from consumer.topology import Topology
from consumer.vercel import VercelClient
from tests.brokers import PrivateBroker
from tests.helpers import (
    AMQP_URL,
    delete_topology,
    event,
    get_json,
    run_cli,
    sample,
    scrape,
    wait_until,
)

READY = {"ready": True, "status": "consuming", "circuit": "closed"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_loop_monitor_fails_for_one_window_after_a_stall() -> None:
    """A beat later than max_lag fails liveness for `window` seconds, then it passes again."""
    clock = FakeClock()
    monitor = LoopMonitor(interval=1, max_lag=5, window=10, clock=clock)
    monitor.beat(0.01)
    assert monitor.check() == (True, {})
    clock.now += 7
    monitor.beat(6.0)
    assert monitor.check() == (False, {"reason": "event_loop_stalled", "lag_seconds": 6.0})
    for _ in range(10):
        clock.now += 1
        monitor.beat(0.01)
    clock.now += 0.5
    assert monitor.check() == (True, {})


def test_loop_monitor_fails_when_the_heartbeat_stops() -> None:
    """No beat for longer than interval + max_lag fails liveness (the heartbeat task died)."""
    clock = FakeClock()
    monitor = LoopMonitor(interval=1, max_lag=5, window=10, clock=clock)
    monitor.beat(0.0)
    clock.now += 5.5
    assert monitor.check()[0]
    clock.now += 1
    assert monitor.check() == (False, {"reason": "heartbeat_stopped", "seconds_since_beat": 6.5})


@pytest.fixture
async def bare_health() -> Any:
    """A health server whose readiness is always true, on a free port."""
    server = HealthServer(
        lambda: (True, {}), Metrics(), LoopMonitor(interval=0.05, max_lag=0.3, window=60)
    )
    await server.start("127.0.0.1", 0)
    yield server
    await server.stop()


async def test_livez_passes_on_time_and_fails_after_the_loop_blocked(bare_health: Any) -> None:
    """/livez is 200 while the loop turns on time and 503 with the lag once something blocked
    the loop for longer than max_lag."""
    assert await get_json(f"{bare_health.url}/livez") == (200, {"alive": True})
    time.sleep(1.0)  # noqa: ASYNC251 - blocking the loop on purpose: the bug /livez catches

    async def stalled() -> bool:
        status, body = await get_json(f"{bare_health.url}/livez")
        return status == 503 and body["reason"] == "event_loop_stalled"

    await wait_until(stalled)
    _, body = await get_json(f"{bare_health.url}/livez")
    assert body["lag_seconds"] >= 0.3


async def test_metrics_speak_prometheus_text_and_openmetrics(bare_health: Any) -> None:
    """/metrics answers Prometheus' text format by default and OpenMetrics when asked."""
    openmetrics = "application/openmetrics-text; version=1.0.0"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{bare_health.url}/metrics") as plain:
            assert plain.headers["Content-Type"].startswith("text/plain")
            assert "vercel_consumer_build_info" in await plain.text()
        async with session.get(f"{bare_health.url}/metrics", headers={"Accept": openmetrics}) as om:
            assert om.headers["Content-Type"].startswith("application/openmetrics-text")
            assert (await om.text()).endswith("# EOF\n")


def test_a_worker_not_yet_run_is_starting(sim: VercelSimulator) -> None:
    """Before its first session the worker is not ready, for the reason `starting`."""
    settings = load_settings(amqp_url=AMQP_URL, vercel_api_url=sim.url, vercel_token="tok")
    worker = build_worker(settings, VercelClient(settings.vercel_api_url), get_logger("test"))
    assert worker.readiness() == (
        False,
        {"reason": "starting", "status": "starting", "circuit": "closed"},
    )


async def test_readyz_says_why_an_unreachable_broker_is_not_ready(
    start_relay: Any, serve_health: Any
) -> None:
    """With no broker, /readyz is 503 `disconnected`: a reason code only, never the broker's
    host or error (those are in the log, for operators)."""
    relay = await start_relay(wait_consuming=False, amqp_url="amqp://guest:pw-s3cr3t@127.0.0.1:1/")
    health = await serve_health(relay)

    async def disconnected() -> bool:
        return (await get_json(f"{health.url}/readyz"))[1].get("reason") == "disconnected"

    await wait_until(disconnected)
    status, body = await get_json(f"{health.url}/readyz")
    assert status == 503
    assert body["ready"] is False
    assert body["cause"] == "unreachable"
    assert "detail" not in body
    assert "127.0.0.1" not in json.dumps(body)
    assert "127.0.0.1:1" in relay.log_text()
    assert "pw-s3cr3t" not in relay.log_text()


async def test_readyz_says_the_broker_refused_the_credentials(
    start_relay: Any, serve_health: Any
) -> None:
    """A broker that answers but refuses the user or password: /readyz says `cause:
    credentials`, so that an operator looks at the Secret rather than at the network."""
    bad = AMQP_URL.replace("guest:guest@", "guest:not-the-password@")
    relay = await start_relay(wait_consuming=False, amqp_url=bad)
    health = await serve_health(relay)

    async def refused() -> bool:
        return (await get_json(f"{health.url}/readyz"))[1].get("cause") == "credentials"

    await wait_until(refused)
    status, body = await get_json(f"{health.url}/readyz")
    assert (status, body["reason"]) == (503, "disconnected")
    assert "not-the-password" not in relay.log_text()


async def test_readyz_says_shutting_down_while_draining(
    start_relay: Any, serve_health: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """From the stop request until the worker has drained, /readyz is 503 `shutting_down` and
    /livez stays 200."""
    relay = await start_relay(shutdown_timeout=20)
    health = await serve_health(relay)
    assert await get_json(f"{health.url}/readyz") == (200, READY)
    sim.add_fault(Fault(latency=1.0, times=1))  # below the relay's 2 s HTTP timeout
    await publisher.publish(event())
    await wait_until(lambda: sim.in_flight == 1)
    relay.stop.set()
    status, body = await get_json(f"{health.url}/readyz")
    assert (status, body["reason"]) == (503, "shutting_down")
    assert (await get_json(f"{health.url}/livez"))[0] == 200
    await asyncio.wait_for(relay.task, 30)
    assert len(sim.accepted) == 1


async def test_readyz_follows_the_broker_going_away_and_coming_back(
    start_relay: Any, serve_health: Any, private_broker: PrivateBroker, names: dict[str, str]
) -> None:
    """Ready while consuming; 503 `disconnected` once the broker stops, with consuming at 0
    and a reconnect counted; ready again after the broker is back."""
    relay = await start_relay(amqp_url=private_broker.url)
    health = await serve_health(relay)
    readyz = f"{health.url}/readyz"
    try:
        assert await get_json(readyz) == (200, READY)
        await asyncio.to_thread(private_broker.stop)

        async def disconnected() -> bool:
            status, body = await get_json(readyz)
            return status == 503 and body["reason"] == "disconnected"

        await wait_until(disconnected, timeout=60)
        samples = await scrape(health.url)
        assert sample(samples, "vercel_consumer_consuming") == 0
        assert (sample(samples, "vercel_consumer_broker_reconnects_total") or 0) >= 1
        await asyncio.to_thread(private_broker.start)
        await wait_until(lambda: relay.worker.consuming, timeout=90)
        assert await get_json(readyz) == (200, READY)
    finally:
        await asyncio.to_thread(private_broker.start)
        await relay.shutdown()
        connection: AbstractConnection = await aio_pika.connect(private_broker.url)
        async with connection:
            await delete_topology(connection, names, [relay.topology])


# -- the health endpoint of `vercel-consumer run` ------------------------------------------------


def _run_env(names: dict[str, str], port: int) -> dict[str, str]:
    return {
        **os.environ,
        "CONSUMER_AMQP_URL": AMQP_URL,
        "CONSUMER_EXCHANGE": names["exchange"],
        "CONSUMER_QUEUE": names["queue"],
        "CONSUMER_VERCEL_TOKEN": "tok_cli",
        "CONSUMER_HEALTH_HOST": "127.0.0.1",
        "CONSUMER_HEALTH_PORT": str(port),
        "CONSUMER_RETRY_DELAYS": "1",
    }


async def test_run_serves_health_until_sigterm(
    names: dict[str, str], free_port: int, amqp: AbstractConnection, sim: VercelSimulator
) -> None:
    """`vercel-consumer run` serves /readyz (200 once consuming) and /metrics on
    CONSUMER_HEALTH_PORT, and still exits 0 on SIGTERM."""
    env = {**_run_env(names, free_port), "CONSUMER_VERCEL_API_URL": str(sim.url)}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        "run",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{free_port}"
    try:

        async def ready() -> bool:
            try:
                return (await get_json(f"{base}/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, timeout=30)
        assert sample(await scrape(base), "vercel_consumer_consuming") == 1
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        tiers = RetryPolicy((1.0,), max_attempts=1).tiers_ms  # CONSUMER_RETRY_DELAYS=1
        await delete_topology(amqp, names, [Topology(names["exchange"], names["queue"], tiers)])


def test_run_with_the_health_port_taken_fails_with_one_line(
    names: dict[str, str], free_port: int
) -> None:
    """A taken CONSUMER_HEALTH_PORT stops `run` with exit status 2 and one line naming it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", free_port))
        taken.listen()
        result = run_cli("run", env=_run_env(names, free_port))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "CONSUMER_HEALTH_PORT" in result.stderr
    assert "Traceback" not in result.stderr


async def test_idle_and_slow_connections_are_shed_and_probes_still_answer() -> None:
    """Slowloris: 300 connections that never finish a request (idle, or one header byte) are
    capped at max_connections (oldest closed first) and closed after idle_timeout, while a
    fresh probe is answered (the server used to keep them all, for 3,630 s, until the worker
    ran out of file descriptors)."""
    server = HealthServer(
        lambda: (True, {}), Metrics(), LoopMonitor(), idle_timeout=1.0, max_connections=20
    )
    url = await server.start("127.0.0.1", 0)
    host, port = url.removeprefix("http://").split(":")
    streams = []
    try:
        for n in range(300):
            reader, writer = await asyncio.open_connection(host, int(port))
            if n % 2:
                writer.write(b"GET /readyz HTTP/1.1\r\nHo")  # a request that never ends
            streams.append((reader, writer))
        await wait_until(lambda: server.open_connections <= 20)
        status, body = await get_json(f"{url}/readyz")
        assert (status, body) == (200, {"ready": True})
        newest_reader = streams[-1][0]
        assert await asyncio.wait_for(newest_reader.read(), timeout=30) == b""  # idle: closed
        await wait_until(lambda: server.open_connections == 0)
    finally:
        for _, writer in streams:
            writer.close()
        await server.stop()


async def test_accept_errors_are_logged_once_a_minute_without_traceback() -> None:
    """Out of file descriptors, asyncio reports every failed accept with a traceback (5.7 MB
    of log in 8 s); with the health server running they make one short line a minute."""
    logs = io.BytesIO()
    configure_logging("json", "info", stream=logs)
    server = HealthServer(lambda: (True, {}), Metrics(), LoopMonitor())
    await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    try:
        for _ in range(200):
            error = OSError(errno.EMFILE, "Too many open files")
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": error}
            )
    finally:
        await server.stop()
        loop.set_exception_handler(None)
    lines = logs.getvalue().decode().splitlines()
    assert len([line for line in lines if "cannot accept connections" in line]) == 1
    assert "Traceback" not in logs.getvalue().decode()
