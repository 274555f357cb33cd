"""Client-side rate limits: Vercel's quota headers, per-installation waits, the global rate."""

from __future__ import annotations

import pytest

from consumer.ratelimit import InstallationLimits, Quota, RequestRate, parse_quota


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
