"""Re-publishing a delivery elsewhere before it is acked: to a retry tier, or to the DLQ.

Both keep the body byte for byte and the original properties (minus `expiration`, which would
let a dead letter vanish, and `user_id`, which the broker checks against our login; it is kept
as a header), add our headers, and publish with confirms and mandatory routing through the
default exchange. Only when the broker has confirmed may the caller ack the original.

Headers we own: `delivery-attempts`, `first-attempt-at`, `original-exchange`,
`original-routing-key`, `last-error` (retries), `dead-letter-reason`, `dead-letter-detail`,
`dead-letter-http-status`, `dead-lettered-at` (dead letters) and `replay-count`, `replayed-at`
(set by `vercel-consumer dlq replay`); their names are in consumer/headers.py. The broker's
`x-delivery-count` is dropped from copies: it counts deliveries of the original, and a copy
starts afresh.

Our headers come from us, never from the publisher. On a message from a named exchange (a
publisher's, or `dlq replay --to-origin`) every one of them is dropped before we read it or set
it: `original-exchange` and `original-routing-key` are the delivery's, the attempts start
afresh and the first attempt is now. A message that came through the default exchange was put
in the work queue by name (by one of our retry tiers, by `dlq replay`, or by someone allowed to
write to the queue itself); its origin headers are kept, and its `first-attempt-at` only when it
also carries our attempt count, is readable and is not in the future (otherwise: now).

A copy must be publishable whatever the original carried, or the message could never leave the
work queue: header strings that were not UTF-8 (pamqp hands them over as bytes, which it cannot
send) become byte arrays; headers whose name, or a name inside them, is longer than AMQP's 128
bytes (pamqp would cut it short on every copy) are dropped; and headers that would not fit in
one AMQP frame next to ours (the broker closes the whole connection over an oversized frame)
are dropped, largest first. Dropped headers are named in `dropped-headers`.

Copies of one event id never overlap on the channel: aiormq pairs a `basic.return` (an
unroutable copy) with its publish by `message_id`, one publish per id, so two copies of one id
in flight (publishers send duplicates) could have the return of one settle the other, and the
unroutable copy pass for confirmed. A copy waits for the broker's confirm at most
`confirm_timeout` seconds; then it counts as not confirmed, the channel is closed (the broker
may be stuck on it) and the caller hands the message back.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pamqp.encode
import pamqp.frame
import pamqp.header
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, HeadersType

from consumer.errors import BrokerError
from consumer.headers import (
    ATTEMPTS,
    DEAD_LETTERED_AT,
    DELIVERY_COUNT,
    DETAIL,
    DROPPED_HEADERS,
    FIRST_ATTEMPT_AT,
    HTTP_STATUS,
    LAST_ERROR,
    NOT_COPIED,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    ORIGINAL_USER_ID,
    PROPERTIES,
    REASON,
    REPLAY_COUNT,
    REPLAYED_AT,
)
from consumer.retry import DeadLetter, Retry
from consumer.topology import Topology, broker_errors

MAX_DETAIL_BYTES = 1024
# Never dropped to make room: what this copy is about, each of bounded size.
VERDICT_HEADERS = frozenset(
    {ATTEMPTS, LAST_ERROR, REASON, DETAIL, HTTP_STATUS, DEAD_LETTERED_AT, REPLAY_COUNT, REPLAYED_AT}
)
# RabbitMQ's default frame_max; all properties travel in one frame, and a publisher's message
# with larger headers was refused already. The reserve covers the other properties (at most
# 8 short strings of 255 bytes) and the frame's own fields.
FRAME_MAX = 131_072
HEADERS_LIMIT = FRAME_MAX - 4096
MAX_NAME_BYTES = 128  # AMQP's limit on a field table's key; pamqp truncates longer ones
# Written only by the relay; a publisher's values for them are never trusted (see above).
RELAY_HEADERS = frozenset(
    {
        ATTEMPTS,
        FIRST_ATTEMPT_AT,
        ORIGINAL_EXCHANGE,
        ORIGINAL_ROUTING_KEY,
        ORIGINAL_USER_ID,
        LAST_ERROR,
        REASON,
        DETAIL,
        HTTP_STATUS,
        DEAD_LETTERED_AT,
        DROPPED_HEADERS,
    }
)
ORIGIN_HEADERS = (ORIGINAL_EXCHANGE, ORIGINAL_ROUTING_KEY, ORIGINAL_USER_ID)


def attempts_made(headers: Mapping[str, Any] | None) -> int:
    """Attempts recorded by earlier retries; 0 for a fresh (or tampered-with) message."""
    value = (headers or {}).get(ATTEMPTS)
    return value if isinstance(value, int) and _is_count(value) else 0


def trusted_attempts(message: AbstractIncomingMessage) -> int:
    """`attempts_made(trusted_headers(message, now))`, without copying the headers (or reading
    the clock) when there is no attempt count to trust or distrust: every first delivery."""
    headers = message.headers
    if not headers or ATTEMPTS not in headers:
        return 0
    return attempts_made(trusted_headers(message, datetime.now(UTC)))


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1_000_000


def trusted_headers(message: AbstractIncomingMessage, now: datetime) -> HeadersType:
    """`message`'s headers, with ours only where we can have written them (module docstring)."""
    headers: HeadersType = dict(message.headers or {})
    through_default_exchange = not message.exchange
    kept = set(ORIGIN_HEADERS) if through_default_exchange else set()
    # Our count, even 0: a message only deferred so far (a rate limit) has spent no attempt,
    # and its first-attempt-at is what ages it out (CONSUMER_MAX_RETRY_AGE).
    counted = _is_count(headers.get(ATTEMPTS))
    if through_default_exchange and counted and _in_the_past(headers, now):
        kept.update((ATTEMPTS, FIRST_ATTEMPT_AT))
    return {k: v for k, v in headers.items() if k not in RELAY_HEADERS or k in kept}


