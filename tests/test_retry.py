"""The pure retry policy: tiers, jitter, Retry-After floors, exhaustion, permanent failures."""

from __future__ import annotations

import math
import random
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.errors import (
    ContractError,
    CredentialsError,
    DeliveryError,
    Reason,
    VercelRejected,
    VercelThrottled,
    VercelUnavailable,
)
from consumer.retry import MAX_RETRY_AFTER, DeadLetter, Retry, RetryPolicy, parse_retry_after


def policy(delays: tuple[float, ...] = (1, 5, 30), attempts: int = 4) -> RetryPolicy:
    return RetryPolicy(delays, attempts, rng=random.Random(7))


def test_tiers_spread_each_delay_by_the_jitter_factors() -> None:
    """Each configured delay is offered at 80 %..120 %: five tiers per delay, in ms, sorted."""
    assert policy((1, 5)).tiers_ms == (800, 900, 1000, 1100, 1200, 4000, 4500, 5000, 5500, 6000)


def test_nth_failure_waits_in_a_tier_of_the_nth_delay() -> None:
    """Failure n waits about delays[n-1] (within the jitter), the last delay repeating."""
    p = policy()
    for attempts, base in [(1, 1000), (2, 5000), (3, 30000)]:
        decision = p.decide(VercelUnavailable("503", status=503), attempts)
        assert isinstance(decision, Retry)
        assert 0.8 * base <= decision.delay_ms <= 1.2 * base
        assert decision.attempts == attempts


def test_jitter_spreads_a_burst_over_several_tiers() -> None:
    """A hundred messages failing together do not all come back at the same moment."""
    p = policy()
    delays = {p.delay_for(1) for _ in range(100)}
    assert len(delays) >= 4


def test_retry_after_is_a_floor() -> None:
    """Retry-After longer than the scheduled delay raises the wait to the next tier above it."""
    decision = policy().decide(VercelUnavailable("429", status=429, retry_after=4.2), 1)
    assert decision == Retry(delay_ms=4500, attempts=1)


def test_retry_after_beyond_every_tier_uses_the_longest() -> None:
    """When Vercel asks for more than any tier holds, the longest tier is used."""
    assert policy().delay_for(1, retry_after=10_000) == 36000


def test_last_attempt_dead_letters_as_retries_exhausted() -> None:
    """The max_attempts-th transient failure is retries_exhausted, keeping status and error."""
    decision = policy(attempts=4).decide(VercelUnavailable("HTTP 503", status=503), 4)
    assert decision == DeadLetter(
        Reason.RETRIES_EXHAUSTED, "gave up after 4 attempts; last error: HTTP 503", 503, 4
    )


@pytest.mark.parametrize(
    ("error", "reason", "status"),
    [
        (ContractError("bad"), Reason.INVALID_MESSAGE, None),
        (CredentialsError("none"), Reason.NO_CREDENTIALS, None),
        (VercelRejected("no", status=404), Reason.REJECTED_BY_VERCEL, 404),
    ],
)
def test_permanent_failures_dead_letter_at_once(
    error: DeliveryError, reason: Reason, status: int | None
) -> None:
    """Errors with a reason dead-letter on the first attempt, whatever the budget left."""
    assert policy().decide(error, 1) == DeadLetter(reason, error.detail, status, 1)


def test_a_message_older_than_the_max_age_is_retries_exhausted() -> None:
    """Past max_age since its first attempt a transient failure dead-letters, attempts or not."""
    p = RetryPolicy((1, 5), 100, max_age=3600, rng=random.Random(7))
    decision = p.decide(VercelUnavailable("HTTP 503", status=503), 2, age=3600.5)
    assert isinstance(decision, DeadLetter)
    assert decision.reason is Reason.RETRIES_EXHAUSTED
    assert decision.detail.startswith("gave up after 3600 s (max retry age 3600 s) and 2 attempts")
    assert isinstance(p.decide(VercelUnavailable("HTTP 503"), 2, age=3599), Retry)


def test_a_throttled_failure_does_not_spend_an_attempt() -> None:
    """A 429 keeps the attempt count where it was, even on the last attempt, and waits at least
    its Retry-After."""
    decision = policy(attempts=4).decide(VercelThrottled("429", status=429, retry_after=4.2), 4)
    assert decision == Retry(delay_ms=4500, attempts=3)


def test_an_uncounted_failure_does_not_spend_an_attempt() -> None:
    """With counted=False (the circuit is open) a 503 on the last attempt is retried, not
    dead-lettered, and the count stays where it was."""
    decision = policy(attempts=4).decide(VercelUnavailable("503"), 4, counted=False)
    assert isinstance(decision, Retry)
    assert decision.attempts == 3


def test_uncounted_failures_still_age_out() -> None:
    """Waiting out rate limits is bounded too: past max_age a 429 dead-letters."""
    p = RetryPolicy((1,), 4, max_age=60, rng=random.Random(7))
    decision = p.decide(VercelThrottled("429", status=429), 1, age=61)
    assert isinstance(decision, DeadLetter)
    assert decision.reason is Reason.RETRIES_EXHAUSTED


def test_internal_errors_are_retried() -> None:
    """A DeliveryError without a reason (e.g. a bug) is retried, not dead-lettered at once."""
    assert isinstance(policy().decide(DeliveryError("internal error: KeyError"), 1), Retry)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        (" 7 ", 7.0),
        ("Thu, 26 Nov 2026 10:00:30 GMT", 30.0),
        ("Thu, 26 Nov 2026 09:00:00 GMT", 0.0),
        ("soon", None),
        ("-5", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_parses_seconds_and_http_dates(
    value: str | None, seconds: float | None
) -> None:
    """Retry-After is delta-seconds or an HTTP date (past dates mean now); garbage is None."""
    now = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == seconds


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("9" * 309, MAX_RETRY_AFTER),  # inf as a float
        ("86400000", MAX_RETRY_AFTER),
        ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_AFTER),
        ("²", None),
        ("١٢", None),  # Arabic-Indic digits
        ("12.5", None),
    ],
)
def test_absurd_retry_after_is_capped_or_ignored(value: str, seconds: float | None) -> None:
    """Issue 11 case 4: a Retry-After of hundreds of digits, or a date centuries away, waits
    MAX_RETRY_AFTER at most; digits that are not ASCII are no Retry-After at all."""
    now = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)
    assert parse_retry_after(value, now=now) == seconds


@given(st.text(max_size=400) | st.from_regex(r"[0-9]{1,400}", fullmatch=True))
def test_any_retry_after_gives_a_tier_without_raising(value: str) -> None:
    """Whatever the header says, parsing and choosing a tier never raise (the OverflowError of
    `round(inf)` left messages neither acked nor rejected), and the wait is finite."""
    retry_after = parse_retry_after(value)
    assert retry_after is None or 0 <= retry_after <= MAX_RETRY_AFTER
    policy().decide(VercelUnavailable("503", status=503, retry_after=retry_after), 1)
    assert policy().delay_for(1, math.inf) in policy().tiers_ms
