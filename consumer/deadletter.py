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

A copy must be publishable whatever the original carried, or the message could never leave the
work queue: header strings that were not UTF-8 (pamqp hands them over as bytes, which it cannot
send) become byte arrays, and headers that would not fit in one AMQP frame next to ours (the
broker closes the whole connection over an oversized frame) are dropped, largest first, and
named in `dropped-headers`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pamqp.encode
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, HeadersType

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


def attempts_made(headers: Mapping[str, Any] | None) -> int:
    """Attempts recorded by earlier retries; 0 for a fresh (or tampered-with) message."""
    value = (headers or {}).get(ATTEMPTS)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 1_000_000:
        return value
    return 0


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


class Republisher:
    """Publishes copies of deliveries to the retry tiers and the DLQ, with confirms."""

    def __init__(
        self,
        channel: AbstractChannel,
        topology: Topology,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._channel = channel
        self._topology = topology
        self._clock = clock

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
        headers: HeadersType = dict(message.headers or {})
        headers.pop(DELIVERY_COUNT, None)
        headers.setdefault(ORIGINAL_EXCHANGE, message.exchange or "")
        headers.setdefault(ORIGINAL_ROUTING_KEY, message.routing_key or "")
        headers.setdefault(FIRST_ATTEMPT_AT, rfc3339(self._clock()))
        if message.user_id:
            headers[ORIGINAL_USER_ID] = message.user_id
        headers[ATTEMPTS] = attempts
        return headers

    async def _publish(
        self, message: AbstractIncomingMessage, headers: HeadersType, queue: str
    ) -> None:
        copy = copy_message(message, headers)
        with broker_errors(f"publishing to {queue}"):
            await self._channel.default_exchange.publish(copy, routing_key=queue, mandatory=True)


def copy_message(message: AbstractIncomingMessage, headers: HeadersType) -> aio_pika.Message:
    """A persistent copy of `message`: the same body and properties with other `headers` (made
    publishable, see `publishable_headers`), and neither `expiration` (it would let the copy
    vanish) nor `user_id` (the broker checks it against our login; callers keep it as the
    `original-user-id` header)."""
    kept = {name: getattr(message, name) for name in PROPERTIES if name not in NOT_COPIED}
    return aio_pika.Message(
        message.body,
        headers=publishable_headers(headers),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        **kept,
    )
