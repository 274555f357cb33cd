"""What a dead letter is, and what its headers mean, without touching the broker.

A dead letter is its body (byte for byte what was published; possibly not JSON at all) and its
headers (consumer/headers.py's names, written by consumer/deadletter.py, or the broker's
`x-death` family when RabbitMQ itself dead-lettered it). `DeadLetterInfo.read` turns both into
one row for `dlq list`; `Filter` decides which rows a command acts on; `Stats` counts them for
`dlq stats`. Header values come from whoever published the message: every reader here accepts
any value and never fails. No I/O here: consumer/dlq/session.py is the broker side,
consumer/dlq/render.py the operator's text.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from consumer.deadletter import attempts_made, header_time, rfc3339
from consumer.errors import Reason
from consumer.headers import (
    DEAD_LETTERED_AT,
    DELIVERY_COUNT,
    DETAIL,
    HTTP_STATUS,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    REASON,
    REPLAY_COUNT,
)

# Reasons the broker writes into `x-first-death-reason` when it dead-letters by itself.
BROKER_REASONS = ("delivery_limit", "expired", "maxlen", "rejected")
UNKNOWN_REASON = "unknown"
# The broker's dead-lettering history. Exports keep it (it is the message's); a replayed copy
# does not: with an old `x-death` the broker can see a dead-lettering cycle and drop it.
BROKER_HEADERS = (DELIVERY_COUNT, "x-death")
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")


@dataclass(frozen=True, slots=True)
class DeadLetterInfo:
    """One dead letter as `dlq list` shows it. Fields the body or headers do not give are None."""

    event_id: str | None
    event_type: str | None
    installation_id: str | None
    reason: str
    status: int | None
    attempts: int
    dead_lettered_at: datetime | None
    detail: str
    replay_count: int
    body_bytes: int
    valid_json: bool

    @classmethod
    def read(
        cls, body: bytes, headers: Mapping[str, Any] | None, *, message_id: str | None = None
    ) -> DeadLetterInfo:
        """Read a dead letter's body and headers; never fails, whatever the body holds."""
        headers = headers or {}
        fields, valid_json = _body_fields(body)
        status = headers.get(HTTP_STATUS)
        return cls(
            event_id=fields.get("id") or message_id,
            event_type=fields.get("type") or origin_of(headers)[1] or None,
            installation_id=fields.get("installation_id"),
            reason=reason_of(headers),
            status=status if _is_int(status) else None,
            attempts=attempts_made(headers),
            dead_lettered_at=dead_lettered_at(headers),
            detail=_detail_of(headers),
            replay_count=replay_count(headers),
            body_bytes=len(body),
            valid_json=valid_json,
        )

    def as_json(self) -> dict[str, Any]:
        """The row for `--json` output (times as RFC 3339 strings)."""
        moment = self.dead_lettered_at
        return {
            "event_id": self.event_id,
            "type": self.event_type,
            "installation_id": self.installation_id,
            "reason": self.reason,
            "status": self.status,
            "attempts": self.attempts,
            "dead_lettered_at": rfc3339(moment) if moment else None,
            "detail": self.detail,
            "replay_count": self.replay_count,
            "body_bytes": self.body_bytes,
            "valid_json": self.valid_json,
        }


def _body_fields(body: bytes) -> tuple[dict[str, str], bool]:
    """The string fields `id`, `type`, `installation_id` of a JSON object body, if any."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return {}, False
    if not isinstance(parsed, dict):
        return {}, True
    keys = ("id", "type", "installation_id")
    return {key: parsed[key] for key in keys if isinstance(parsed.get(key), str)}, True


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: Any) -> int:
    return value if _is_int(value) and value >= 0 else 0


def replay_count(headers: Mapping[str, Any]) -> int:
    """How often `dlq replay` has moved this message back before (0 when unreadable)."""
    return _count(headers.get(REPLAY_COUNT))


def _latest_death(headers: Mapping[str, Any]) -> Mapping[str, Any]:
    """The newest `x-death` entry (the broker keeps them newest first), or {}."""
    deaths = headers.get("x-death")
    if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping):
        return deaths[0]
    return {}


def reason_of(headers: Mapping[str, Any]) -> str:
    """Our `dead-letter-reason`, else the broker's `x-first-death-reason`, else "unknown"."""
    for value in (headers.get(REASON), headers.get("x-first-death-reason")):
        if isinstance(value, str) and value:
            return value
    return UNKNOWN_REASON


def _detail_of(headers: Mapping[str, Any]) -> str:
    detail = headers.get(DETAIL)
    if isinstance(detail, str):
        return detail
    queue = headers.get("x-first-death-queue")
    if isinstance(queue, str):
        return f"dead-lettered by RabbitMQ from {queue} ({reason_of(headers)})"
    return ""


