"""Pure retry policy: a failed attempt → retry after a tier's delay, or a dead letter.

Retries wait in queues with a fixed `x-message-ttl` (a per-message TTL on a shared queue would
block behind its head), so a delay is always one of a fixed ladder of tiers. Jitter comes from
the ladder itself: each configured delay is offered at several spreads (±20 % by default), and
each retry picks one at random, so a burst that failed together does not return together.
`Retry-After` from Vercel is a floor: the chosen tier is the shortest one at least that long
(or the longest tier, when Vercel asks for more than any tier holds).

A message's retry budget is spent by count (`max_attempts`) and by time (`max_age`, from its
first attempt). Some failures do not spend an attempt (waiting out a rate limit, or failing
while Vercel is down for everyone and the circuit is open); they still age the message.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from consumer.errors import DeliveryError, Reason, VercelError

JITTER_FACTORS = (0.8, 0.9, 1.0, 1.1, 1.2)
# The longest wait a `Retry-After` (or a quota's reset) can impose: Vercel asks for seconds to
# minutes; a bigger value is a broken proxy or header, and must not block an installation until
# the process restarts (docs/contract.md, "Retry-After").
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class Retry:
    """Publish to the retry tier of `delay_ms`; `attempts` have been made so far."""

    delay_ms: int
    attempts: int


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Publish to the DLQ with this reason, human-readable detail and Vercel's status."""

    reason: Reason
    detail: str
    status: int | None
    attempts: int


Decision = Retry | DeadLetter


class RetryPolicy:
    """Decides what follows a failed attempt, from the error and the attempts made."""

    def __init__(
        self,
        delays: Sequence[float],
        max_attempts: int,
        *,
        max_age: float = 86_400.0,
        jitter: Sequence[float] = JITTER_FACTORS,
        rng: random.Random | None = None,
    ) -> None:
        if not delays or max_attempts < 1:
            raise ValueError("need at least one delay and one attempt")
        self._delays = tuple(delays)
        self._jitter = tuple(jitter)
        self._max_attempts = max_attempts
        self._max_age = max_age
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self.tiers_ms = tuple(
            sorted({round(delay * factor * 1000) for delay in delays for factor in jitter})
        )

    def decide(
        self, error: DeliveryError, attempts: int, *, age: float = 0.0, counted: bool = True
    ) -> Decision:
        """What follows a failure. `attempts` counts every attempt made, the one that just
        failed included; `age` is seconds since the first; `counted=False` (or an error that
        does not count) keeps this one from spending the budget of attempts."""
        status = error.status if isinstance(error, VercelError) else None
        if error.reason is not None:
            return DeadLetter(error.reason, error.detail, status, attempts)
        if age >= self._max_age:
            detail = (
                f"gave up after {age:.0f} s (max retry age {self._max_age:.0f} s) and"
                f" {attempts} attempts; last error: {error.detail}"
            )
            return DeadLetter(Reason.RETRIES_EXHAUSTED, detail, status, attempts)
        retry_after = getattr(error, "retry_after", None)
        if not (counted and error.counts_attempt):
            return Retry(self.delay_for(1, retry_after), attempts - 1)
        if attempts >= self._max_attempts:
            detail = f"gave up after {attempts} attempts; last error: {error.detail}"
            return DeadLetter(Reason.RETRIES_EXHAUSTED, detail, status, attempts)
        return Retry(self.delay_for(attempts, retry_after), attempts)

    def delay_for(self, attempts: int, retry_after: float | None = None) -> int:
        """The tier (ms) to wait in after the `attempts`-th failure."""
        base = self._delays[min(attempts, len(self._delays)) - 1]
        wanted_ms = base * self._rng.choice(self._jitter) * 1000
        if retry_after is not None and math.isfinite(retry_after):
            wanted_ms = max(wanted_ms, retry_after * 1000)
        index = bisect.bisect_left(self.tiers_ms, round(wanted_ms))
        return self.tiers_ms[min(index, len(self.tiers_ms) - 1)]


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """`Retry-After` as seconds from now, at most `MAX_RETRY_AFTER`: delta-seconds (ASCII
    digits) or an HTTP date; None if unusable. Never raises, never returns inf or NaN."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        # Compared as text first: a 309-digit number would be inf as a float.
        return min(float(value), MAX_RETRY_AFTER) if len(value) <= 8 else MAX_RETRY_AFTER
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    try:
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    except OverflowError:
        return None
    return max(0.0, min(seconds, MAX_RETRY_AFTER))
