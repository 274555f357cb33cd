"""`vercel-consumer dlq stats|list|replay|purge|import`: the dead-letter commands' arguments,
their parsing, and the wiring from settings to consumer/dlq/'s session, replay, purge and
restore. Part of the CLI (consumer/cli.py adds these commands to its parser); like it, the only
kind of module that reads settings.

Exit status: 0 done; 1 broker unreachable, queue missing, another dlq command still busy, a
failed message or an unconfirmed purge; 2 bad usage. The runbook is docs/operations.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from consumer.dlq.model import DeadLetterInfo, Filter, Stats, in_utc, known_reasons
from consumer.dlq.progress import progress_for
from consumer.dlq.purge import purge
from consumer.dlq.render import (
    describe_import,
    describe_purge,
    describe_replay,
    describe_scan,
    render_list,
    render_purge_preview,
    render_stats,
    scan_notes,
)
from consumer.dlq.replay import ReplayOptions, replay
from consumer.dlq.restore import check_export, import_export
from consumer.dlq.session import DlqSession, Scan, each_kept, locked_session, look
from consumer.errors import ConfigError
from consumer.settings import Settings, load_settings
from consumer.topology import Topology, connection_name


def add_dlq_parser(commands: Any) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="inspect, replay, purge or import dead letters",
        description="Operate on the dead-letter queue <CONSUMER_QUEUE>.dlq. Every command "
        "holds the queue's lock (one dlq command at a time) and leaves what it does not move "
        "or delete in the DLQ, in its order. Runbook: docs/operations.md.",
    )
    actions = dlq.add_subparsers(required=True, metavar="ACTION")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--wait",
        type=_number(float, zero=True),
        default=30.0,
        metavar="SECONDS",
        help="how long to wait for another dlq command to finish (default 30)",
    )
    filters = argparse.ArgumentParser(add_help=False, parents=[common])
    group = filters.add_argument_group("filters (a dead letter must match all that are given)")
    group.add_argument("--reason", help="dead-letter reason, e.g. no_credentials")
    group.add_argument("--type", help="event type glob, e.g. 'billing.*'")
    group.add_argument("--installation", metavar="ID", help="installation id")
    group.add_argument("--status", metavar="CODE", help="Vercel's HTTP status: 404, or 4xx")
    group.add_argument("--since", metavar="TIME", help="dead-lettered at or after: ISO 8601 or 2h")
    group.add_argument("--until", metavar="TIME", help="dead-lettered before: ISO 8601 or 30m")
    limited = argparse.ArgumentParser(add_help=False, parents=[filters])
    limited.add_argument(
        "--limit", type=_number(int, zero=False), metavar="N", help="at most N matches"
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON for scripts")

    stats = actions.add_parser("stats", parents=[filters, as_json], help="count dead letters")
    stats.set_defaults(command=dlq_command, dlq_action=_dlq_stats)
    listing = actions.add_parser("list", parents=[limited, as_json], help="one row each")
    listing.set_defaults(command=dlq_command, dlq_action=_dlq_list)
    _add_dlq_replay_parser(actions, [limited, as_json])
    purge = actions.add_parser("purge", parents=[limited], help="delete dead letters")
    purge.add_argument("--export", type=Path, metavar="FILE", help="first save them (JSON lines)")
    purge.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge.set_defaults(command=dlq_command, dlq_action=_dlq_purge)
    restore = actions.add_parser("import", parents=[common], help="put an export back")
    restore.add_argument("file", type=Path, metavar="FILE", help="a file from purge --export")
    restore.add_argument(
        "--skip",
        type=_number(int, zero=True),
        default=0,
        metavar="N",
        help="leave out the first N records (to resume an import)",
    )
    restore.set_defaults(command=dlq_command, dlq_action=_dlq_import)


def _add_dlq_replay_parser(actions: Any, parents: list[argparse.ArgumentParser]) -> None:
    replay = actions.add_parser(
        "replay",
        parents=parents,
        help="move dead letters back to the work queue",
        description="Re-publish matching dead letters to the work queue (default exchange), "
        "each removed from the DLQ only once the broker confirmed its copy. The attempt "
        "counter restarts; replay-count and replayed-at headers are added.",
    )
    replay.add_argument(
        "--rate", type=_number(float, zero=False), metavar="R", help="messages/second"
    )
    replay.add_argument("--dry-run", action="store_true", help="show what would move; move none")
    replay.add_argument(
        "--to-origin",
        action="store_true",
        help="publish to each event's original exchange and routing key instead (its other "
        "subscribers see it again)",
    )
    replay.set_defaults(command=dlq_command, dlq_action=_dlq_replay)


def _number(kind: type[int] | type[float], *, zero: bool) -> Any:
    """An argparse type: a number above 0 (or, with `zero`, 0 and above)."""

    def parse(text: str) -> int | float:
        value = kind(text)
        if value < 0 or (value == 0 and not zero):
            wanted = "0 or more" if zero else "more than 0"
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    return parse


_STATUS = re.compile(r"^[1-5]([0-9]{2}|xx)$")
_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_reason(text: str) -> str:
    if text not in known_reasons():
        raise ConfigError(f"--reason {text!r}: expected one of {', '.join(known_reasons())}")
    return text


def parse_status(text: str) -> str:
    wanted = text.strip().lower()
    if not _STATUS.match(wanted):
        raise ConfigError(f"--status {text!r}: expected an HTTP status such as 404, or 4xx")
    return wanted


def parse_moment(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO 8601 time (UTC when it has no offset) or a time ago: 30m, 2h, 7d."""
    relative = _RELATIVE.match(text.strip())
    if relative:
        ago = timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
        return (now or datetime.now(UTC)) - ago
    try:
        moment = in_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        moment = None
    if moment is None:
        raise ConfigError(
            f"{text!r} is neither an ISO 8601 time (2026-11-26T10:00:00Z) nor an age (2h)"
        )
    return moment


