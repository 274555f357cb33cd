"""`vercel-consumer outbox init|sql|relay`: the transactional outbox's commands (docs/outbox.md).

Settings are read here (an entry point). The relay's modules need the `outbox` extra
(psycopg); they are imported only when a command needs them, so the worker's image and
commands run without it, and a missing extra is one sentence, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from consumer.app import install_signal_handlers
from consumer.errors import ConfigError
from consumer.health import HealthServer
from consumer.logs import configure_logging, get_logger
from consumer.outbox.schema import DDL
from consumer.settings import Settings, load_settings
from consumer.topology import Topology

MISSING_EXTRA = "the outbox needs psycopg: pip install 'vercel-event-consumer[outbox]'"


def add_outbox_parser(commands: Any) -> None:
    outbox = commands.add_parser(
        "outbox",
        help="the transactional outbox on PostgreSQL (docs/outbox.md)",
        description="DSN: --dsn, or CONSUMER_OUTBOX_DSN (postgresql://user:password@host/db).",
    )
    actions = outbox.add_subparsers(required=True, metavar="ACTION")
    init = actions.add_parser("init", help="create the outbox table and triggers (idempotent)")
    init.add_argument("--dsn", help="the database (default: CONSUMER_OUTBOX_DSN)")
    init.set_defaults(command=init_command)
    sql = actions.add_parser("sql", help="print the migration SQL, for your own migration tool")
    sql.set_defaults(command=lambda _: print(DDL, end=""))
    relay = actions.add_parser("relay", help="publish committed outbox rows to the broker")
    relay.add_argument("--dsn", help="the database (default: CONSUMER_OUTBOX_DSN)")
    relay.set_defaults(command=relay_command)


def init_command(args: argparse.Namespace) -> None:
    settings = load_settings()
    store = _store()
    asyncio.run(store.init_schema(_dsn(args, settings)))
    print("outbox: table vercel_outbox and its triggers are in place")


def relay_command(args: argparse.Namespace) -> None:
    settings = load_settings()
    dsn = _dsn(args, settings)
    _store()  # the extra is there, or one sentence
    configure_logging(settings.log_format, settings.log_level)
    asyncio.run(serve_relay(settings, dsn))


async def serve_relay(settings: Settings, dsn: str) -> None:
    """Run the relay and its health endpoint until SIGTERM/SIGINT."""
    from consumer.outbox.metrics import OutboxMetrics
    from consumer.outbox.relay import OutboxRelay, RelayConfig

    log = get_logger("consumer.outbox")
    topology = Topology(settings.exchange, settings.queue, ())
    config = RelayConfig(
        dsn=dsn,
        amqp_url=settings.broker_urls(),  # with CONSUMER_AMQP_CAFILE/CERTFILE/KEYFILE applied
        exchange=settings.exchange,
        dead_letter_queue=topology.dead_letter_queue,
        batch_size=settings.outbox_batch_size,
        poll_interval=settings.outbox_poll_interval,
        retention=settings.outbox_retention,
        max_body_bytes=settings.max_body_bytes,
    )
    metrics = OutboxMetrics()
    relay = OutboxRelay(config, metrics, log)
    stop = asyncio.Event()
    install_signal_handlers(stop, log)
    log.info(
        "outbox relay starting",
        amqp_url=settings.amqp_url_redacted,
        exchange=settings.exchange,
        batch_size=config.batch_size,
        poll_interval=config.poll_interval,
    )
    health = HealthServer(relay.readiness, metrics)
    if settings.health_port:
        try:
            await health.start(settings.health_host, settings.health_port)
        except OSError as exc:
            # Named as `run` names them: the message said neither variable (found by the
            # hostile-configuration test, which now drives `outbox relay` too).
            raise ConfigError(
                f"cannot serve the health endpoint on {settings.health_host}:"
                f"{settings.health_port} (CONSUMER_HEALTH_HOST, CONSUMER_HEALTH_PORT):"
                f" {exc.strerror}"
            ) from None
    try:
        await relay.run(stop)
    finally:
        await health.stop()


def _dsn(args: argparse.Namespace, settings: Settings) -> str:
    """The DSN to use, checked (exit 2 naming where it came from, never quoting it)."""
    if args.dsn:
        dsn, source = str(args.dsn), "--dsn"
    elif settings.outbox_dsn is None:
        raise ConfigError("give --dsn or set CONSUMER_OUTBOX_DSN")
    else:
        dsn, source = settings.outbox_dsn.get_secret_value(), "CONSUMER_OUTBOX_DSN"
    problem = _store().dsn_problem(dsn)
    if problem is not None:
        raise ConfigError(f"{source} {problem}")
    return dsn


def _store() -> Any:
    try:
        import consumer.outbox.store as store
    except ImportError:
        raise ConfigError(MISSING_EXTRA) from None
    return store
