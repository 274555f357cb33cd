"""Client-side rate limits: a global cap on requests per second, and per-installation quotas
learned from Vercel's answers.

Vercel limits each integration per installation and says so on its answers:
`X-RateLimit-Remaining` of `X-RateLimit-Limit` requests are left until `X-RateLimit-Reset`
(epoch seconds), and a 429 carries `Retry-After`. `InstallationLimits` remembers this per
installation and tells the handler how long an installation must still wait before its next
request: the handler holds a short wait in place and defers a long one to a retry tier, so a
throttled installation never keeps consumer slots from the others. Deferred messages of one
installation are given successive slots, spaced by its limit's rate (`defer`), so that a
backlog returns about as fast as Vercel will take it instead of all at once, over and over.
`RequestRate` spaces all requests to `CONSUMER_MAX_RPS`, for partners whose agreement with
Vercel sets a global budget.

Pure: a clock is injected; nothing here knows about HTTP or the broker.
"""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

Clock = Callable[[], float]
QUOTA_PROBE_GRACE = 2.0  # seconds to wait for the answer that tells a new window's quota
PRUNE_EVERY = 60.0  # seconds between sweeps of entries whose time has passed
_COUNT = re.compile(r"[0-9]{1,18}", re.ASCII)
_EPOCH = re.compile(r"[0-9]{1,18}(\.[0-9]{1,9})?", re.ASCII)


@dataclass(frozen=True, slots=True)
class Quota:
    """What one answer said about its installation's quota: requests left, seconds to reset."""

    remaining: int
    reset_in: float
    limit: int | None = None


def parse_quota(headers: Mapping[str, str], *, now: float | None = None) -> Quota | None:
    """`X-RateLimit-Remaining` and `X-RateLimit-Reset` (epoch seconds), or None if either is
    missing or unusable. `headers` must look names up case-insensitively (as aiohttp's do)."""
    remaining = _count(headers.get("x-ratelimit-remaining"))
    reset_at = _epoch(headers.get("x-ratelimit-reset"))
    if remaining is None or reset_at is None:
        return None
    reset_in = reset_at - (time.time() if now is None else now)
    if not 0 <= reset_in <= 86_400:  # a reset in the past or a day away is not believable
        return None
    return Quota(remaining, reset_in, _count(headers.get("x-ratelimit-limit")) or None)


def _count(value: str | None) -> int | None:
    """A header of ASCII digits as an int, else None (`²` is a digit to `str.isdigit` but not
    to `int`, and a 400-digit number is no real count)."""
    value = (value or "").strip()
    return int(value) if _COUNT.fullmatch(value) else None


def _epoch(value: str | None) -> float | None:
    """Epoch seconds, maybe with a fraction, in ASCII digits; else None."""
    value = (value or "").strip()
    return float(value) if _EPOCH.fullmatch(value) else None


