"""Everything an operator reads from `vercel-consumer dlq`: tables, counts and reports.

Pure text from model rows and command summaries; what a field means is consumer/dlq/model.py's.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

from consumer.deadletter import rfc3339
from consumer.dlq.model import DeadLetterInfo, Stats, summarize
from consumer.dlq.purge import PurgeSummary
from consumer.dlq.replay import ReplayOptions, ReplaySummary
from consumer.dlq.restore import ImportSummary
from consumer.dlq.session import Scan

DETAIL_WIDTH = 60
TOP_ROWS = 20


def printable(text: str) -> str:
    """`text` with every character a terminal would act on (newlines, escape sequences, bidi
    controls) written as its Python escape, so that a value cannot forge or hide a row."""
    return "".join(char if char.isprintable() else _escaped(char) for char in text)


def _escaped(char: str) -> str:
    return char.encode("unicode_escape").decode("ascii")


def describe_scan(scan: Scan) -> str:
    line = f"{scan.scanned} of {scan.expected} dead letters scanned"
    return f"{line} ({scan.stopped_early})" if scan.stopped_early else line


def scan_notes(scan: Scan) -> list[str]:
    """What the operator should know about a pass, beyond its result."""
    return [f"note: {describe_scan(scan)}"] if scan.stopped_early else []


def render_stats(stats: Stats) -> str:
    """`dlq stats` as text: a headline, then one small table per dimension."""
    span = ""
    if stats.oldest and stats.newest:
        span = f", dead-lettered from {rfc3339(stats.oldest)} to {rfc3339(stats.newest)}"
    parts = [f"{stats.total} dead letters{span}"]
    for title, counter in (
        ("reason", stats.by_reason),
        ("type", stats.by_type),
        ("installation", stats.by_installation),
        ("http status", stats.by_status),
    ):
        if counter:
            parts.append(_counter_table(title, counter))
    return "\n\n".join(parts)


def _counter_table(title: str, counter: Counter[str]) -> str:
    rows = [[key, str(count)] for key, count in counter.most_common(TOP_ROWS)]
    table = render_table([title, "count"], rows, right=(1,))
    hidden = len(counter) - TOP_ROWS
    return table + (f"\n… and {hidden} more (see --json)" if hidden > 0 else "")


LIST_COLUMNS = (
    "event id",
    "type",
    "installation",
    "reason",
    "status",
    "attempts",
    "dead-lettered at",
    "detail",
)


def render_list(infos: Iterable[DeadLetterInfo]) -> str:
    """`dlq list` as text: one row per dead letter, the detail shortened to fit a line."""
    rows = [
        [
            info.event_id or "-",
            info.event_type or "-",
            info.installation_id or "-",
            info.reason,
            str(info.status) if info.status is not None else "-",
            str(info.attempts),
            rfc3339(info.dead_lettered_at) if info.dead_lettered_at else "-",
            _shorten(info.detail or ("body is not JSON" if not info.valid_json else "-")),
        ]
        for info in infos
    ]
    return render_table(list(LIST_COLUMNS), rows, right=(4, 5))


def _shorten(text: str, width: int = DETAIL_WIDTH) -> str:
    flat = " ".join(printable(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def render_table(header: list[str], rows: list[list[str]], *, right: tuple[int, ...] = ()) -> str:
    """A plain text table: columns as wide as their widest cell, two spaces apart; cells
    made `printable`."""
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line([title.upper() for title in header]), *map(line, rows)])


def describe_replay(summary: ReplaySummary, options: ReplayOptions) -> str:
    """The replay's closing report (the dry run's: what would move, row by row)."""
    where = "their original exchanges" if options.to_origin else f"queue {options.work_queue}"
    if options.dry_run:
        rows = render_list(summary.would_move) if summary.would_move else "no dead letter matches"
        return (
            f"{rows}\n\ndry run: would move {len(summary.would_move)} to {where}; "
            f"{summary.skipped} did not match; {describe_scan(summary.scan)}; nothing was changed"
        )
    scan = describe_scan(summary.scan)
    lines = [
        f"replay to {where}: moved {summary.moved}, skipped {summary.skipped} (did not "
        f"match), failed {summary.failed}, in {summary.seconds:.1f} s; {scan}"
    ]
    lines += [f"  failed: {error}" for error in summary.errors]
    if summary.aborted:
        lines.append(f"stopped: {summary.aborted}")
    if not summary.ok or summary.skipped:
        lines.append("every dead letter that was not moved is still in the DLQ")
    return "\n".join(lines)


def render_purge_preview(infos: list[DeadLetterInfo], rows: int = 20) -> str:
    """What purge is about to delete: the first rows, then the count by reason."""
    parts = [render_list(infos[:rows])]
    if len(infos) > rows:
        parts.append(f"… and {len(infos) - rows} more")
    by_reason = summarize(infos).by_reason.most_common()
    reasons = ", ".join(f"{count} {reason}" for reason, count in by_reason)
    parts.append(f"\n{len(infos)} dead letters match: {reasons}")
    return "\n".join(parts)


def describe_purge(summary: PurgeSummary) -> str:
    if not summary.matched:
        return f"no dead letter matches; nothing deleted ({describe_scan(summary.scan)})"
    if summary.declined:
        return "not confirmed; nothing deleted"
    text = f"deleted {summary.deleted} dead letters"
    if summary.exported_to is not None:
        path = summary.exported_to
        text += f"; a copy is in {path} (`vercel-consumer dlq import {path}` puts it back)"
    return text


def describe_import(summary: ImportSummary, dlq: str) -> str:
    text = f"imported {summary.imported} of {summary.total - summary.skipped} records into {dlq}"
    if summary.error:
        done = summary.skipped + summary.imported
        text += f"\nstopped: {summary.error}\nrerun with --skip {done} to import the rest"
    return text
