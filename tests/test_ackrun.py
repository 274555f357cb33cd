"""Batched acks' bookkeeping (consumer/ackrun.py), against a model of the broker's channel."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.ackrun import AckRun, Run


class Channel:
    """What the broker holds for one channel: delivered tags not yet acked or rejected."""

    def __init__(self) -> None:
        self.unacked: set[int] = set()
        self.acked: list[int] = []

    def ack(self, tag: int, *, multiple: bool) -> list[int]:
        assert tag in self.unacked, f"ack of tag {tag}, which is not unacked (a channel error)"
        covered = sorted(t for t in self.unacked if t <= tag) if multiple else [tag]
        self.unacked -= set(covered)
        self.acked += covered
        return covered


# One step: deliver the next tag (handled, or dropped by the client library), or finish one
# of the tags being handled (completed or rejected), or flush (a run, maybe the held ones).
STEP = st.one_of(
    st.tuples(st.just("deliver"), st.booleans()),  # True: the handler never sees it
    st.tuples(st.just("finish"), st.integers(0, 10_000), st.booleans()),  # True: rejected
    st.tuples(st.just("flush"), st.booleans()),  # True: also ack the held ones one by one
)


@settings(max_examples=300, deadline=None)
@given(st.lists(STEP, max_size=200))
def test_no_tag_is_acked_before_its_outcome(steps: list[tuple[object, ...]]) -> None:
    """Whatever the order of completions, a dropped delivery and rejections: every tag an ack
    covers (a multiple one included) has completed; a rejected or never-seen tag is never
    acked; no ack names a tag the channel no longer holds; and once everything seen has
    finished and been flushed, every completed tag has been acked exactly once."""
    run, channel = AckRun(), Channel()
    handling: list[int] = []
    completed: set[int] = set()
    next_tag = 1

    def flush(held: bool) -> None:
        taken = run.take_run()
        if taken is not None:
            covered = channel.ack(taken.top, multiple=True)
            assert set(covered) <= completed, "a multiple ack covered an unfinished delivery"
            assert set(taken.tags) == set(covered)
        if held:
            for tag in run.held():
                run.released(tag)
                assert tag in completed
                channel.ack(tag, multiple=False)

    for step in steps:
        if step[0] == "deliver":
            channel.unacked.add(next_tag)
            if not step[1]:
                run.received(next_tag)
                handling.append(next_tag)
            next_tag += 1
        elif step[0] == "finish" and handling:
            tag = handling.pop(int(step[1]) % len(handling))  # type: ignore[call-overload]
            if step[2]:
                channel.unacked.discard(tag)  # basic.reject(requeue=True)
                run.released(tag)
            else:
                completed.add(tag)
                run.completed(tag)
        elif step[0] == "flush":
            flush(bool(step[1]))
    for tag in handling:
        completed.add(tag)
        run.completed(tag)
    flush(held=True)
    assert sorted(channel.acked) == sorted(completed)
    assert run.completed_count == 0


def test_a_run_stops_at_the_first_unfinished_tag() -> None:
    """Tags 1-3 complete, 4 is still being handled, 5 completed: one ack multiple up to 3;
    5 waits (held) until 4 finishes, then one ack up to 5."""
    run = AckRun()
    for tag in range(1, 6):
        run.received(tag)
    for tag in (2, 1, 3, 5):
        run.completed(tag)
    assert run.take_run() == Run(3, (1, 2, 3))
    assert run.held() == [5]
    assert run.take_run() is None
    run.completed(4)
    assert run.take_run() == Run(5, (4, 5))
    assert run.waiting == 0


def test_released_tags_are_spanned_but_not_named() -> None:
    """A rejected tag inside a run does not block it, and is not what the ack names."""
    run = AckRun()
    for tag in (1, 2, 3):
        run.received(tag)
    run.completed(1)
    run.released(3)
    run.released(2)
    assert run.take_run() == Run(1, (1,))
    assert run.floor == 3
    assert run.take_run() is None


def test_misuse_is_refused() -> None:
    """A tag received twice, finished without being received, or finished twice is a bug
    that must surface, not be acked."""
    run = AckRun()
    run.received(1)
    with pytest.raises(ValueError, match="delivery tag"):
        run.received(1)
    with pytest.raises(ValueError, match="delivery tag"):
        run.completed(2)
    run.released(1)
    with pytest.raises(ValueError, match="delivery tag"):
        run.completed(1)


def test_awaiting_is_true_only_between_receipt_and_an_outcome() -> None:
    """The handler rejects a message back to the queue only while it awaits its outcome: not
    once it completed (its ack may already be on the wire, inside a multiple ack)."""
    run = AckRun()
    assert not run.awaiting(1)
    run.received(1)
    assert run.awaiting(1)
    run.completed(1)
    assert not run.awaiting(1)
    run.take_run()
    assert not run.awaiting(1)
