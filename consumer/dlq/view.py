"""What a dead letter says, without touching the broker: read, filter, summarise, render.

A dead letter is its body (byte for byte what was published; possibly not JSON at all) and its
headers (consumer/deadletter.py's vocabulary, or the broker's `x-death` family when RabbitMQ
itself dead-lettered it). `DeadLetterInfo.read` turns both into one row for `dlq list`;
`Filter` decides which rows a command acts on; `Stats` counts them for `dlq stats`;
`replay_headers` gives a replayed copy its fresh start. No I/O here: the broker side is
consumer/dlq/ops.py.
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from consumer.deadletter import (
    ATTEMPTS,
    DEAD_LETTERED_AT,
    DELIVERY_COUNT,
    DETAIL,
    FIRST_ATTEMPT_AT,
    HTTP_STATUS,
    LAST_ERROR,
    ORIGINAL_EXCHANGE,
    ORIGINAL_ROUTING_KEY,
    REASON,
    REPLAY_COUNT,
    REPLAYED_AT,
    attempts_made,
    header_time,
    rfc3339,
)
from consumer.errors import ConfigError, Reason

# Reasons the broker writes into `x-first-death-reason` when it dead-letters by itself.
BROKER_REASONS = ("delivery_limit", "expired", "maxlen", "rejected")
UNKNOWN_REASON = "unknown"
# The broker's dead-lettering history. Exports keep it (it is the message's); a replayed copy
# does not: with an old `x-death` the broker can see a dead-lettering cycle and drop it.
BROKER_HEADERS = (DELIVERY_COUNT, "x-death")
BROKER_HEADER_PREFIXES = ("x-first-death-", "x-last-death-")
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
DETAIL_WIDTH = 60
TOP_ROWS = 20


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
            replay_count=_count(headers.get(REPLAY_COUNT)),
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
    """When it entered the DLQ: our `dead-lettered-at`, else the newest `x-death` time."""
    if isinstance(headers.get(DEAD_LETTERED_AT), str):
        return header_time(headers, DEAD_LETTERED_AT)
    moment = _latest_death(headers).get("time")
    return _aware(moment) if isinstance(moment, datetime) else None


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


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
        fresh.setdefault(ORIGINAL_EXCHANGE, exchange)
        fresh.setdefault(ORIGINAL_ROUTING_KEY, routing_key)
    fresh[REPLAY_COUNT] = _count(original.get(REPLAY_COUNT)) + 1
    fresh[REPLAYED_AT] = rfc3339(now)
    return fresh


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


_STATUS = re.compile(r"^[1-5]([0-9]{2}|xx)$")
_RELATIVE = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def known_reasons() -> tuple[str, ...]:
    return (*(reason.value for reason in Reason), *BROKER_REASONS, UNKNOWN_REASON)


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
        return _aware(datetime.fromisoformat(text.strip()))
    except ValueError:
        raise ConfigError(
            f"{text!r} is neither an ISO 8601 time (2026-11-26T10:00:00Z) nor an age (2h)"
        ) from None


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
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def render_table(header: list[str], rows: list[list[str]], *, right: tuple[int, ...] = ()) -> str:
    """A plain text table: columns as wide as their widest cell, two spaces apart."""
    widths = [max(len(row[column]) for row in [header, *rows]) for column in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = [
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line([title.upper() for title in header]), *map(line, rows)])