def dlq_command(args: argparse.Namespace) -> None:
    settings = load_settings()
    asyncio.run(args.dlq_action(args, settings))


def _dlq_filter(args: argparse.Namespace) -> Filter:
    return Filter(
        reason=parse_reason(args.reason) if args.reason else None,
        type_glob=args.type,
        installation=args.installation,
        status=parse_status(args.status) if args.status else None,
        since=parse_moment(args.since) if args.since else None,
        until=parse_moment(args.until) if args.until else None,
    )


def _dead_letter_queue(settings: Settings) -> str:
    return Topology(settings.exchange, settings.queue, ()).dead_letter_queue


def _dlq_session(
    args: argparse.Namespace, settings: Settings
) -> contextlib.AbstractAsyncContextManager[DlqSession]:
    """The DLQ's lock and one pass over it, for this command."""
    return locked_session(
        settings.broker_urls(),
        _dead_letter_queue(settings),
        wait=args.wait,
        name=f"{connection_name()} dlq",
        notify=lambda text: print(text, file=sys.stderr),
    )


def _warn(scan: Scan) -> None:
    for line in scan_notes(scan):
        print(line, file=sys.stderr)


async def _dlq_stats(args: argparse.Namespace, settings: Settings) -> None:
    wanted = _dlq_filter(args)
    stats = Stats()
    async with _dlq_session(args, settings) as session:
        async for info in each_kept(session):
            if wanted.matches(info):
                stats.add(info)
    if args.json:
        print(json.dumps({**stats.as_json(), **session.scan.as_json()}, indent=2))
    else:
        print(render_stats(stats))
    _warn(session.scan)


async def _dlq_list(args: argparse.Namespace, settings: Settings) -> None:
    wanted = _dlq_filter(args)
    async with _dlq_session(args, settings) as session:
        infos = await look(session, wanted, args.limit)
    if args.json:
        print(json.dumps([info.as_json() for info in infos], indent=2))
    else:
        print(render_list(infos) if infos else "no dead letter matches")
        print(f"\n{len(infos)} shown; {describe_scan(session.scan)}; all are still in the DLQ")
    _warn(session.scan)


async def _dlq_replay(args: argparse.Namespace, settings: Settings) -> None:
    wanted = _dlq_filter(args)
    options = ReplayOptions(
        work_queue=settings.queue,
        exchange=settings.exchange,
        limit=args.limit,
        rate=args.rate,
        to_origin=args.to_origin,
        dry_run=args.dry_run,
    )
    async with _dlq_session(args, settings) as session:
        summary = await replay(
            session, wanted, options, lambda total: progress_for(sys.stderr, total, "replay")
        )
    if args.json:
        print(json.dumps(summary.as_json(dry_run=args.dry_run), indent=2))
    else:
        print(describe_replay(summary, options))
    _warn(session.scan)
    if not summary.ok:
        sys.exit(1)


async def _dlq_purge(args: argparse.Namespace, settings: Settings) -> None:
    wanted = _dlq_filter(args)
    if not args.yes and not sys.stdin.isatty():
        raise ConfigError("purge deletes dead letters: give --yes, or run it on a terminal")

    async def confirm(infos: list[DeadLetterInfo]) -> bool:
        print(render_purge_preview(infos))
        if args.yes:
            return True
        question = f"Delete these {len(infos)} dead letters? Type 'yes' to confirm: "
        answer = await asyncio.get_running_loop().run_in_executor(None, input, question)
        return answer.strip().lower() == "yes"

    async with _dlq_session(args, settings) as session:
        summary = await purge(
            session, wanted, limit=args.limit, export=args.export, confirm=confirm
        )
    print(describe_purge(summary))
    _warn(session.scan)
    if summary.declined:
        sys.exit(1)


async def _dlq_import(args: argparse.Namespace, settings: Settings) -> None:
    check_export(args.file)  # a bad file is bad usage: exit 2 before connecting
    summary = await import_export(
        settings.broker_urls(),
        _dead_letter_queue(settings),
        args.file,
        skip=args.skip,
        name=f"{connection_name()} dlq import",
        make_progress=lambda total: progress_for(sys.stderr, total, "import"),
    )
    print(describe_import(summary, _dead_letter_queue(settings)))
    if summary.error:
        sys.exit(1)
