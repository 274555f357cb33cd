"""How long to wait before reconnecting to the broker: decorrelated jitter, capped.

A node restart takes 5-15 s. A doubling backoff (0.5, 1, 2, 5, 10, 30 s) sleeps past the
moment the node is back: a 12 s outage cost 18.5 s. Here each wait is drawn between `base` and
three times the previous one, never above `cap` (AWS's "decorrelated jitter"), so the worker
asks again at most `cap` seconds after the broker returns, and workers that lost the same node
do not come back in lock-step. Failover needs no wait at all: the connector tries every URL of
the list in turn before the worker sleeps, and the first attempt after a lost session is
immediate (`first_delay`), because another node of the cluster is probably up.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

BASE = 0.2  # seconds
CAP = 5.0  # seconds: the longest the worker idles after the broker is back


@dataclass
class Backoff:
    """Delays between reconnect attempts; `reset()` once connected."""

    base: float = BASE
    cap: float = CAP
    rng: random.Random = field(default_factory=random.Random)
    _previous: float = 0.0

    def __post_init__(self) -> None:
        if not 0 < self.base <= self.cap:
            raise ValueError("backoff needs 0 < base <= cap")

    def next_delay(self) -> float:
        """The wait before the next attempt: 0 for the first one after a reset, then
        decorrelated jitter between `base` and `cap`."""
        if self._previous == 0.0:
            self._previous = self.base
            return 0.0
        self._previous = min(self.cap, self.rng.uniform(self.base, self._previous * 3))
        return self._previous

    def reset(self) -> None:
        """Connected again: the next loss starts with an immediate attempt."""
        self._previous = 0.0
