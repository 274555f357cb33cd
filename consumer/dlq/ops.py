"""Dead-letter operations on the broker: the mechanics behind `vercel-consumer dlq …`.

How the DLQ (a quorum queue) is read without losing, duplicating or reordering anything:

- **A lock.** Each command first declares `<dlq>.lock`, an exclusive, auto-deleting classic
  queue, on its connection. A second command's declare fails with RESOURCE_LOCKED; it retries
  for `--wait` seconds, then gives up with exit status 1. The broker deletes the lock when the
  holder's connection ends, also after `kill -9`. (`basic.consume`'s `exclusive` flag would be
  the textbook tool, but quorum queues ignore it: rabbitmq/rabbitmq-website#1973; and single
  active consumer cannot be added to an existing queue.)
- **Holding, not taking.** The command consumes with manual acks and a prefetch as large as
  the queue (at most 65,535, AMQP's limit), so it holds every message it has seen. A message
  is acked (removed) only when it is to leave: replayed and confirmed, or purged after its
  export was written. Everything else is returned by the broker when the command's channel
  closes, in the order it was delivered and ahead of anything that arrived since: the queue
  looks as before. A crash returns them the same way.
- **One pass over what was there.** The pass covers the messages ready when it began (the
  queue's depth once the lock is held and no other consumer holds messages); dead letters
  that arrive meanwhile wait for the next command.
- **Replay = publish, confirm, ack, one message at a time**, all on the consuming channel. The
  broker handles a channel's frames in order, so when the confirm of message n+1 arrives the
  ack of message n has been applied: a crash at any point duplicates at most the one message
  whose copy was confirmed but whose ack was not yet sent, and loses none.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractExchange,
    AbstractIncomingMessage,
)

from consumer.deadletter import DELIVERY_COUNT, ORIGINAL_USER_ID, copy_message
from consumer.dlq.export import ExportedMessage, decode_line, encode_line
from consumer.dlq.progress import Progress
from consumer.dlq.view import (
    DeadLetterInfo,
    Filter,
    origin_of,
    render_list,
    replay_headers,
    summarize,
    without_delivery_count,
)
from consumer.errors import BrokerError, ConfigError
from consumer.topology import broker_address, broker_errors, connect, open_channel

MAX_HELD = 65_535  # AMQP's prefetch-count is 16 bits: the most one channel can hold unacked
IDLE_TIMEOUT = 10.0  # seconds without a delivery while the pass expects more
CONSUMERS_GONE_TIMEOUT = 5.0  # seconds for an earlier command's consumer to be removed
LOCK_RETRY = 1.0  # seconds between attempts to take the lock
PUBLISH_TIMEOUT = 30.0  # seconds for the broker to confirm one replayed message
# Each look at a dead letter is a delivery to the broker. RabbitMQ 4.0-4.2 drop a quorum queue's
# message after 20 of them by default (docs/operations.md): warn well before.
DELIVERY_WARNING = 10

ProgressFactory = Callable[[int], Progress]
Notify = Callable[[str], None]


def info_of(message: AbstractIncomingMessage) -> DeadLetterInfo:
    return DeadLetterInfo.read(message.body, message.headers, message_id=message.message_id)


@dataclass(slots=True)
class Scan:
    """How far a command got through the DLQ."""

    expected: int  # messages ready when the pass began
    scanned: int = 0
    stopped_early: str | None = None  # why the pass ended before `expected`, if it did
    most_deliveries: int = 0  # the highest x-delivery-count seen (see DELIVERY_WARNING)

    def describe(self) -> str:
        line = f"{self.scanned} of {self.expected} dead letters scanned"
        return f"{line} ({self.stopped_early})" if self.stopped_early else line

    def as_json(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "in_dlq_at_start": self.expected,
            "stopped_early": self.stopped_early,
            "most_deliveries": self.most_deliveries,
        }

    def warnings(self) -> list[str]:
        """What the operator should know about this pass, beyond its result."""
        notes = [f"note: {self.describe()}"] if self.stopped_early else []
        if self.most_deliveries >= DELIVERY_WARNING:
            notes.append(
                f"warning: a dead letter has been delivered {self.most_deliveries} times (each "
                "dlq command counts); on RabbitMQ 4.0-4.2 the default delivery limit of 20 "
                "would drop it: see 'Delivery counts' in docs/operations.md"
            )
        return notes


class DlqSession:
    """One connection that holds the DLQ's lock and consumes it without taking anything."""

    def __init__(self, connection: AbstractConnection, dlq: str, address: str) -> None:
        self.connection = connection
        self.dlq = dlq
        self.address = address  # host:port, for messages
        self.channel: AbstractChannel | None = None
        self.scan = Scan(0)
        self._inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        self._held = 0
        self._prefetch = 0
        self._closed: asyncio.Future[Any] | None = None

    async def start(self, *, wait: float, notify: Notify) -> None:
        """Take the lock, wait for the queue to have no consumer, then start consuming."""
        await queue_state(self.connection, self.dlq, self.address)  # missing? say so first
        await self._lock(wait, notify)
        ready = await self._ready_without_consumers()
        self.scan = Scan(ready)
        self._prefetch = min(max(ready, 1), MAX_HELD)
        self.channel = await open_channel(self.connection, prefetch=self._prefetch)
        self._closed = asyncio.ensure_future(self.channel.closed())
        if ready:
            with broker_errors(f"consuming {self.dlq}"):
                queue = await self.channel.get_queue(self.dlq, ensure=False)
                await queue.consume(self._inbox.put)

    async def _lock(self, wait: float, notify: Notify) -> None:
        deadline = time.monotonic() + wait
        told = False
        while True:
            channel = await open_channel(self.connection)
            try:
                await channel.declare_queue(
                    f"{self.dlq}.lock",
                    exclusive=True,
                    auto_delete=True,
                    arguments={"x-queue-type": "classic"},
                )
                return
            except aiormq.exceptions.ChannelLockedResource:
                if time.monotonic() >= deadline:
                    raise BrokerError(
                        f"another dlq command is working on {self.dlq} (it holds "
                        f"{self.dlq}.lock); run this one when it is done, or give --wait"
                    ) from None
                if not told:
                    notify(f"waiting for another dlq command on {self.dlq} to finish…")
                    told = True
                await asyncio.sleep(LOCK_RETRY)
            except aiormq.exceptions.AMQPError as exc:
                raise BrokerError(f"taking the lock {self.dlq}.lock failed: {exc}") from exc

    async def _ready_without_consumers(self) -> int:
        """The DLQ's depth once no consumer holds its messages (an earlier command's consumer
        is removed, and its messages returned, in the same step inside the queue)."""
        deadline = time.monotonic() + CONSUMERS_GONE_TIMEOUT
        while True:
            ready, consumers = await queue_state(self.connection, self.dlq, self.address)
            if consumers == 0:
                return ready
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"{self.dlq} has {consumers} consumer(s) that are not dlq commands; "
                    "stop them first: a dlq command must be the queue's only consumer"
                )
            await asyncio.sleep(0.2)

    async def take(self) -> AbstractIncomingMessage | None:
        """The next dead letter of this pass, held; None when the pass is over."""
        if self.channel is not None and self.channel.is_closed:
            raise self._lost()
        scan = self.scan
        if scan.scanned >= scan.expected:
            return None
        if self._held >= self._prefetch:
            scan.stopped_early = f"one command can hold at most {MAX_HELD} messages"
            return None
        message = await self._next_delivery()
        if message is None:
            scan.stopped_early = f"no delivery for {IDLE_TIMEOUT:.0f} s"
            return None
        scan.scanned += 1
        self._held += 1
        deliveries = (message.headers or {}).get(DELIVERY_COUNT)
        if isinstance(deliveries, int):
            scan.most_deliveries = max(scan.most_deliveries, deliveries)
        return message

    async def _next_delivery(self) -> AbstractIncomingMessage | None:
        assert self._closed is not None
        if not self._inbox.empty():  # the common case: the broker is ahead of us
            return self._inbox.get_nowait()
        getter = asyncio.ensure_future(self._inbox.get())
        done, _ = await asyncio.wait(
            {getter, self._closed}, timeout=IDLE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if getter in done:
            return getter.result()
        getter.cancel()
        if self._closed in done:
            raise self._lost()
        return None

    def _lost(self) -> BrokerError:
        return BrokerError(
            f"the channel to {self.address} closed; every dead letter not yet moved or "
            "deleted is back in the DLQ"
        )

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Remove `message` from the DLQ (its copy or export is safe by now)."""
        with broker_errors(f"acking a message of {self.dlq}"):
            await message.ack()
        self._held -= 1

    async def close(self) -> None:
        """Close the connection: the broker returns every held message, in the order it was
        delivered, and deletes the lock."""
        with contextlib.suppress(Exception):
            await self.connection.close()
        if self._closed is not None:
            self._closed.cancel()


async def queue_state(connection: AbstractConnection, queue: str, address: str) -> tuple[int, int]:
    """(ready messages, consumers) of `queue`; BrokerError saying so when it does not exist."""
    channel = await open_channel(connection)
    try:
        declared = await channel.declare_queue(queue, passive=True)
    except aiormq.exceptions.ChannelNotFoundEntity:
        raise BrokerError(
            f"queue {queue} does not exist on {address}: check CONSUMER_QUEUE (the DLQ is "
            "named after it) and the vhost in CONSUMER_AMQP_URL"
        ) from None
    except (aiormq.exceptions.AMQPError, OSError) as exc:
        raise BrokerError(f"checking queue {queue} failed: {exc}") from exc
    with contextlib.suppress(Exception):
        await channel.close()
    result = declared.declaration_result
    return result.message_count or 0, result.consumer_count or 0


@contextlib.contextmanager
def publish_errors(action: str) -> Iterator[None]:
    """broker_errors, plus a header value the AMQP encoder refuses (nothing was sent then)."""
    with broker_errors(action):
        try:
            yield
        except (TypeError, ValueError) as exc:
            raise BrokerError(f"{action} failed: a header cannot be encoded: {exc}") from exc


@contextlib.asynccontextmanager
async def locked_session(
    url: str, dlq: str, *, wait: float, name: str, notify: Notify
) -> AsyncIterator[DlqSession]:
    """Connect, take the DLQ's lock and start a pass; on exit every held message goes back."""
    connection = await connect(url, name=name)
    session = DlqSession(connection, dlq, broker_address(url))
    try:
        await session.start(wait=wait, notify=notify)
        yield session
    finally:
        await session.close()


async def collect(
    session: DlqSession, wanted: Filter, limit: int | None
) -> list[tuple[AbstractIncomingMessage, DeadLetterInfo]]:
    """Hold the pass's messages and keep those `wanted` matches, at most `limit` of them."""
    matched: list[tuple[AbstractIncomingMessage, DeadLetterInfo]] = []
    while limit is None or len(matched) < limit:
        message = await session.take()
        if message is None:
            break
        info = info_of(message)
        if wanted.matches(info):
            matched.append((message, info))
    return matched


# ── replay ───────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    work_queue: str
    limit: int | None = None
    rate: float | None = None  # messages per second; None = as fast as confirms allow
    to_origin: bool = False
    dry_run: bool = False


@dataclass(slots=True)
class ReplaySummary:
    moved: int = 0
    skipped: int = 0  # scanned, did not match: left in the DLQ
    failed: int = 0  # matched, could not be re-published: left in the DLQ
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)  # the first few failures, for the operator
    aborted: str | None = None  # why the replay stopped before the end, if it did
    scan: Scan = field(default_factory=lambda: Scan(0))
    would_move: list[DeadLetterInfo] = field(default_factory=list)  # dry run only

    def note_failure(self, error: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(error)

    @property
    def ok(self) -> bool:
        return self.failed == 0 and self.aborted is None

    def progress_note(self) -> str:
        return f"moved {self.moved} skipped {self.skipped} failed {self.failed}"

    def as_json(self, *, dry_run: bool = False) -> dict[str, Any]:
        figures = {
            "moved": self.moved,
            "skipped": self.skipped,
            "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "errors": self.errors,
            "aborted": self.aborted,
            **self.scan.as_json(),
        }
        if dry_run:
            figures["would_move"] = [info.as_json() for info in self.would_move]
        return figures


class Pacer:
    """Spaces publishes `1/rate` seconds apart: by `t` seconds after the first, at most
    `rate * t + 1` have gone out."""

    def __init__(self, rate: float | None) -> None:
        self._rate = rate
        self._started: float | None = None
        self._sent = 0

    async def wait(self) -> None:
        if not self._rate:
            return
        now = time.monotonic()
        if self._started is None:
            self._started = now
        delay = self._started + self._sent / self._rate - now
        if delay > 0:
            await asyncio.sleep(delay)
        self._sent += 1


class Replayer:
    """Publishes replayed copies with confirms on the session's channel: to the work queue
    through the default exchange, or (`to_origin`) to their original exchange and key."""

    def __init__(self, session: DlqSession, options: ReplayOptions) -> None:
        assert session.channel is not None
        self._session = session
        self._channel = session.channel
        self._options = options
        self._exchanges: dict[str, AbstractExchange | None] = {}

    async def publish(self, message: AbstractIncomingMessage) -> None:
        """Publish the copy and wait for the broker's confirm; BrokerError if it failed."""
        exchange, routing_key = await self._destination(message)
        copy = copy_message(message, replay_headers(message.headers, datetime.now(UTC)))
        with publish_errors(f"re-publishing {message.message_id} to {routing_key}"):
            await exchange.publish(
                copy, routing_key=routing_key, mandatory=True, timeout=PUBLISH_TIMEOUT
            )

    async def _destination(self, message: AbstractIncomingMessage) -> tuple[AbstractExchange, str]:
        if not self._options.to_origin:
            return self._channel.default_exchange, self._options.work_queue
        exchange_name, routing_key = origin_of(message.headers or {})
        if exchange_name is None or routing_key is None:
            raise BrokerError(f"{message.message_id}: its original exchange is not known")
        exchange = await self._exchange(exchange_name)
        if exchange is None:
            raise BrokerError(f"{message.message_id}: exchange {exchange_name!r} does not exist")
        return exchange, routing_key

    async def _exchange(self, name: str) -> AbstractExchange | None:
        if name == "":
            return self._channel.default_exchange
        if name not in self._exchanges:
            self._exchanges[name] = await self._existing_exchange(name)
        return self._exchanges[name]

    async def _existing_exchange(self, name: str) -> AbstractExchange | None:
        """The exchange if it exists, checked on a side channel: publishing to a missing
        exchange would close the consuming channel and end the pass."""
        side = await open_channel(self._session.connection)
        try:
            await side.declare_exchange(name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return None
        except aiormq.exceptions.AMQPError as exc:
            raise BrokerError(f"checking exchange {name} failed: {exc}") from exc
        with contextlib.suppress(Exception):
            await side.close()
        return await self._channel.get_exchange(name, ensure=False)


async def replay(
    session: DlqSession,
    wanted: Filter,
    options: ReplayOptions,
    make_progress: ProgressFactory,
) -> ReplaySummary:
    """Move the matching dead letters of one pass; the others stay where they are."""
    started = time.monotonic()
    summary = ReplaySummary(scan=session.scan)
    if not options.to_origin:  # fail once, clearly, rather than once per message
        await queue_state(session.connection, options.work_queue, session.address)
    if options.dry_run:
        matched = await collect(session, wanted, options.limit)
        summary.would_move = [info for _, info in matched]
        summary.skipped = session.scan.scanned - len(matched)
    else:
        progress = make_progress(session.scan.expected)
        try:
            await _move(session, wanted, options, summary, progress)
        except BrokerError as exc:
            summary.aborted = str(exc)
        finally:
            progress.close()
    summary.seconds = time.monotonic() - started
    return summary


async def _move(
    session: DlqSession,
    wanted: Filter,
    options: ReplayOptions,
    summary: ReplaySummary,
    progress: Progress,
) -> None:
    replayer = Replayer(session, options)
    pacer = Pacer(options.rate)
    while options.limit is None or summary.moved + summary.failed < options.limit:
        message = await session.take()
        if message is None:
            break
        if not wanted.matches(info_of(message)):
            summary.skipped += 1
        else:
            await pacer.wait()
            try:
                await replayer.publish(message)
            except BrokerError as exc:
                summary.note_failure(str(exc))  # the message stays held, so in the DLQ
            else:
                await session.ack(message)
                summary.moved += 1
        progress.update(session.scan.scanned, summary.progress_note())


def describe_replay(summary: ReplaySummary, options: ReplayOptions) -> str:
    """The replay's closing report (the dry run's: what would move, row by row)."""
    where = "their original exchanges" if options.to_origin else f"queue {options.work_queue}"
    if options.dry_run:
        rows = render_list(summary.would_move) if summary.would_move else "no dead letter matches"
        return (
            f"{rows}\n\ndry run: would move {len(summary.would_move)} to {where}; "
            f"{summary.skipped} did not match; {summary.scan.describe()}; nothing was changed"
        )
    lines = [
        f"replay to {where}: moved {summary.moved}, skipped {summary.skipped} (did not "
        f"match), failed {summary.failed}, in {summary.seconds:.1f} s; {summary.scan.describe()}"
    ]
    lines += [f"  failed: {error}" for error in summary.errors]
    if summary.aborted:
        lines.append(f"stopped: {summary.aborted}")
    if not summary.ok or summary.skipped:
        lines.append("every dead letter that was not moved is still in the DLQ")
    return "\n".join(lines)


# ── purge ────────────────────────────────────────────────────────────────────────────────────

Confirm = Callable[[list[DeadLetterInfo]], Awaitable[bool]]


@dataclass(slots=True)
class PurgeSummary:
    deleted: int = 0
    matched: list[DeadLetterInfo] = field(default_factory=list)
    declined: bool = False
    exported_to: Path | None = None
    scan: Scan = field(default_factory=lambda: Scan(0))


async def purge(
    session: DlqSession,
    wanted: Filter,
    *,
    limit: int | None,
    export: Path | None,
    confirm: Confirm,
) -> PurgeSummary:
    """Delete the matching dead letters of one pass, exactly those shown to `confirm`, after
    writing them to `export` (if given). Held throughout: nothing else can change them."""
    matched = await collect(session, wanted, limit)
    summary = PurgeSummary(matched=[info for _, info in matched], scan=session.scan)
    if not matched:
        return summary
    if not await confirm(summary.matched):
        summary.declined = True
        return summary
    if export is not None:
        write_export(export, [message for message, _ in matched])
        summary.exported_to = export
    for message, _ in matched:
        try:
            await session.ack(message)
        except BrokerError as exc:
            raise BrokerError(
                f"purge stopped after {summary.deleted} of {len(matched)} deletions ({exc}); "
                "the rest are still in the DLQ, and an export holds all of them"
            ) from exc
        summary.deleted += 1
    return summary


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
        return f"no dead letter matches; nothing deleted ({summary.scan.describe()})"
    if summary.declined:
        return "not confirmed; nothing deleted"
    text = f"deleted {summary.deleted} dead letters"
    if summary.exported_to is not None:
        path = summary.exported_to
        text += f"; a copy is in {path} (`vercel-consumer dlq import {path}` puts it back)"
    return text


def exported(message: AbstractIncomingMessage) -> ExportedMessage:
    """The record of `message`, headers as stored (the per-delivery counter is not stored)."""
    return ExportedMessage(
        message.body,
        {
            "content_type": message.content_type,
            "content_encoding": message.content_encoding,
            "headers": without_delivery_count(message.headers),
            "delivery_mode": int(message.delivery_mode),
            "priority": message.priority,
            "correlation_id": message.correlation_id,
            "reply_to": message.reply_to,
            "expiration": message.expiration,
            "message_id": message.message_id,
            "timestamp": message.timestamp,
            "type": message.type,
            "user_id": message.user_id,
            "app_id": message.app_id,
        },
    )


def write_export(path: Path, messages: list[AbstractIncomingMessage]) -> None:
    """Write the export and make it durable (fsync) before anything is deleted. An existing
    file is never overwritten: it may be the only copy of an earlier purge."""
    try:
        with path.open("xb") as file:
            for message in messages:
                file.write(encode_line(exported(message)))
            file.flush()
            os.fsync(file.fileno())
    except FileExistsError:
        raise ConfigError(f"{path} exists; give --export a new file name") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}; nothing was deleted") from None


# ── import ───────────────────────────────────────────────────────────────────────────────────


@dataclass(slots=True)
class ImportSummary:
    total: int = 0  # records in the file
    skipped: int = 0  # the first records, not published again (--skip)
    imported: int = 0
    error: str | None = None  # why it stopped before the end, if it did


def read_export(path: Path) -> list[ExportedMessage]:
    """Every record of an export file, all checked before anything is published."""
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    return [
        decode_line(line, number=number)
        for number, line in enumerate(lines, start=1)
        if line.strip()
    ]


def imported(record: ExportedMessage) -> aio_pika.Message:
    """The message to put back: as exported, except that a `user_id` (the broker would check
    it against our login) is kept as the `original-user-id` header, like dead letters do."""
    properties = dict(record.properties)
    headers = without_delivery_count(record.headers)
    user_id = properties.pop("user_id", None)
    if user_id:
        headers.setdefault(ORIGINAL_USER_ID, user_id)
    properties["headers"] = headers
    properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
    return aio_pika.Message(record.body, **properties)


async def import_export(
    url: str,
    dlq: str,
    records: list[ExportedMessage],
    *,
    skip: int,
    name: str,
    make_progress: ProgressFactory,
) -> ImportSummary:
    """Publish `records[skip:]` to the DLQ in order, one confirmed publish at a time, so that
    after a failure `skipped + imported` says exactly how far it got (rerun with --skip)."""
    summary = ImportSummary(total=len(records), skipped=min(skip, len(records)))
    connection = await connect(url, name=name)
    try:
        # The DLQ must exist: mandatory publishing would refuse every record anyway.
        await queue_state(connection, dlq, broker_address(url))
        channel = await open_channel(connection)
        progress = make_progress(summary.total - summary.skipped)
        try:
            await _publish_records(channel, dlq, records[summary.skipped :], summary, progress)
        except BrokerError as exc:
            summary.error = str(exc)
        finally:
            progress.close()
    finally:
        with contextlib.suppress(Exception):
            await connection.close()
    return summary


async def _publish_records(
    channel: AbstractChannel,
    dlq: str,
    records: list[ExportedMessage],
    summary: ImportSummary,
    progress: Progress,
) -> None:
    for record in records:
        with publish_errors(f"publishing record {summary.skipped + summary.imported + 1}"):
            await channel.default_exchange.publish(
                imported(record), routing_key=dlq, mandatory=True, timeout=PUBLISH_TIMEOUT
            )
        summary.imported += 1
        progress.update(summary.imported, f"imported {summary.imported}")


def describe_import(summary: ImportSummary, dlq: str) -> str:
    text = f"imported {summary.imported} of {summary.total - summary.skipped} records into {dlq}"
    if summary.error:
        done = summary.skipped + summary.imported
        text += f"\nstopped: {summary.error}\nrerun with --skip {done} to import the rest"
    return text
