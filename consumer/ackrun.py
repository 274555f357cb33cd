"""Pure bookkeeping for batched acks: which delivery tags one `basic.ack multiple=True` may cover.

A channel numbers its deliveries 1, 2, 3, … and `basic.ack(tag, multiple=True)` settles every
delivery up to `tag` that is still unacked on it. Deliveries finish out of order (Vercel
answers them in any order), so one frame may only go out for a run of tags that have *all*
reached their outcome. `AckRun` tracks that run:

- `received(tag)`: the handler got the delivery;
- `completed(tag)`: its outcome is durable and it wants an ack;
- `released(tag)`: it was settled another way (rejected back to the queue, or acked alone),
  so it needs no ack from a run, and no longer blocks one.

`floor` is the highest tag such that every tag from 1 to it is completed or released: a run
only ever extends it by *consecutive* tags, so a tag this process never saw (a delivery the
client library dropped) is never covered by a multiple ack: it blocks the run instead, and the
caller falls back to acking the completed ones above it one by one (`held`). Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class TagState(Enum):
    RECEIVED = "received"  # being handled
    COMPLETED = "completed"  # outcome durable, waiting for its ack
    RELEASED = "released"  # settled without a run's ack (rejected, or acked alone)


@dataclass(frozen=True, slots=True)
class Run:
    """One `basic.ack(top, multiple=True)`: it settles `tags` (completed ones, `top` the
    highest); the other tags it spans were released already."""

    top: int
    tags: tuple[int, ...]


class AckRun:
    """Delivery tags of one channel, and the contiguous run of finished ones above `floor`."""

    def __init__(self) -> None:
        self.floor = 0
        self.completed_count = 0  # tags in COMPLETED state: the run's, or held above a gap
        self._states: dict[int, TagState] = {}

    def received(self, tag: int) -> None:
        if tag <= self.floor or tag in self._states:
            raise ValueError(f"delivery tag {tag} was seen before")
        self._states[tag] = TagState.RECEIVED

    def awaiting(self, tag: int) -> bool:
        """Whether `tag` was received and has no outcome yet (neither completed nor released)."""
        return self._states.get(tag) is TagState.RECEIVED

    def completed(self, tag: int) -> None:
        self._move(tag, TagState.COMPLETED)

    def released(self, tag: int) -> None:
        self._move(tag, TagState.RELEASED)

    def _move(self, tag: int, state: TagState) -> None:
        previous = self._states.get(tag)
        if previous not in (TagState.RECEIVED, TagState.COMPLETED):
            raise ValueError(f"delivery tag {tag} is not waiting for an outcome")
        self.completed_count += (state is TagState.COMPLETED) - (previous is TagState.COMPLETED)
        self._states[tag] = state

    def take_run(self) -> Run | None:
        """Advance `floor` over the consecutive finished tags above it; the ack that settles the
        completed ones among them, or None when there are none."""
        tags: list[int] = []
        states = self._states
        while (state := states.get(self.floor + 1)) in (TagState.COMPLETED, TagState.RELEASED):
            self.floor += 1
            del states[self.floor]
            if state is TagState.COMPLETED:
                tags.append(self.floor)
        self.completed_count -= len(tags)
        return Run(tags[-1], tuple(tags)) if tags else None

    def held(self) -> list[int]:
        """Completed tags that a gap below keeps from a run, lowest first."""
        return sorted(tag for tag, state in self._states.items() if state is TagState.COMPLETED)

    @property
    def waiting(self) -> int:
        """Tags received and not yet covered by `floor`."""
        return len(self._states)