def _in_the_past(headers: HeadersType, now: datetime) -> bool:
    """Whether `first-attempt-at` is readable and not after `now`."""
    first = header_time(headers, FIRST_ATTEMPT_AT)
    try:
        return first is not None and first <= now
    except OverflowError:  # an offset that takes it below year 1
        return False


def redeliveries(headers: Mapping[str, Any] | None) -> int:
    """How often the broker delivered this copy before without an outcome (0 the first time)."""
    value = (headers or {}).get(DELIVERY_COUNT)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def header_time(headers: Mapping[str, Any] | None, name: str) -> datetime | None:
    """A time stamp header as `rfc3339` wrote it, read back (no offset: UTC); None when absent
    or unreadable."""
    stamp = (headers or {}).get(name)
    if isinstance(stamp, bytes):
        stamp = stamp.decode("utf-8", errors="replace")
    if not isinstance(stamp, str):
        return None
    try:
        moment = datetime.fromisoformat(stamp)
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def retry_age(headers: Mapping[str, Any] | None, now: datetime) -> float:
    """Seconds since the message's first attempt; 0 when this is it (or the stamp is bad)."""
    first = header_time(headers, FIRST_ATTEMPT_AT)
    return 0.0 if first is None else max(0.0, (now - first).total_seconds())


def truncate_utf8(text: str, limit: int = MAX_DETAIL_BYTES) -> str:
    """At most `limit` bytes of UTF-8, cut on a character boundary, marked when cut."""
    data = text.encode("utf-8")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", errors="ignore") + "..."


