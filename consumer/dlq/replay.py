"""`dlq replay`: move dead letters back, to the work queue or to where they were published.

Each matching dead letter of the pass is re-published with confirms on the session's channel
and acked once the copy is confirmed (consumer/dlq/session.py); the broker handles a channel's
frames in order, so a crash duplicates at most the one message whose copy was confirmed but
not yet acked. One that fails, and every one that does not match, is kept in the DLQ.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiormq
from aio_pika.abc import AbstractExchange, AbstractIncomingMessage

from consumer.deadletter import copy_message, rfc3339
from consumer.dlq.model import (
    BROKER_HEADER_PREFIXES,
    BROKER_HEADERS,
    DeadLetterInfo,
    Filter,
    origin_of,
    replay_count,
)
from consumer.dlq.progress import Progress
from consumer.dlq.session import (
    PUBLISH_TIMEOUT,
    DlqSession,
    Scan,
    info_of,
    look,
    publish_errors,
    queue_state,
    stored_headers,
    until_broker_error,
)
from consumer.errors import BrokerError
from consumer.headers import (
    ATTEMPTS,
    DEAD_LETTERED_AT,
    DETAIL,
    FIRST_ATTEMPT_AT,
    HTTP_STATUS,
    LAST_ERROR,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    REASON,
    REPLAY_COUNT,
    REPLAYED_AT,
)
from consumer.ratelimit import RequestRate
from consumer.topology import open_channel

# Headers of the failed attempts, removed on replay: the attempt counter and the retry age
# restart, and a later dead letter must not show a stale status or reason.
FAILURE_HEADERS = (
    ATTEMPTS,
    FIRST_ATTEMPT_AT,
    LAST_ERROR,
    REASON,
    DETAIL,
    HTTP_STATUS,
    DEAD_LETTERED_AT,
)

ProgressFactory = Callable[[int], Progress]


@dataclass(frozen=True, slots=True)
class ReplayOptions:
    work_queue: str
    exchange: str = ""  # the relay's exchange: the only origin --to-origin publishes to
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


def _without_broker_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """`headers` minus what the broker wrote (x-delivery-count, x-death, x-*-death-*)."""
    return {
        name: value
        for name, value in headers.items()
        if name not in BROKER_HEADERS and not name.startswith(BROKER_HEADER_PREFIXES)
    }


def replay_headers(headers: Mapping[str, Any] | None, now: datetime) -> dict[str, Any]:
    """Headers of a replayed copy: a fresh start (no attempts, no failure, no broker history),
    the original exchange and routing key kept, `replay-count` + 1 and `replayed-at` now."""
    original = dict(headers or {})
    exchange, routing_key = origin_of(original)
    fresh = {
        name: value
        for name, value in _without_broker_headers(original).items()
        if name not in FAILURE_HEADERS
    }
    if exchange is not None and routing_key is not None:
        fresh[ORIGINAL_EXCHANGE] = exchange
        fresh[ORIGINAL_ROUTING_KEY] = routing_key
    fresh[REPLAY_COUNT] = replay_count(original) + 1
    fresh[REPLAYED_AT] = rfc3339(now)
    return fresh


class Replayer:
    """Publishes replayed copies with confirms on the session's channel: to the work queue
    through the default exchange, or (`to_origin`) to their original exchange and key."""

    def __init__(self, session: DlqSession, options: ReplayOptions) -> None:
        self._session = session
        self._channel = session.channel
        self._options = options
        self._exchanges: dict[str, AbstractExchange | None] = {}

    async def publish(self, message: AbstractIncomingMessage) -> None:
        """Publish the copy and wait for the broker's confirm; BrokerError if it failed."""
        exchange, routing_key = await self._destination(message)
        headers = replay_headers(stored_headers(message), datetime.now(UTC))
        with publish_errors(f"re-publishing {message.message_id!r} to {routing_key!r}"):
            await self._session.unless_lost(
                exchange.publish(
                    copy_message(message, headers),
                    routing_key=routing_key,
                    mandatory=True,
                    timeout=PUBLISH_TIMEOUT,
                )
            )

    async def _destination(self, message: AbstractIncomingMessage) -> tuple[AbstractExchange, str]:
        if not self._options.to_origin:
            return self._channel.default_exchange, self._options.work_queue
        exchange_name, routing_key = self._trusted_origin(message)
        exchange = await self._exchange(exchange_name)
        if exchange is None:
            raise BrokerError(f"{message.message_id!r}: exchange {exchange_name!r} does not exist")
        return exchange, routing_key

    def _trusted_origin(self, message: AbstractIncomingMessage) -> tuple[str, str]:
        """The recorded origin, when it is one the relay consumes from: its exchange, or the
        default exchange with the work queue's name. Anything else was not written by the
        relay (a publisher can preset those headers): never publish there with our login."""
        exchange, routing_key = origin_of(message.headers or {})
        if exchange is None or routing_key is None:
            raise BrokerError(f"{message.message_id!r}: its original exchange is not known")
        options = self._options
        if exchange == options.exchange or (exchange, routing_key) == ("", options.work_queue):
            return exchange, routing_key
        raise BrokerError(
            f"{message.message_id!r}: its headers name exchange {exchange!r}, which is not the "
            f"relay's ({options.exchange!r}); replay it without --to-origin"
        )

    async def _exchange(self, name: str) -> AbstractExchange | None:
        if name == "":
            return self._channel.default_exchange
        if name not in self._exchanges:
            self._exchanges[name] = await self._existing_exchange(name)
        return self._exchanges[name]

    async def _existing_exchange(self, name: str) -> AbstractExchange | None:
        """The exchange if it exists, checked on a side channel: publishing to a missing
        exchange would close the session's channel and end the pass."""
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
    """Move the matching dead letters of one pass; the others stay in the DLQ."""
    started = time.monotonic()
    summary = ReplaySummary(scan=session.scan)
    if not options.to_origin:  # fail once, clearly, rather than once per message
        await queue_state(session.connection, options.work_queue, session.address)
    progress = make_progress(session.scan.expected)
    if options.dry_run:
        work = _look(session, wanted, options, summary)
    else:
        work = _move(session, wanted, options, summary, progress)
    summary.aborted = await until_broker_error(work, progress)
    summary.seconds = time.monotonic() - started
    return summary


