"""A dlq command's hold on the DLQ: its lock, and one pass that reads the queue by moving it.

- **A lock.** Each command first declares `<dlq>.lock`, an exclusive, auto-deleting classic
  queue, on its connection. A second command's declare fails with RESOURCE_LOCKED; it retries
  for `--wait` seconds, then gives up with exit status 1. The broker deletes the lock when the
  holder's connection ends, also after `kill -9`. (`basic.consume`'s `exclusive` flag would be
  the textbook tool, but quorum queues ignore it: rabbitmq/rabbitmq-website#1973.) After the
  lock, the command waits for the DLQ to have no consumer: nothing else may hold its messages.
- **Reading moves; nothing is handed back.** RabbitMQ 4.0-4.2 count every return of a quorum
  queue's message (a requeue, or the channel closing while it holds it) towards a delivery
  limit of 20 by default, and drop the message past it when, like the DLQ, the queue has no
  dead-letter target. So a command takes one message at a time (`basic.get`) and settles it
  before the next: **kept** (an exact copy is published to the DLQ's tail and confirmed, then
  the original acked), **moved** (replay: its copy confirmed elsewhere, then acked) or
  **deleted** (purge: its export written first). A copy is a new message: its delivery count
  starts at 0, so looking never brings a dead letter nearer a limit, and even clears what
  earlier releases' commands counted. The only message ever handed back is the one in hand
  when a command is killed or loses its connection: it counts one delivery, cleared at its next
  look. It works the same on every broker version, and needs no policy.
- **One pass over what was there**, in order: the pass takes as many messages as were ready
  when it began, and a command that needs fewer (`--limit`) keeps the rest. Kept copies go to
  the tail, so after the pass the queue holds the same messages in the same order; dead
  letters that arrive meanwhile land among the copies. A pass cut short (Ctrl-C, a crash)
  leaves the queue rotated, every message still in it.
- **Settled before the next is taken**: publish, confirm, ack, one message at a time on one
  channel. A crash at any point duplicates at most the one message whose copy was confirmed
  but whose ack was not yet sent, and loses none. Memory holds one message, whatever the depth,
  and no message is held for long, so the broker's consumer timeout never strikes, however slow
  a paced replay is.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from consumer.deadletter import copy_message
from consumer.dlq.export import ExportedMessage
from consumer.dlq.model import DeadLetterInfo, Filter, without_delivery_count
from consumer.dlq.progress import Progress
from consumer.errors import BrokerError
from consumer.headers import ORIGINAL_USER_ID, PROPERTIES
from consumer.topology import broker_address, broker_errors, connect, open_channel

CONSUMERS_GONE_TIMEOUT = 5.0  # seconds for an earlier command's consumer to be removed
LOCK_RETRY = 1.0  # seconds between attempts to take the lock
PUBLISH_TIMEOUT = 30.0  # seconds for the broker to confirm one copy
GET_TIMEOUT = 30.0  # seconds for the broker to answer one basic.get

Notify = Callable[[str], None]
T = TypeVar("T")


def info_of(message: AbstractIncomingMessage) -> DeadLetterInfo:
    return DeadLetterInfo.read(message.body, message.headers, message_id=message.message_id)


def stored_headers(message: AbstractIncomingMessage) -> dict[str, Any]:
    """The headers a copy of `message` keeps: all but the broker's per-delivery counter (a
    copy is a new message), and `user_id` kept as `original-user-id` (the broker checks a
    published `user_id` against our login)."""
    headers = without_delivery_count(message.headers)
    if message.user_id:
        headers.setdefault(ORIGINAL_USER_ID, message.user_id)
    return headers


def record_of(message: AbstractIncomingMessage) -> ExportedMessage:
    """The export record of `message`: body and properties as stored."""
    properties = {name: getattr(message, name) for name in PROPERTIES}
    properties["delivery_mode"] = int(message.delivery_mode)
    properties["headers"] = without_delivery_count(message.headers)
    return ExportedMessage(message.body, properties)


@dataclass(slots=True)
class Scan:
    """How far a command got through the DLQ."""

    expected: int  # messages ready when the pass began
    scanned: int = 0
    stopped_early: str | None = None  # why the pass ended before `expected`, if it did

    def as_json(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "in_dlq_at_start": self.expected,
            "stopped_early": self.stopped_early,
        }


class DlqSession:
    """One connection that holds the DLQ's lock and passes over it once, settling every message
    it takes before the next."""

    def __init__(self, connection: AbstractConnection, dlq: str, address: str) -> None:
        self.connection = connection
        self.dlq = dlq
        self.address = address  # host:port, for messages
        self.scan = Scan(0)
        self._channel: AbstractChannel | None = None
        self._queue: aio_pika.abc.AbstractQueue | None = None
        self._closed: asyncio.Future[Any] | None = None

    @property
    def channel(self) -> AbstractChannel:
        assert self._channel is not None, "start() first"
        return self._channel

    async def start(self, *, wait: float, notify: Notify) -> None:
        """Take the lock, wait for the queue to have no consumer, then begin the pass."""
        await queue_state(self.connection, self.dlq, self.address)  # missing? say so first
        await self._lock(wait, notify)
        self.scan = Scan(await self._ready_without_consumers())
        self._channel = await open_channel(self.connection)
        self._closed = asyncio.ensure_future(self._channel.closed())
        with broker_errors(f"opening {self.dlq}"):
            self._queue = await self._channel.get_queue(self.dlq, ensure=False)

    async def new_pass(self) -> None:
        """Begin another pass over the DLQ as it is now (the lock still held)."""
        self.scan = Scan(await self._ready_without_consumers())

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
        """The DLQ's depth once no consumer holds its messages (an earlier release's command,
        ended, has its consumer removed and its messages returned in one step)."""
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
        """The next dead letter of this pass, in hand until it is kept, moved or deleted;
        None when the pass is over."""
        scan = self.scan
        if scan.scanned >= scan.expected:
            return None
        assert self._queue is not None, "start() first"
        with self._lost_channel_errors("taking a message"):
            message = await self.unless_lost(
                self._queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT)
            )
        if message is None:  # someone else took or purged the rest
            scan.stopped_early = "the DLQ ran out before the pass did"
            return None
        scan.scanned += 1
        return message

    async def finish_pass(self) -> None:
        """Keep the rest of the pass, so that the DLQ ends in its order. Best effort: where it
        cannot, every message is in the DLQ anyway, only rotated."""
        try:
            while (message := await self.take()) is not None:
                await self.keep(message)
        except BrokerError as exc:
            self.scan.stopped_early = self.scan.stopped_early or f"rotated, not reordered: {exc}"

    async def keep(self, message: AbstractIncomingMessage) -> None:
        """Leave `message` in the DLQ: its exact copy at the tail, confirmed, then the original
        acked. On failure the original stays in hand (returned when the session ends)."""
        copy = copy_message(message, stored_headers(message), fill_frame=True)
        action = f"keeping {message.message_id!r} in {self.dlq}"
        with self._lost_channel_errors(action), publish_errors(action):
            await self.unless_lost(
                self.channel.default_exchange.publish(
                    copy, routing_key=self.dlq, mandatory=True, timeout=PUBLISH_TIMEOUT
                )
            )
        await self.remove(message)

    async def remove(self, message: AbstractIncomingMessage) -> None:
        """Remove `message` from the DLQ (its copy or export is safe by now)."""
        with self._lost_channel_errors(f"acking a message of {self.dlq}"):
            await message.ack()

    async def unless_lost(self, call: Awaitable[T]) -> T:
        """`call`'s result; BrokerError as soon as the channel closes (a get or a confirm
        would otherwise wait out its timeout)."""
        assert self._closed is not None, "start() first"
        task = asyncio.ensure_future(call)
        await asyncio.wait({task, self._closed}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            task.cancel()
            raise self._lost()
        return task.result()

    @contextlib.contextmanager
    def _lost_channel_errors(self, action: str) -> Iterator[None]:
        """broker_errors, said as "the channel closed" when that is what happened (the operator
        then knows where every dead letter is)."""
        if self._is_lost():
            raise self._lost()
        try:
            with broker_errors(action):
                yield
        except BrokerError:
            if self._is_lost():
                raise self._lost() from None
            raise

    def _is_lost(self) -> bool:
        return self.connection.is_closed or (self._channel is not None and self._channel.is_closed)

    def _lost(self) -> BrokerError:
        return BrokerError(
            f"the channel to {self.address} closed; every dead letter not yet moved or "
            "deleted is still in the DLQ"
        )

    async def close(self) -> None:
        """Close the connection: the broker deletes the lock (and returns a message in hand,
        which only a failure leaves)."""
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


async def until_broker_error(work: Awaitable[None], progress: Progress) -> str | None:
    """Run `work`, showing `progress`; why it stopped early when the broker failed, else None
    (what was done so far is the caller's summary)."""
    try:
        await work
    except BrokerError as exc:
        return str(exc)
    finally:
        progress.close()
    return None


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
    """Connect, take the DLQ's lock and start a pass; at the end the pass is finished (so the
    queue keeps its order) and the lock released."""
    connection = await connect(url, name=name)
    session = DlqSession(connection, dlq, broker_address(url))
    try:
        await session.start(wait=wait, notify=notify)
        yield session
        await session.finish_pass()
    finally:
        await session.close()


async def look(session: DlqSession, wanted: Filter, limit: int | None) -> list[DeadLetterInfo]:
    """The rows of the pass's dead letters `wanted` matches (at most `limit`), keeping every
    message in the DLQ."""
    matched: list[DeadLetterInfo] = []
    async for info in each_kept(session):
        if wanted.matches(info):
            matched.append(info)
            if limit is not None and len(matched) >= limit:
                break
    return matched


async def each_kept(session: DlqSession) -> AsyncIterator[DeadLetterInfo]:
    """The row of each dead letter of the pass, each kept in the DLQ before it is yielded."""
    while (message := await session.take()) is not None:
        info = info_of(message)
        await session.keep(message)
        yield info