def publishable_headers(headers: HeadersType, limit: int = HEADERS_LIMIT) -> HeadersType:
    """`headers` as AMQP can encode them again, within `limit` encoded bytes.

    Byte strings (header strings that were not UTF-8) become byte arrays, the same bytes. A
    header that still cannot be encoded, then the largest ones until the rest fits, are dropped
    (never one of VERDICT_HEADERS) and named in `dropped-headers`.
    """
    fixed = {name: _encodable(value) for name, value in headers.items()}
    sizes: dict[str, int] = {}
    dropped = []
    for name, value in fixed.items():
        try:
            if _has_long_name(name, value):
                raise ValueError(f"a header name is longer than {MAX_NAME_BYTES} bytes")
            sizes[name] = len(pamqp.encode.field_table({name: value}))
        except (TypeError, ValueError):
            dropped.append(name)
    total = sum(sizes.values()) + 64  # room for the dropped-headers header itself
    for name in sorted(sizes, key=sizes.__getitem__, reverse=True):
        if total <= limit:
            break
        if name not in VERDICT_HEADERS:
            dropped.append(name)
            total -= sizes[name]
    if not dropped:
        return fixed
    kept: HeadersType = {k: v for k, v in fixed.items() if k not in dropped}
    kept[DROPPED_HEADERS] = truncate_utf8(",".join(dropped))
    return kept