class InstallationLimits:
    """Per installation: until when it is blocked (after a 429) and the quota it has left.

    Entries whose time has passed are swept every `PRUNE_EVERY` seconds, so that the maps stay
    as small as the set of installations throttled right now, however many ids come by."""

    def __init__(self, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._blocked_until: dict[str, float] = {}
        self._quota: dict[str, tuple[int, float]] = {}  # remaining, monotonic reset time
        self._probing: set[str] = set()  # sent one request to learn a new window's quota
        self._spacing: dict[str, float] = {}  # seconds per request its limit allows
        self._next_slot: dict[str, float] = {}  # the next free slot for a deferred message
        self._next_prune = clock() + PRUNE_EVERY

    def wait_for(self, installation: str) -> float:
        """Seconds `installation` must wait before its next request; at 0 it may go now, and
        one request of its known quota is reserved for it."""
        now = self._clock()
        if now >= self._next_prune:
            self.prune(now)
        blocked_until = self._blocked_until.get(installation)
        if blocked_until is not None:
            if blocked_until > now:
                return blocked_until - now
            del self._blocked_until[installation]
        quota = self._quota.get(installation)
        if quota is None:
            return 0.0
        remaining, reset_at = quota
        if reset_at <= now:
            if installation in self._probing:
                # The probe's answer told us nothing (no X-RateLimit-* headers, or it failed):
                # forget the quota rather than pace the installation at one request per grace.
                self._forget_quota(installation)
                return 0.0
            # A new window whose size we only learn from an answer: send one request to learn
            # it, and hold the others back until its answer (or, should none come, a while).
            self._quota[installation] = (0, now + QUOTA_PROBE_GRACE)
            self._probing.add(installation)
            return 0.0
        if remaining <= 0:
            return reset_at - now
        # Reserve before sending: concurrent requests must not all spend the same last unit.
        self._quota[installation] = (remaining - 1, reset_at)
        return 0.0

    def observe(self, installation: str, quota: Quota | None) -> None:
        """Take the quota an answer reported (the freshest word on it). An answer without one
        ends a probe: the installation is no longer known to be limited."""
        if quota is None:
            if installation in self._probing:
                self._forget_quota(installation)
            return
        self._probing.discard(installation)
        self._quota[installation] = (quota.remaining, self._clock() + quota.reset_in)
        if quota.limit:
            # The longest reset seen is the closest to the window's length.
            spacing = quota.reset_in / quota.limit
            self._spacing[installation] = max(spacing, self._spacing.get(installation, 0.0))

    def defer(self, installation: str, wait: float) -> float:
        """Seconds a message of `installation` that must wait at least `wait` should be put
        away for: the next free slot after that, one slot per request its limit allows."""
        now = self._clock()
        slot = max(now + wait, self._next_slot.get(installation, 0.0))
        self._next_slot[installation] = slot + self._spacing.get(installation, 0.0)
        return slot - now

    def block(self, installation: str, seconds: float) -> None:
        """Vercel answered 429: no request for `installation` for `seconds` (a non-finite or
        negative wait is ignored: the callers cap Retry-After, this guards the map)."""
        if not (math.isfinite(seconds) and seconds > 0):
            return
        until = self._clock() + seconds
        self._blocked_until[installation] = max(until, self._blocked_until.get(installation, 0))

    def throttled(self) -> int:
        """How many installations are blocked or out of quota right now."""
        now = self._clock()
        blocked = {key for key, until in self._blocked_until.items() if until > now}
        spent = {key for key, (left, reset) in self._quota.items() if left <= 0 and reset > now}
        return len(blocked | spent)

    def tracked(self) -> int:
        """How many installations any map holds an entry for (bounded by the sweeps)."""
        maps = (self._blocked_until, self._quota, self._spacing, self._next_slot)
        return len(set().union(*maps, self._probing))

    def prune(self, now: float | None = None) -> None:
        """Drop every entry whose time has passed: it would tell `wait_for` nothing."""
        now = self._clock() if now is None else now
        self._next_prune = now + PRUNE_EVERY
        for key in [key for key, until in self._blocked_until.items() if until <= now]:
            del self._blocked_until[key]
        for key in [key for key, (_, reset) in self._quota.items() if reset <= now]:
            self._forget_quota(key)
        for key in [key for key, slot in self._next_slot.items() if slot <= now]:
            del self._next_slot[key]
        for key in [key for key in self._spacing if key not in self._quota]:
            del self._spacing[key]  # learned again from the next answer with a limit

    def _forget_quota(self, installation: str) -> None:
        self._quota.pop(installation, None)
        self._probing.discard(installation)


class RequestRate:
    """Spaces requests to at most `per_second` overall (0 = no limit), first come first served.

    Each caller reserves the next free slot and sleeps until it: a smooth stream, no bursts.
    """

    def __init__(
        self,
        per_second: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._interval = 1 / per_second if per_second > 0 else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next_free = 0.0

    async def acquire(self) -> float:
        """Wait for the next free slot; return the seconds waited (0 when none)."""
        if not self._interval:
            return 0.0
        now = self._clock()
        slot = max(self._next_free, now)
        self._next_free = slot + self._interval
        if slot <= now:
            return 0.0
        await self._sleep(slot - now)
        return slot - now

    async def ready(self) -> None:
        """Wait until the next slot is free, without taking it (`acquire` then goes at once)."""
        if self._interval:
            delay = self._next_free - self._clock()
            if delay > 0:
                await self._sleep(delay)
