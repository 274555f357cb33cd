"""Pure coalescing: one Create Event call for a burst of events about the same thing.

Create Event only tells Vercel "something changed, re-read it", so events about one resource
(or one installation's billing) that wait at the same time need one call, not one each, as
long as that call *starts after the last of them was received*. The key says what an event
is about (`coalesce_key`): (installation, Vercel event type, resourceId), or (installation,
`installation.updated`) for billing events.

`Coalescer` is the bookkeeping, per key, trailing edge:

- `arrive(key, member)`: True when the member leads the key's next call (no call for the key
  is waiting to start); otherwise it waits for a leader's call.
- `start(key)`: the leader's call starts now; it settles exactly the members that arrived so
  far (returned). Members arriving from now on wait for the next call.
- `finish(key)`: the call ended; returns the member that leads the next call (the first of
  those that arrived meanwhile), or None when nobody waits (the key is forgotten).
- `withdraw(key, member)`: a member that will not take part any more (its task was cancelled
  before its call started); returns the new leader when it was the leader.

At most one call per key is in flight; every member is in the batch of exactly one call that
started after it arrived, unless it withdrew. Pure: no I/O, no clock, no event loop.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from consumer.contract import BillingEvent, Event, ResourceEvent

M = TypeVar("M")
CoalesceKey = tuple[str, ...]


def coalesce_key(event: Event) -> CoalesceKey:
    """What a Create Event call for `event` says changed (see `consumer/translate.py`)."""
    if isinstance(event, ResourceEvent):
        return (event.installation_id, "resource.updated", event.resource_id)
    if isinstance(event, BillingEvent):
        return (event.installation_id, "installation.updated")
    raise TypeError(f"no coalescing key for {type(event).__name__}")  # pragma: no cover


def newest(events: list[Event]) -> Event:
    """The event whose payload a combined call carries: the latest `occurred_at`, and among
    equal ones the last received."""
    best = events[0]
    for candidate in events[1:]:
        if candidate.occurred_at >= best.occurred_at:
            best = candidate
    return best


@dataclass(slots=True)
class _Key(Generic[M]):
    waiting: list[M] = field(default_factory=list)  # for the next call; [0] leads it
    calling: bool = False  # a call for the key is in flight


class Coalescer(Generic[M]):
    """Per-key trailing-edge batching of members (see the module docstring)."""

    def __init__(self) -> None:
        self._keys: dict[Hashable, _Key[M]] = {}

    def arrive(self, key: Hashable, member: M) -> bool:
        """Add a member; True when it leads the key's next call."""
        state = self._keys.get(key)
        if state is None:
            self._keys[key] = _Key([member])
            return True
        state.waiting.append(member)
        return False

    def start(self, key: Hashable) -> list[M]:
        """The key's next call starts: the members it settles (all that arrived so far)."""
        state = self._keys[key]
        if state.calling:
            raise RuntimeError("a call for this key is already in flight")
        batch, state.waiting, state.calling = state.waiting, [], True
        return batch

    def finish(self, key: Hashable) -> M | None:
        """The key's call ended: the leader of the next one, or None (the key is forgotten)."""
        state = self._keys[key]
        state.calling = False
        return self._next_leader(key, state)

    def withdraw(self, key: Hashable, member: M) -> M | None:
        """`member` leaves before its call started; the new leader if it was the leader."""
        state = self._keys.get(key)
        if state is None or member not in state.waiting:
            return None
        was_leader = not state.calling and state.waiting[0] is member
        state.waiting.remove(member)
        return self._next_leader(key, state) if was_leader else None

    def _next_leader(self, key: Hashable, state: _Key[M]) -> M | None:
        if state.waiting:
            return state.waiting[0]
        if not state.calling:
            del self._keys[key]
        return None

    def keys_waiting(self) -> int:
        """Keys with members waiting for a call to start."""
        return sum(1 for state in self._keys.values() if state.waiting)

    @property
    def keys(self) -> int:
        """Keys with a call waiting or in flight."""
        return len(self._keys)
