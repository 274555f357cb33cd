"""`vercel-consumer`: argument parsing; with consumer/dlq/cli.py the only place that reads
settings (consumer/app.py wires the parts).

Commands: `run` (the worker), `sim` (a local Vercel simulator), `publish` (domain events),
`schema` (print the contract's JSON Schema), `asyncapi` (its AsyncAPI 3.0 document), and
`dlq stats|list|replay|purge|import`
(dead-letter operations: their commands are in consumer/dlq/cli.py, the mechanics in
consumer/dlq/, the runbook in docs/operations.md), and `outbox init|sql|relay` (the
transactional outbox: consumer/outbox/cli.py, docs/outbox.md). Bad configuration or input ends
with one line on stderr and exit status 2; an unreachable broker or database, a missing queue or
a failed operation with exit status 1.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from consumer import amqptables
from consumer._version import __version__
from consumer.app import serve
from consumer.asyncapi import document, to_yaml
from consumer.contract import example_event, json_schema, parse_event
from consumer.dlq.cli import add_dlq_parser
from consumer.errors import (
    BrokerError,
    ConfigError,
    ContractError,
    DatabaseError,
    PublishBatchError,
)
from consumer.logs import configure_logging
from consumer.outbox.cli import add_outbox_parser
from consumer.publish.publisher import EventPublisher
from consumer.settings import Settings, load_settings
from consumer.topology import Topology


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    # Every command decodes messages or publishes them: none may stop at a header nested too
    # deep for pamqp (consumer/amqptables.py).
    amqptables.install()
    try:
        args.command(args)
    except (ConfigError, ContractError) as exc:
        _fail(str(exc), status=2)
    except (BrokerError, DatabaseError) as exc:
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
    add_outbox_parser(commands)
    schema = commands.add_parser("schema", help="print the message contract's JSON Schema")
    schema.set_defaults(command=lambda _: print(json.dumps(json_schema(), indent=2)))
    _add_asyncapi_parser(commands)
    return parser


# ── run ──────────────────────────────────────────────────────────────────────────────────────


GC_YOUNG_THRESHOLD = 20_000  # new objects between collections of the youngest generation


def run_command(_: argparse.Namespace) -> None:
    settings = load_settings()
    if settings.vercel_token is None and settings.vercel_tokens_dir is None:
        raise ConfigError("set CONSUMER_VERCEL_TOKENS_DIR or CONSUMER_VERCEL_TOKEN")
    configure_logging(settings.log_format, settings.log_level)
    # The collector's youngest generation is collected every 700 new objects by default, which
    # at full speed is every few dozen deliveries, and finds nothing: a delivery leaves no
    # reference cycles (gc.DEBUG_SAVEALL over a 10,000-message run kept only start-up and
    # shutdown objects). Collected every 20,000 instead: about 5 % less CPU per message, the
    # same peak RSS (bench/README.md, "What the profile showed").
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    asyncio.run(serve(settings))


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
    from consumer.testing.vercel_sim import (
        serve as serve_simulator,  # only this command needs the server
    )

    if not (math.isfinite(args.latency_ms) and args.latency_ms >= 0):
        raise ConfigError("--latency-ms must be a finite number of milliseconds, at least 0")
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


def _add_asyncapi_parser(commands: Any) -> None:
    asyncapi = commands.add_parser(
        "asyncapi", help="print the AsyncAPI 3.0 document of the message contract (YAML)"
    )
    defaults = Settings.model_fields
    asyncapi.add_argument("--exchange", default=defaults["exchange"].default)
    asyncapi.add_argument("--queue", default=defaults["queue"].default)
    asyncapi.set_defaults(command=asyncapi_command)


def asyncapi_command(args: argparse.Namespace) -> None:
    topology = Topology(exchange=args.exchange, queue=args.queue, retry_tiers_ms=())
    print(to_yaml(document(topology)), end="")


# ── publish ──────────────────────────────────────────────────────────────────────────────────


def _add_publish_parser(commands: Any) -> None:
    publish = commands.add_parser(
        "publish",
        help="publish one domain event to the exchange",
        description="Build an event from the options, or give the whole JSON body with --body.",
    )
    publish.add_argument(
        "type", nargs="?", help="e.g. resource.renamed (required unless --body is given)"
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
    """Publish the events pipelined (`publish_many`): all confirmed, or exit 1 after listing
    those that were."""
    if not (args.type or args.body):
        # The exchange may be production's: nothing is sent unless the operator says what.
        raise ConfigError("publish needs the event's type (e.g. resource.renamed) or --body")
    settings = load_settings()
    events = [_event_from_args(args) for _ in range(max(args.count, 1))]
    if not args.no_validate:
        for event in events:  # every event checked before any is published (exit 2)
            body = json.dumps(event).encode()
            parse_event(body, max_bytes=len(body))
    try:
        asyncio.run(_publish(settings, events))
    except PublishBatchError as exc:
        _print_published(exc.confirmed, events)
        raise
    _print_published([str(event.get("id")) for event in events], events)


def _print_published(ids: list[str], events: list[dict[str, Any]]) -> None:
    types = {str(event.get("id")): event.get("type") for event in events}
    for event_id in ids:
        print(f"published {types[event_id]} {event_id}")


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


async def _publish(settings: Settings, events: list[dict[str, Any]]) -> None:
    url = settings.broker_urls()
    async with await EventPublisher.connect(url, exchange=settings.exchange) as publisher:
        await publisher.publish_many(events, validate=False)
