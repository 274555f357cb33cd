"""Client-side rate limits: Vercel's quota headers, per-installation waits, the global rate."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.ratelimit import (
    PRUNE_EVERY,
    QUOTA_PROBE_GRACE,
    InstallationLimits,
    Quota,
    RequestRate,
    parse_quota,
)

HEADER_NAMES = ("x-ratelimit-remaining", "x-ratelimit-reset", "x-ratelimit-limit")


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("headers", "quota"),
    [
        ({"x-ratelimit-remaining": "7", "x-ratelimit-reset": "1030"}, Quota(7, 30.0)),
        (
            {"x-ratelimit-limit": "10", "x-ratelimit-remaining": "7", "x-ratelimit-reset": "1030"},
            Quota(7, 30.0, limit=10),
        ),
        ({"x-ratelimit-remaining": "0", "x-ratelimit-reset": "1000.5"}, Quota(0, 0.5)),
        ({"x-ratelimit-remaining": "7"}, None),
        ({"x-ratelimit-remaining": "-1", "x-ratelimit-reset": "1030"}, None),
        ({"x-ratelimit-remaining": "7", "x-ratelimit-reset": "soon"}, None),
        ({"x-ratelimit-remaining": "7", "x-ratelimit-reset": "900"}, None),  # in the past
        ({"x-ratelimit-remaining": "7", "x-ratelimit-reset": "999999"}, None),  # days away
        ({}, None),
    ],
)
def test_quota_headers_parse_or_are_ignored(headers: dict[str, str], quota: Quota | None) -> None:
    """Remaining and an epoch-seconds reset within a day make a quota; anything else none."""
    assert parse_quota(headers, now=1000.0) == quota


def test_a_known_quota_is_reserved_request_by_request() -> None:
    """With 2 left, two requests go at once and the third waits for the reset."""
    clock = Clock()
    limits = InstallationLimits(clock=clock)
    limits.observe("icfg_a", Quota(2, 10.0))
    assert [limits.wait_for("icfg_a") for _ in range(3)] == [0.0, 0.0, 10.0]
    assert limits.wait_for("icfg_b") == 0.0  # other installations are not affected
    assert limits.throttled() == 1


def test_after_a_reset_one_request_learns_the_new_quota() -> None:
    """Once the window has passed, one request goes; the rest wait for its answer."""
    clock = Clock()
    limits = InstallationLimits(clock=clock)
    limits.observe("icfg_a", Quota(0, 1.0))
    clock.now += 1.5
    assert limits.wait_for("icfg_a") == 0.0
    assert limits.wait_for("icfg_a") > 0
    limits.observe("icfg_a", Quota(5, 1.0))
    assert limits.wait_for("icfg_a") == 0.0


def test_deferred_messages_get_successive_slots_at_the_limits_rate() -> None:
    """With 10 requests per 5 s, messages deferred together are spaced 0.5 s apart from the
    end of the wait; other installations have slots of their own."""
    clock = Clock()
    limits = InstallationLimits(clock=clock)
    limits.observe("icfg_a", Quota(0, 5.0, limit=10))
    assert [limits.defer("icfg_a", 5.0) for _ in range(3)] == [5.0, 5.5, 6.0]
    assert limits.defer("icfg_b", 2.0) == 2.0
    clock.now += 60  # long after: the slots start again from the wait
    assert limits.defer("icfg_a", 1.0) == 1.0


def test_a_429_blocks_the_installation_for_its_retry_after() -> None:
    """block() holds an installation back for the given seconds, then lets it go."""
    clock = Clock()
    limits = InstallationLimits(clock=clock)
    limits.block("icfg_a", 3.0)
    assert limits.wait_for("icfg_a") == 3.0
    clock.now += 3.0
    assert limits.wait_for("icfg_a") == 0.0
    assert limits.throttled() == 0


async def test_request_rate_spaces_requests_evenly() -> None:
    """At 4/s, five requests at once are given slots 0, .25, .5, .75 and 1 s from now."""
    clock = Clock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    rate = RequestRate(4, clock=clock, sleep=sleep)
    waited = [await rate.acquire() for _ in range(5)]
    assert slept == [0.25, 0.5, 0.75, 1.0]
    assert waited == [0.0, *slept]  # what each waited, for the trace's rate-limit event


async def test_zero_means_no_global_limit() -> None:
    """CONSUMER_MAX_RPS=0 never waits."""

    async def sleep(seconds: float) -> None:
        raise AssertionError("must not sleep")

    rate = RequestRate(0, sleep=sleep)
    for _ in range(100):
        await rate.acquire()


@pytest.mark.parametrize(
    "headers",
    [
        {"x-ratelimit-remaining": "²", "x-ratelimit-reset": "1030"},
        {"x-ratelimit-remaining": "7", "x-ratelimit-reset": "\uff11\uff10\uff13\uff10"},
        {"x-ratelimit-remaining": "7", "x-ratelimit-reset": "1030", "x-ratelimit-limit": "³"},
        {"x-ratelimit-remaining": "9" * 400, "x-ratelimit-reset": "1" + "0" * 400},
        {"x-ratelimit-remaining": "7", "x-ratelimit-reset": "nan"},
        {"x-ratelimit-remaining": "7", "x-ratelimit-reset": "inf"},
    ],
)
def test_non_ascii_digits_and_absurd_numbers_are_no_quota(headers: dict[str, str]) -> None:
    """Superscript or full-width digits (digits to str.isdigit, not to int) and numbers of
    hundreds of digits give no quota (or no limit), never an exception."""
    quota = parse_quota(headers, now=1000.0)
    assert quota is None or quota.limit is None


@given(st.dictionaries(st.sampled_from(HEADER_NAMES), st.text(max_size=40)))
def test_parse_quota_never_raises(headers: dict[str, str]) -> None:
    """Any header values at all: a quota with finite, sane numbers, or None."""
    quota = parse_quota(headers, now=1000.0)
    if quota is not None:
        assert quota.remaining >= 0
        assert 0 <= quota.reset_in <= 86_400


def test_a_probe_without_quota_headers_ends_the_limit() -> None:
    """Stale quota (issue 11 case 7): after a window, the probe's answer carries no
    X-RateLimit-* headers; the installation is then unlimited, not paced at one request per
    probe grace for good."""
    clock = Clock()
    limits = InstallationLimits(clock=clock)
    limits.observe("icfg_a", Quota(0, 1.0))
    clock.now += 1.5
    assert limits.wait_for("icfg_a") == 0.0  # the probe
    limits.observe("icfg_a", None)  # 2xx without headers
    assert [limits.wait_for("icfg_a") for _ in range(10)] == [0.0] * 10
    assert limits.throttled() == 0


def test_a_failed_probe_expires_after_its_grace() -> None:
    """The probe got no answer at all (a timeout): once its grace has passed the installation
    is no longer held back, rather than being given one more probe every grace, forever."""
    clock = Clock()
    limits = InstallationLimits(clock=clock)
    limits.observe("icfg_a", Quota(0, 1.0))
    clock.now += 1.5
    assert limits.wait_for("icfg_a") == 0.0  # the probe, which never answers
    clock.now += QUOTA_PROBE_GRACE + 0.1
    assert [limits.wait_for("icfg_a") for _ in range(10)] == [0.0] * 10


def test_the_maps_are_pruned_of_passed_entries() -> None:
    """10,000 installations throttled once each leave nothing behind once their time passed:
    the maps do not grow with every id ever seen."""
    clock = Clock()
    limits = InstallationLimits(clock=clock)
    for n in range(10_000):
        limits.block(f"icfg_{n}", 1.0)
        limits.observe(f"icfg_q{n}", Quota(0, 2.0, limit=10))
        limits.defer(f"icfg_q{n}", 2.0)
    assert limits.tracked() == 20_000
    clock.now += PRUNE_EVERY + 5
    limits.wait_for("icfg_other")
    assert limits.tracked() == 0


@pytest.mark.parametrize("seconds", [math.inf, math.nan, -5.0])
def test_a_non_finite_or_negative_block_is_ignored(seconds: float) -> None:
    """block() never stores a wait that would hold an installation forever (or raise)."""
    limits = InstallationLimits(clock=Clock())
    limits.block("icfg_a", seconds)
    assert limits.wait_for("icfg_a") == 0.0
