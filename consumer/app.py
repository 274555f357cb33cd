"""Assembly: settings → the worker's collaborators → the worker, its health endpoint, signals.

Entry points (consumer/cli.py) read the settings and call `serve`; tests call `build_worker` to
get a worker wired exactly as production wires it.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from typing import Any

from aio_pika.abc import AbstractChannel
from structlog.typing import FilteringBoundLogger

from consumer._version import __version__
from consumer.accepted import AcceptedMemory
from consumer.acking import Acker
from consumer.breaker import CircuitBreaker
from consumer.breaker import State as BreakerState
from consumer.coalesce import Coalescer
from consumer.deadletter import Republisher
from consumer.depths import DepthSampler
from consumer.errors import ConfigError
from consumer.handler import Handler
from consumer.health import HealthServer
from consumer.logs import get_logger
from consumer.metrics import Metrics
from consumer.otel import NO_TRACER, Tracer, tracer_from_environ
from consumer.ratelimit import InstallationLimits, RequestRate
from consumer.retry import RetryPolicy
from consumer.settings import Settings
from consumer.tokens import TokenStore
from consumer.topology import Connector, Topology, connection_name
from consumer.vercel import VercelClient
from consumer.worker import MessageHandler, SessionTask, Worker


def build_worker(
    settings: Settings,
    vercel: VercelClient,
    log: FilteringBoundLogger,
    metrics: Metrics | None = None,
    tracer: Tracer = NO_TRACER,
) -> Worker:
    """Wire the worker's collaborators from settings, recording into `metrics` (or a new one)."""
    metrics = Metrics() if metrics is None else metrics
    policy = RetryPolicy(
        settings.retry_delays, settings.max_attempts, max_age=settings.max_retry_age
    )
    topology = Topology(settings.exchange, settings.queue, policy.tiers_ms)
    fallback = settings.vercel_token.get_secret_value() if settings.vercel_token else None
    tokens = TokenStore(settings.vercel_tokens_dir, fallback)
    breaker = build_breaker(settings, log)
    limits = InstallationLimits()
    rate = RequestRate(settings.max_rps)
    accepted = AcceptedMemory()  # shared by every session: redeliveries come on the next one
    coalescer: Coalescer[Any] | None = Coalescer() if settings.coalesce else None
    if coalescer is not None:
        metrics.coalesce_keys_waiting.set_function(coalescer.keys_waiting)

    def make_handler(channel: AbstractChannel) -> MessageHandler:
        return Handler(
            vercel=vercel,
            tokens=tokens,
            policy=policy,
            republisher=Republisher(
                channel,
                topology,
                confirm_timeout=settings.confirm_timeout,
                big_body_bytes=settings.max_body_bytes,
            ),
            breaker=breaker,
            limits=limits,
            rate=rate,
            max_body_bytes=settings.max_body_bytes,
            max_redeliveries=settings.max_redeliveries,
            log=log,
            metrics=metrics,
            accepted=accepted,
            tracer=tracer,
            acker=Acker(max_held=settings.concurrency // 8),
            coalescer=coalescer,
            coalesce_window=settings.coalesce_window / 1000,
        )

    worker = Worker(
        connect=Connector(settings.broker_urls(), name=connection_name()),
        topology=topology,
        make_handler=make_handler,
        breaker=breaker,
        concurrency=settings.concurrency,
        shutdown_timeout=settings.shutdown_timeout,
        log=log,
        session_task=_depth_sampling(settings, topology, metrics, log),
    )
    metrics.concurrency_limit.set(settings.concurrency)
    metrics.sample_from(
        in_flight=lambda: worker.in_flight,
        consuming=lambda: worker.consuming,
        broker_blocked=lambda: worker.broker_blocked,
        reconnects=lambda: worker.reconnects,
        token_reloads=lambda: tokens.reloads,
        throttled_installations=limits.throttled,
        circuit_state=lambda: breaker.state.value,
    )
    return worker


def _depth_sampling(
    settings: Settings, topology: Topology, metrics: Metrics, log: FilteringBoundLogger
) -> SessionTask | None:
    """The queue-depth poller run alongside each broker session; None when switched off."""
    interval = settings.queue_depth_interval
    if interval <= 0:
        return None
    sampler = DepthSampler(topology, metrics, log)
    return lambda connection: sampler.watch(connection, interval)


def build_breaker(settings: Settings, log: FilteringBoundLogger) -> CircuitBreaker:
    def log_change(previous: BreakerState, state: BreakerState, why: str) -> None:
        level = log.info if state is BreakerState.CLOSED else log.warning
        level("circuit breaker", circuit=state.value, previous=previous.value, why=why)

    return CircuitBreaker(
        window=settings.breaker_window,
        failure_ratio=settings.breaker_failure_ratio,
        probe_delays=settings.breaker_probe_delays,
        on_change=log_change,
    )


async def serve(settings: Settings) -> None:
    """Run the worker and its health endpoint until SIGTERM/SIGINT; a second signal exits at
    once."""
    log = get_logger("consumer")
    metrics = Metrics()
    vercel = VercelClient(
        settings.vercel_api_url,
        timeout=settings.http_timeout,
        max_connections=settings.concurrency,
    )
    # Standard OTEL_* variables, read here like the settings; a bad one stops the start (exit 2).
    tracer, tracing = tracer_from_environ(os.environ, api_url=settings.vercel_api_url)
    worker = build_worker(settings, vercel, log, metrics, tracer)
    stop = asyncio.Event()
    install_signal_handlers(stop, log)
    log.info(
        "starting",
        version=__version__,
        amqp_url=settings.amqp_url_redacted,
        vercel_api_url=settings.vercel_api_url_redacted,
        queue=settings.queue,
        concurrency=settings.concurrency,
        tracing=tracing,
    )
    health: HealthServer | None = None
    try:
        health = await start_health(settings, worker, metrics, log)
        # Everything built so far lives as long as the process. Without this, each full
        # collection walks all of it (the imported libraries: hundreds of thousands of objects)
        # and stalls the loop for 50-170 ms: the paced p99 of bench/README.md.
        gc.freeze()
        await worker.run(stop)
    finally:
        if health is not None:  # after the drain: /readyz says shutting_down until the end
            await health.stop()
        await vercel.aclose()
        tracer.shutdown()  # exports the spans still buffered


async def start_health(
    settings: Settings, worker: Worker, metrics: Metrics, log: FilteringBoundLogger
) -> HealthServer | None:
    """Serve /livez, /readyz and /metrics on CONSUMER_HEALTH_PORT (None when it is 0)."""
    if settings.health_port == 0:
        return None
    health = HealthServer(worker.readiness, metrics)
    host, port = settings.health_host, settings.health_port
    try:
        url = await health.start(host, port)
    except OSError as exc:  # the port is taken, or the host is not ours
        raise ConfigError(
            f"cannot serve the health endpoint on {host}:{port} "
            f"(CONSUMER_HEALTH_HOST, CONSUMER_HEALTH_PORT): {exc.strerror}"
        ) from None
    log.info("health endpoint", url=url, paths=["/livez", "/readyz", "/metrics"])
    return health


def install_signal_handlers(stop: asyncio.Event, log: FilteringBoundLogger) -> None:
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            # Second signal: leave at once. Nothing unfinished was acked; the broker redelivers.
            log.warning("second signal; exiting now", signal=signal.Signals(signum).name)
            os._exit(128 + signum)
        log.info("shutting down", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