def dead_lettered_at(headers: Mapping[str, Any]) -> datetime | None:
    """When it entered the DLQ, in UTC: our `dead-lettered-at`, else the newest `x-death`
    time; None when neither is a time UTC can hold (`0001-01-01T00:00:00+01:00` is not)."""
    if isinstance(headers.get(DEAD_LETTERED_AT), str):
        moment = header_time(headers, DEAD_LETTERED_AT)
    else:
        death_time = _latest_death(headers).get("time")
        moment = death_time if isinstance(death_time, datetime) else None
    return in_utc(moment) if moment is not None else None


def in_utc(moment: datetime) -> datetime | None:
    """`moment` in UTC (naive means UTC already); None when that falls outside year 1-9999."""
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:
        return None


def origin_of(headers: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """Where the event was first published: (exchange, routing key), from our headers or the
    broker's `x-death`; None where unknown."""
    exchange, routing_key = headers.get(ORIGINAL_EXCHANGE), headers.get(ORIGINAL_ROUTING_KEY)
    if isinstance(exchange, str) and isinstance(routing_key, str):
        return exchange, routing_key
    death = _latest_death(headers)
    keys = death.get("routing-keys")
    first_key = keys[0] if isinstance(keys, list) and keys else None
    death_exchange = death.get("exchange")
    return (
        death_exchange if isinstance(death_exchange, str) else None,
        first_key if isinstance(first_key, str) else None,
    )


def without_delivery_count(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """`headers` as the message carries them, minus the broker's per-delivery counter (a
    quorum queue overwrites it only from the second delivery on: a copy that kept it would
    arrive looking redelivered)."""
    return {name: value for name, value in (headers or {}).items() if name != DELIVERY_COUNT}


# ── filters ──────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Filter:
    """Which dead letters a command acts on; every criterion given must hold (None = any).

    `status` is an exact code (404) or a class ("4xx"); `since` is inclusive, `until`
    exclusive, both on the dead-lettered-at time (a dead letter without one matches neither).
    """

    reason: str | None = None
    type_glob: str | None = None
    installation: str | None = None
    status: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def matches(self, info: DeadLetterInfo) -> bool:
        return (
            (self.reason is None or info.reason == self.reason)
            and (self.type_glob is None or _glob(info.event_type, self.type_glob))
            and (self.installation is None or info.installation_id == self.installation)
            and (self.status is None or _status_matches(info.status, self.status))
            and self._in_window(info.dead_lettered_at)
        )

    def _in_window(self, moment: datetime | None) -> bool:
        if self.since is None and self.until is None:
            return True
        if moment is None:
            return False
        return (self.since is None or moment >= self.since) and (
            self.until is None or moment < self.until
        )

    @property
    def is_everything(self) -> bool:
        return self == Filter()


def _glob(value: str | None, pattern: str) -> bool:
    return value is not None and fnmatch.fnmatchcase(value, pattern)


def _status_matches(status: int | None, wanted: str) -> bool:
    if status is None:
        return False
    if wanted.endswith("xx"):
        return str(status)[:1] == wanted[:1]
    return str(status) == wanted


def known_reasons() -> tuple[str, ...]:
    return (*(reason.value for reason in Reason), *BROKER_REASONS, UNKNOWN_REASON)


# ── stats ────────────────────────────────────────────────────────────────────────────────────


@dataclass(slots=True)
class Stats:
    """Counts of dead letters by reason, type, installation and HTTP status, and their span."""

    total: int = 0
    by_reason: Counter[str] = field(default_factory=Counter)
    by_type: Counter[str] = field(default_factory=Counter)
    by_installation: Counter[str] = field(default_factory=Counter)
    by_status: Counter[str] = field(default_factory=Counter)
    oldest: datetime | None = None
    newest: datetime | None = None

    def add(self, info: DeadLetterInfo) -> None:
        self.total += 1
        self.by_reason[info.reason] += 1
        self.by_type[info.event_type or "-"] += 1
        self.by_installation[info.installation_id or "-"] += 1
        self.by_status[str(info.status) if info.status is not None else "-"] += 1
        moment = info.dead_lettered_at
        if moment is not None:
            self.oldest = moment if self.oldest is None else min(self.oldest, moment)
            self.newest = moment if self.newest is None else max(self.newest, moment)

    def as_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "oldest_dead_lettered_at": rfc3339(self.oldest) if self.oldest else None,
            "newest_dead_lettered_at": rfc3339(self.newest) if self.newest else None,
            "by_reason": dict(self.by_reason.most_common()),
            "by_type": dict(self.by_type.most_common()),
            "by_installation": dict(self.by_installation.most_common()),
            "by_status": dict(self.by_status.most_common()),
        }


def summarize(infos: Iterable[DeadLetterInfo]) -> Stats:
    stats = Stats()
    for info in infos:
        stats.add(info)
    return stats
