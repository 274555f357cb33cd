"""The circuit breaker's pure state machine: when it opens, how it probes, when it closes."""

from __future__ import annotations

from consumer.breaker import CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock, **options: object) -> tuple[CircuitBreaker, list[str]]:
    changes: list[str] = []
    made = CircuitBreaker(
        window=10,
        failure_ratio=0.8,
        probe_delays=(1, 5),
        clock=clock,
        on_change=lambda _old, new, why: changes.append(f"{new.value}: {why}"),
        **options,  # type: ignore[arg-type]
    )
    return made, changes


def test_broad_failure_across_installations_opens_the_circuit() -> None:
    """Eight failures in ten calls, from two installations, open it and set `tripped`."""
    b, changes = breaker(Clock())
    for _ in range(2):
        b.record("icfg_ok", failed=False)
    for i in range(8):
        b.record(f"icfg_{i % 2}", failed=True)
    assert b.state is State.OPEN
    assert b.is_open
    assert b.tripped.is_set()
    assert changes == ["open: 8 of the last 10 calls failed; next probe in 1 s"]


def test_too_few_calls_do_not_open_it() -> None:
    """Fewer calls than half the window never open it, however many of them failed."""
    b, _ = breaker(Clock())
    for i in range(4):
        b.record(f"icfg_{i % 2}", failed=True)
    assert b.state is State.CLOSED


def test_one_failing_installation_never_opens_it() -> None:
    """All failures from one installation: that installation's problem, not an outage."""
    b, _ = breaker(Clock())
    for _ in range(30):
        b.record("icfg_broken", failed=True)
    assert b.state is State.CLOSED
    assert not b.tripped.is_set()


def test_successes_keep_the_ratio_below_the_threshold() -> None:
    """Failures interleaved with enough successes (2xx or 4xx) keep it closed."""
    b, _ = breaker(Clock())
    for i in range(40):
        b.record(f"icfg_{i % 3}", failed=i % 3 != 0)  # 67 % failures < 80 %
    assert b.state is State.CLOSED


def test_a_probe_is_due_after_the_delay_and_success_closes() -> None:
    """Open → (delay) → half-open by begin_probe → closed by a success; tripped is cleared."""
    clock = Clock()
    b, changes = breaker(clock)
    for i in range(10):
        b.record(f"icfg_{i % 2}", failed=True)
    assert b.probe_due_in() == 1.0
    clock.now += 1
    assert b.probe_due_in() == 0.0
    b.begin_probe()
    assert b.state is State.HALF_OPEN
    b.record("icfg_0", failed=False)
    assert b.state is State.CLOSED
    assert not b.tripped.is_set()
    assert changes[1:] == ["half_open: probing", "closed: probe succeeded"]


def test_a_failed_probe_reopens_with_the_next_delay() -> None:
    """Each failed probe waits longer, up to the last delay; closing resets the ladder."""
    clock = Clock()
    b, _ = breaker(clock)
    for i in range(10):
        b.record(f"icfg_{i % 2}", failed=True)
    delays = []
    for _ in range(3):
        b.begin_probe()
        b.record("icfg_0", failed=True)
        delays.append(b.probe_due_in())
    assert delays == [5.0, 5.0, 5.0]
    b.begin_probe()
    b.record("icfg_0", failed=False)
    for i in range(10):
        b.record(f"icfg_{i % 2}", failed=True)
    assert b.probe_due_in() == 1.0


def test_late_results_while_open_change_nothing() -> None:
    """Calls that were in flight when it opened do not close or re-open it."""
    b, changes = breaker(Clock())
    for i in range(10):
        b.record(f"icfg_{i % 2}", failed=True)
    b.record("icfg_0", failed=False)
    b.record("icfg_1", failed=True)
    assert b.state is State.OPEN
    assert len(changes) == 1