async def _look(
    session: DlqSession, wanted: Filter, options: ReplayOptions, summary: ReplaySummary
) -> None:
    summary.would_move = await look(session, wanted, options.limit)
    summary.skipped = session.scan.scanned - len(summary.would_move)


async def _move(
    session: DlqSession,
    wanted: Filter,
    options: ReplayOptions,
    summary: ReplaySummary,
    progress: Progress,
) -> None:
    replayer = Replayer(session, options)
    # Waiting for a slot happens before a message is taken, never with one in hand: however
    # slow the pace, no message is held long enough for the broker's consumer timeout.
    pace = RequestRate(options.rate or 0)
    while options.limit is None or summary.moved + summary.failed < options.limit:
        await pace.ready()
        message = await session.take()
        if message is None:
            break
        if not wanted.matches(info_of(message)):
            await session.keep(message)
            summary.skipped += 1
        else:
            await pace.acquire()
            await _move_one(session, replayer, message, summary)
        progress.update(session.scan.scanned, summary.progress_note())


async def _move_one(
    session: DlqSession,
    replayer: Replayer,
    message: AbstractIncomingMessage,
    summary: ReplaySummary,
) -> None:
    try:
        await replayer.publish(message)
    except BrokerError as exc:
        summary.note_failure(str(exc))
        await session.keep(message)  # raises, ending the pass, if the channel is gone
    else:
        await session.remove(message)
        summary.moved += 1
