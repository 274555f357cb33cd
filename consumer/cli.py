"""`vercel-consumer`: the only place that reads settings, configures logging and wires parts.

Commands: `run` (the worker), `sim` (a local Vercel simulator), `publish` (one domain event),
`schema` (print the contract's JSON Schema), and `dlq stats|list|replay|purge|import`
(dead-letter operations: their commands are in consumer/dlqcli.py, the mechanics in
consumer/dlq.py, the runbook in docs/operations.md). Bad configuration or input ends with one
line on stderr and exit status 2; an unreachable broker, a missing queue or a failed operation
with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aio_pika.abc import AbstractChannel

from consumer import __version__
from consumer.breaker import CircuitBreaker
from consumer.breaker import State as BreakerState
from consumer.contract import example_event, json_schema
from consumer.deadletter import Republisher
from consumer.depths import DepthSampler
from consumer.dlqcli import add_dlq_parser
from consumer.errors import BrokerError, ConfigError, ContractError
from consumer.handler import Handler
from consumer.health import HealthServer
from consumer.logs import configure_logging, get_logger
from consumer.metrics import Metrics
from consumer.publisher import EventPublisher
from consumer.ratelimit import InstallationLimits, RequestRate
from consumer.retry import RetryPolicy
from consumer.settings import Settings, load_settings
from consumer.tokens import TokenStore
from consumer.topology import Topology, connect, connection_name
from consumer.vercel import VercelClient
from consumer.worker import MessageHandler, SessionTask, Worker


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        args.command(args)
    except (ConfigError, ContractError) as exc:
        _fail(str(exc), status=2)
    except BrokerError as exc:
        _fail(str(exc), status=1)
    except KeyboardInterrupt:
        sys.exit(130)


def _fail(message: str, *, status: int) -> None:
    print(f"vercel-consumer: {message}", file=sys.stderr)
    sys.exit(status)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vercel-consumer",
        description="Relay RabbitMQ domain events to Vercel's Create Event API.",
        epilog="Configuration comes from CONSUMER_* environment variables (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="consume events and deliver them to Vercel")
    run.set_defaults(command=run_command)
    _add_sim_parser(commands)
    _add_publish_parser(commands)
    add_dlq_parser(commands)
    schema = commands.add_parser("schema", help="print the message contract's JSON Schema")
    schema.set_defaults(command=lambda _: print(json.dumps(json_schema(), indent=2)))
    return parser


# ── run ──────────────────────────────────────────────────────────────────────────────────────


def run_command(_: argparse.Namespace) -> None:
    settings = load_settings()
    if settings.vercel_token is None and settings.vercel_tokens_dir is None:
        raise ConfigError("set CONSUMER_VERCEL_TOKENS_DIR or CONSUMER_VERCEL_TOKEN")
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(serve(settings))


def build_worker(
    settings: Settings, vercel: VercelClient, log: Any, metrics: Metrics | None = None
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

    def make_handler(channel: AbstractChannel) -> MessageHandler:
        return Handler(
            vercel=vercel,
            tokens=tokens,
            policy=policy,
            republisher=Republisher(channel, topology),
            breaker=breaker,
            limits=limits,
            rate=rate,
            max_body_bytes=settings.max_body_bytes,
            max_redeliveries=settings.max_redeliveries,
            log=log,
            metrics=metrics,
        )

    amqp_url = settings.amqp_url.get_secret_value()
    name = connection_name()
    worker = Worker(
        connect=lambda: connect(amqp_url, name=name),
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
        reconnects=lambda: worker.reconnects,
        token_reloads=lambda: tokens.reloads,
        throttled_installations=limits.throttled,
        circuit_state=lambda: breaker.state.value,
    )
    return worker


def _depth_sampling(
    settings: Settings, topology: Topology, metrics: Metrics, log: Any
) -> SessionTask | None:
    """The queue-depth poller run alongside each broker session; None when switched off."""
    interval = settings.queue_depth_interval
    if interval <= 0:
        return None
    sampler = DepthSampler(topology, metrics, log)
    return lambda connection: sampler.watch(connection, interval)


def build_breaker(settings: Settings, log: Any) -> CircuitBreaker:
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
    worker = build_worker(settings, vercel, log, metrics)
    stop = asyncio.Event()
    _install_signal_handlers(stop, log)
    log.info(
        "starting",
        version=__version__,
        amqp_url=settings.amqp_url_redacted,
        vercel_api_url=settings.vercel_api_url,
        queue=settings.queue,
        concurrency=settings.concurrency,
    )
    health: HealthServer | None = None
    try:
        health = await start_health(settings, worker, metrics, log)
        await worker.run(stop)
    finally:
        if health is not None:  # after the drain: /readyz says shutting_down until the end
            await health.stop()
        await vercel.aclose()


async def start_health(
    settings: Settings, worker: Worker, metrics: Metrics, log: Any
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


def _install_signal_handlers(stop: asyncio.Event, log: Any) -> None:
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


# ── sim ──────────────────────────────────────────────────────────────────────────────────────


def _add_sim_parser(commands: Any) -> None:
    sim = commands.add_parser("sim", help="run a local Vercel Create Event simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8787)
    sim.add_argument(
        "--token",
        action="append",
        default=[],
        metavar="INSTALLATION=TOKEN",
        help="an installation and its token (repeatable)",
    )
    sim.add_argument("--tokens-dir", type=Path, help="a directory of <installation id> files")
    sim.add_argument("--latency-ms", type=float, default=0.0, help="added to every answer")
    sim.set_defaults(command=sim_command)


def sim_command(args: argparse.Namespace) -> None:
    from consumer.sim import serve as serve_simulator  # only this command needs the server

    tokens = dict(_split_pair(pair) for pair in args.token)
    coroutine = serve_simulator(
        args.host, args.port, tokens, args.tokens_dir, args.latency_ms / 1000
    )
    try:
        asyncio.run(coroutine)
    except OSError as exc:  # the port is taken, or the host is not ours
        raise ConfigError(f"cannot serve on {args.host}:{args.port}: {exc.strerror}") from None


def _split_pair(pair: str) -> tuple[str, str]:
    name, sep, value = pair.partition("=")
    if not sep or not name or not value:
        raise ConfigError(f"expected INSTALLATION=TOKEN, got {pair.split('=')[0]!r}=…")
    return name, value


# ── publish ──────────────────────────────────────────────────────────────────────────────────


def _add_publish_parser(commands: Any) -> None:
    publish = commands.add_parser(
        "publish",
        help="publish one domain event to the exchange",
        description="Build an event from the options, or give the whole JSON body with --body.",
    )
    publish.add_argument(
        "type", nargs="?", default="resource.updated", help="e.g. resource.renamed"
    )
    publish.add_argument("--installation", default="icfg_demo", help="installation_id")
    publish.add_argument("--resource", help="resource_id (resource.* events)")
    publish.add_argument("--product", help="product_id (optional)")
    publish.add_argument("--billing-plan", help="billing_plan_id (billing.* events, optional)")
    publish.add_argument("--id", help="event id (default: a new UUID)")
    publish.add_argument("--body", help="the whole event as JSON, instead of the options above")
    publish.add_argument("--count", type=int, default=1, help="publish N events (new ids)")
    publish.add_argument(
        "--no-validate", action="store_true", help="publish even if it breaks the contract"
    )
    publish.set_defaults(command=publish_command)


def publish_command(args: argparse.Namespace) -> None:
    settings = load_settings()
    events = [_event_from_args(args) for _ in range(max(args.count, 1))]
    asyncio.run(_publish(settings, events, validate=not args.no_validate))
    for event in events:
        print(f"published {event.get('type')} {event.get('id')}")


def _event_from_args(args: argparse.Namespace) -> dict[str, Any]:
    if args.body:
        try:
            event: dict[str, Any] = json.loads(args.body)
        except json.JSONDecodeError as exc:
            raise ContractError(f"--body is not JSON: {exc}") from None
        if not isinstance(event, dict):
            raise ContractError("--body must be a JSON object")
        return event if args.count == 1 else {**event, "id": str(uuid.uuid4())}
    fields: dict[str, Any] = {
        "id": args.id or str(uuid.uuid4()),
        "installation_id": args.installation,
    }
    optional = {"resource_id": args.resource, "product_id": args.product}
    optional["billing_plan_id"] = args.billing_plan
    fields.update({key: value for key, value in optional.items() if value is not None})
    return example_event(args.type, **fields)


async def _publish(settings: Settings, events: list[dict[str, Any]], *, validate: bool) -> None:
    url = settings.amqp_url.get_secret_value()
    async with await EventPublisher.connect(url, exchange=settings.exchange) as publisher:
        for event in events:
            await publisher.publish(event, validate=validate)
