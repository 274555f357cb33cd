"""`dlq purge`: delete dead letters, exactly those the operator was shown, after exporting them.

Two passes under one lock. The first looks (every message kept, consumer/dlq/session.py) and
notes the matches' fingerprints; the operator confirms what it showed; the second deletes the
messages with those fingerprints and keeps the others. Nothing is held while the operator
thinks. With `--export`, each batch is written and made durable before its messages are
deleted; the file is removed again when nothing was deleted, so its name stays free.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from aio_pika.abc import AbstractIncomingMessage

from consumer.dlq.export import ExportedMessage, ExportFile, encode_line
from consumer.dlq.model import DeadLetterInfo, Filter
from consumer.dlq.session import DlqSession, Scan, info_of, record_of
from consumer.errors import BrokerError

Confirm = Callable[[list[DeadLetterInfo]], Awaitable[bool]]
BATCH_MESSAGES = 100  # messages exported, then deleted, at a time
BATCH_BYTES = 8 * 1024 * 1024  # ... or fewer, so that a batch's bodies stay small in memory


@dataclass(slots=True)
class PurgeSummary:
    deleted: int = 0
    matched: list[DeadLetterInfo] = field(default_factory=list)
    declined: bool = False
    exported_to: Path | None = None
    scan: Scan = field(default_factory=lambda: Scan(0))


def fingerprint(record: ExportedMessage) -> bytes:
    """What identifies a dead letter across a kept copy: its exact body and properties."""
    return hashlib.sha256(encode_line(record)).digest()


async def purge(
    session: DlqSession,
    wanted: Filter,
    *,
    limit: int | None,
    export: Path | None,
    confirm: Confirm,
) -> PurgeSummary:
    """Delete the matching dead letters of one pass, exactly those shown to `confirm`, after
    writing them to `export` (if given)."""
    summary = PurgeSummary()
    file = ExportFile(export) if export is not None else None  # a taken name fails here, first
    try:
        chosen = await _choose(session, wanted, limit, summary)
        if not summary.matched:
            return summary
        if not await confirm(summary.matched):
            summary.declined = True
            return summary
        await session.new_pass()
        await _delete(session, chosen, file, summary)
    finally:
        _finish_export(file, summary)
    return summary


async def _choose(
    session: DlqSession, wanted: Filter, limit: int | None, summary: PurgeSummary
) -> Counter[bytes]:
    """Look at the pass (keeping everything); the matches' rows and fingerprints."""
    chosen: Counter[bytes] = Counter()
    summary.scan = session.scan
    while limit is None or len(summary.matched) < limit:
        message = await session.take()
        if message is None:
            break
        info = info_of(message)
        if wanted.matches(info):
            summary.matched.append(info)
            chosen[fingerprint(record_of(message))] += 1
        await session.keep(message)
    await session.finish_pass()  # past --limit: the rest is kept too, the DLQ in its order
    return chosen


async def _delete(
    session: DlqSession, chosen: Counter[bytes], file: ExportFile | None, summary: PurgeSummary
) -> None:
    batch: list[AbstractIncomingMessage] = []
    size = 0
    while chosen.total() > 0 and (message := await session.take()) is not None:
        record = record_of(message)
        key = fingerprint(record)
        if chosen[key] <= 0:
            await session.keep(message)
            continue
        chosen[key] -= 1
        if file is not None:
            file.append(record)
        batch.append(message)
        size += len(message.body)
        if len(batch) >= BATCH_MESSAGES or size >= BATCH_BYTES:
            await _settle(session, batch, file, summary)
            batch, size = [], 0
    await _settle(session, batch, file, summary)


async def _settle(
    session: DlqSession,
    batch: list[AbstractIncomingMessage],
    file: ExportFile | None,
    summary: PurgeSummary,
) -> None:
    """Make the batch's export durable, then delete its messages."""
    if not batch:
        return
    if file is not None:
        file.commit()
        summary.exported_to = file.path
    for message in batch:
        try:
            await session.remove(message)
        except BrokerError as exc:
            raise BrokerError(
                f"purge stopped after {summary.deleted} deletions ({exc}); the rest are "
                "still in the DLQ"
                + (f", and {file.path} holds every one deleted" if file is not None else "")
            ) from exc
        summary.deleted += 1


def _finish_export(file: ExportFile | None, summary: PurgeSummary) -> None:
    """Keep the export if anything it holds was deleted; otherwise remove it."""
    if file is None:
        return
    if summary.deleted:
        file.close()
    else:
        file.discard()
