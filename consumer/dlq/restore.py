"""`dlq import`: put a purge export back at the end of the DLQ, in the file's order.

The whole file is checked first (each record decoded and encoded as AMQP would send it), so a
bad record stops the import before anything is published. Then records are published one
confirmed publish at a time, so that after a failure `skipped + imported` says exactly how far
it got (rerun with `--skip`). The file is read a line at a time twice, never held whole.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import pamqp.header
from aio_pika.abc import AbstractChannel

from consumer.dlq.export import ExportedMessage, records
from consumer.dlq.model import without_delivery_count
from consumer.dlq.progress import Progress
from consumer.dlq.session import (
    PUBLISH_TIMEOUT,
    publish_errors,
    queue_state,
    until_broker_error,
)
from consumer.errors import ConfigError
from consumer.headers import ORIGINAL_USER_ID
from consumer.topology import broker_address, connect, open_channel

ProgressFactory = Callable[[int], Progress]


@dataclass(slots=True)
class ImportSummary:
    total: int = 0  # records in the file
    skipped: int = 0  # the first records, not published again (--skip)
    imported: int = 0
    error: str | None = None  # why it stopped before the end, if it did


def imported(record: ExportedMessage) -> aio_pika.Message:
    """The message to put back: as exported, except that a `user_id` (the broker would check
    it against our login) is kept as the `original-user-id` header, like dead letters do, and
    no `expiration` (a dead letter must not vanish from the DLQ)."""
    properties = dict(record.properties)
    headers = without_delivery_count(record.headers)
    user_id = properties.pop("user_id", None)
    properties.pop("expiration", None)
    if user_id:
        headers.setdefault(ORIGINAL_USER_ID, user_id)
    properties["headers"] = headers
    properties["delivery_mode"] = aio_pika.DeliveryMode.PERSISTENT
    return aio_pika.Message(record.body, **properties)


def check_export(path: Path) -> int:
    """How many records `path` holds, each one checked to be publishable; ConfigError naming
    the first line that is not."""
    count = 0
    for count, record in enumerate(records(path), start=1):
        try:
            message = imported(record)
            pamqp.header.ContentHeader(0, len(message.body), message.properties).marshal()
        except (struct.error, TypeError, ValueError, OverflowError) as exc:
            raise ConfigError(
                f"{path}: record {count} cannot be published ({exc}); nothing was imported"
            ) from None
    return count


async def import_export(
    url: str,
    dlq: str,
    path: Path,
    *,
    skip: int,
    name: str,
    make_progress: ProgressFactory,
) -> ImportSummary:
    """Check the whole file, then publish its records after the first `skip` to the DLQ."""
    total = check_export(path)
    summary = ImportSummary(total=total, skipped=min(skip, total))
    connection = await connect(url, name=name)
    try:
        # The DLQ must exist: mandatory publishing would refuse every record anyway.
        await queue_state(connection, dlq, broker_address(url))
        channel = await open_channel(connection)
        progress = make_progress(summary.total - summary.skipped)
        work = _publish_records(channel, dlq, path, summary, progress)
        summary.error = await until_broker_error(work, progress)
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
    return summary


async def _publish_records(
    channel: AbstractChannel,
    dlq: str,
    path: Path,
    summary: ImportSummary,
    progress: Progress,
) -> None:
    for number, record in enumerate(records(path), start=1):
        if number <= summary.skipped:
            continue
        with publish_errors(f"publishing record {number}"):
            await channel.default_exchange.publish(
                imported(record), routing_key=dlq, mandatory=True, timeout=PUBLISH_TIMEOUT
            )
        summary.imported += 1
        progress.update(summary.imported, f"imported {summary.imported}")