def _has_long_name(name: str, value: Any) -> bool:
    """Whether `name`, or a table key anywhere inside `value`, exceeds AMQP's 128 bytes."""
    if len(name.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
        return True
    if isinstance(value, list):
        return any(_has_long_name("", item) for item in value)
    if isinstance(value, dict):
        return any(_has_long_name(key, item) for key, item in value.items())
    return False


def _encodable(value: Any) -> Any:
    if isinstance(value, bytes):
        return bytearray(value)
    if isinstance(value, list):
        return [_encodable(item) for item in value]
    if isinstance(value, dict):
        return {key: _encodable(item) for key, item in value.items()}
    return value


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


CONFIRM_TIMEOUT = 30.0  # seconds; the default of CONSUMER_CONFIRM_TIMEOUT
# Seconds for closing a channel the broker may be stuck on. aio-pika gives the broker one
# heartbeat interval (10 s by default) to answer and then closes it locally; this bound only
# matters with heartbeats off.
CHANNEL_CLOSE_TIMEOUT = 30.0


class KeyedLock:
    """One holder at a time per key (keys without holders or waiters are forgotten)."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def held(self, key: str | None) -> AsyncIterator[None]:
        """Hold `key`'s lock; no lock at all for None or ""."""
        if not key:
            yield
            return
        lock, users = self._locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._locks[key]


class Republisher:
    """Publishes copies of deliveries to the retry tiers and the DLQ, with confirms."""

    def __init__(
        self,
        channel: AbstractChannel,
        topology: Topology,
        *,
        confirm_timeout: float = CONFIRM_TIMEOUT,
        big_body_bytes: int | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._channel = channel
        self._topology = topology
        self._confirm_timeout = confirm_timeout
        self._clock = clock
        self._in_flight_ids = KeyedLock()  # see the module docstring: aiormq's return pairing
        self._closing: asyncio.Task[None] | None = None
        # Copies of bodies over `big_body_bytes` (dead letters of oversized messages) are made
        # one at a time: framing a copy holds the body twice more, and 64 of them at once
        # would multiply the worker's memory (docs/operations.md, "Big messages").
        self._big_body_bytes = big_body_bytes
        self._one_big_copy = asyncio.Lock()

    async def retry(self, message: AbstractIncomingMessage, decision: Retry, error: str) -> None:
        """Park the message in the tier of `decision.delay_ms`; it returns to the work queue."""
        headers = self._carried_headers(message, decision.attempts)
        headers[LAST_ERROR] = truncate_utf8(error)
        await self._publish(message, headers, self._topology.retry_queue(decision.delay_ms))

    async def dead_letter(self, message: AbstractIncomingMessage, decision: DeadLetter) -> None:
        """Put the message in the DLQ with the reason, detail and status of `decision`."""
        headers = self._carried_headers(message, decision.attempts)
        headers[REASON] = decision.reason.value
        headers[DETAIL] = truncate_utf8(decision.detail)
        headers[DEAD_LETTERED_AT] = rfc3339(self._clock())
        if decision.status is not None:
            headers[HTTP_STATUS] = decision.status
        await self._publish(message, headers, self._topology.dead_letter_queue)

    def _carried_headers(self, message: AbstractIncomingMessage, attempts: int) -> HeadersType:
        now = self._clock()
        headers = trusted_headers(message, now)
        headers.pop(DELIVERY_COUNT, None)
        if ORIGINAL_EXCHANGE not in headers or ORIGINAL_ROUTING_KEY not in headers:
            headers[ORIGINAL_EXCHANGE] = message.exchange or ""
            headers[ORIGINAL_ROUTING_KEY] = message.routing_key or ""
        headers.setdefault(FIRST_ATTEMPT_AT, rfc3339(now))
        if message.user_id:
            headers[ORIGINAL_USER_ID] = message.user_id
        headers[ATTEMPTS] = attempts
        return headers

    async def _publish(
        self, message: AbstractIncomingMessage, headers: HeadersType, queue: str
    ) -> None:
        copy = copy_message(message, headers)
        try:
            with broker_errors(f"publishing to {queue}"):
                async with (
                    asyncio.timeout(self._confirm_timeout),
                    self._big_copy_turn(copy),
                    self._in_flight_ids.held(copy.message_id),
                ):
                    await self._channel.default_exchange.publish(
                        copy, routing_key=queue, mandatory=True
                    )
        except BrokerError as exc:
            if not isinstance(exc.__cause__, TimeoutError):
                raise
            self._abandon_channel()
            raise BrokerError(
                f"publishing to {queue} failed: no confirm from the broker within"
                f" {self._confirm_timeout:g} s (CONSUMER_CONFIRM_TIMEOUT); closing the channel"
            ) from exc

    @contextlib.asynccontextmanager
    async def _big_copy_turn(self, copy: aio_pika.Message) -> AsyncIterator[None]:
        if self._big_body_bytes is None or len(copy.body) <= self._big_body_bytes:
            yield
            return
        async with self._one_big_copy:
            yield

    def _abandon_channel(self) -> None:
        """Close the channel after a confirm that never came: the broker may be stuck on it
        (a quorum queue without a quorum blocks a channel's first publish to it), and then it
        would neither deliver nor take our acks. The worker sees the channel close and opens a
        new session; the broker requeues what this channel held. In a task of its own, so that
        the caller can hand its message back and say why before the worker cancels it."""
        if self._closing is None:
            self._closing = asyncio.create_task(self._close_channel())

    async def _close_channel(self) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CHANNEL_CLOSE_TIMEOUT):
                await self._channel.close()


def copy_message(
    message: AbstractIncomingMessage, headers: HeadersType, *, fill_frame: bool = False
) -> aio_pika.Message:
    """A persistent copy of `message`: the same body and properties with other `headers` (made
    publishable, see `publishable_headers`), and neither `expiration` (it would let the copy
    vanish) nor `user_id` (the broker checks it against our login; callers keep it as the
    `original-user-id` header).

    With `fill_frame`, headers are dropped only when the copy's header frame would not fit in
    FRAME_MAX at all, rather than to leave HEADERS_LIMIT's room for ours: for the exact copy
    that keeps a dead letter in the DLQ, which the broker took in one frame already (a header
    as large as the frame, nested 26,000 deep say, must not be lost to a `dlq list`)."""
    kept = {name: getattr(message, name) for name in PROPERTIES if name not in NOT_COPIED}

    def copy(limit: int) -> aio_pika.Message:
        return aio_pika.Message(
            message.body,
            headers=publishable_headers(headers, limit),
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            **kept,
        )

    if fill_frame:
        whole = copy(sys.maxsize)  # no header dropped for size; the frame itself is measured
        if header_frame_bytes(whole) <= FRAME_MAX:
            return whole
    return copy(HEADERS_LIMIT)


def header_frame_bytes(message: aio_pika.Message) -> int:
    """The size of `message`'s content header frame on the wire, frame header and end included
    (what must be at most the connection's frame_max)."""
    header = pamqp.header.ContentHeader(0, len(message.body), message.properties)
    return len(pamqp.frame.marshal(header, 1))
