"""A circuit breaker for Vercel-wide outages: stop consuming while Vercel is down for everyone.

```
           most recent calls fail, across installations
  CLOSED ───────────────────────────────────────────────▶ OPEN ◀──────┐
     ▲                                                      │ probe    │ probe
     │ probe succeeds                                       │ delay    │ fails
     └───────────────────────────────────────────── HALF_OPEN ─────────┘
```

Closed: the handler records each Vercel call: a failure that any installation would see
(5xx, timeout, connection error, an answer that is not HTTP) or a sign of health (2xx, or a 4xx,
which Vercel only sends when it is up). When `failure_ratio` of the last `window` calls failed,
and the failures span at least two installations (one broken installation must not pause the
others), the circuit opens. Open: the worker cancels its consumer, so messages wait in the work
queue without spending their retry budget, and failures of calls still in flight do not count
as attempts. After a probe delay (growing along `probe_delays`) it turns half-open and the
worker sends one message: success closes the circuit and consumption resumes, failure opens it
again for the next delay.

Pure: no I/O. `tripped` is an asyncio.Event the worker waits on.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections import deque
from collections.abc import Callable, Sequence


class State(enum.StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Watches Vercel calls; opens on broad failure, closes on a successful probe."""

    def __init__(
        self,
        *,
        window: int = 50,
        failure_ratio: float = 0.8,
        probe_delays: Sequence[float] = (1, 2, 5, 10, 30),
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[State, State, str], None] | None = None,
    ) -> None:
        self._calls: deque[tuple[str, bool]] = deque(maxlen=window)
        self._min_calls = max(4, window // 2)
        self._failure_ratio = failure_ratio
        self._probe_delays = tuple(probe_delays)
        self._clock = clock
        self._on_change = on_change
        self.state = State.CLOSED
        self.tripped = asyncio.Event()  # set while not closed
        self._opens = 0  # consecutive openings, to walk up the probe delays
        self._probe_at = 0.0

    @property
    def is_open(self) -> bool:
        """Open or half-open: Vercel is presumed down, failures do not spend attempts."""
        return self.state is not State.CLOSED

    def record(self, installation: str, *, failed: bool) -> None:
        """One Vercel call's outcome: `failed` when it is a failure any installation would see."""
        if self.state is State.HALF_OPEN:
            if failed:
                self._open("probe failed")
            else:
                self._close()
        elif self.state is State.CLOSED:
            self._calls.append((installation, failed))
            if failed and self._broad_failure():
                self._open(f"{self._failure_count()} of the last {len(self._calls)} calls failed")
        # Open: results of calls sent before it opened say nothing new.

    def probe_due_in(self) -> float:
        """Seconds until the next probe may be sent (0 when due)."""
        return max(0.0, self._probe_at - self._clock())

    def begin_probe(self) -> None:
        """The worker sends one message now; its outcome decides."""
        if self.state is State.OPEN:
            self._set(State.HALF_OPEN, "probing")

    def _broad_failure(self) -> bool:
        if len(self._calls) < self._min_calls:
            return False
        failures = self._failure_count()
        failing = {installation for installation, failed in self._calls if failed}
        return failures >= self._failure_ratio * len(self._calls) and len(failing) >= 2

    def _failure_count(self) -> int:
        return sum(failed for _, failed in self._calls)

    def _open(self, why: str) -> None:
        delay = self._probe_delays[min(self._opens, len(self._probe_delays) - 1)]
        self._opens += 1
        self._probe_at = self._clock() + delay
        self._calls.clear()
        self.tripped.set()
        self._set(State.OPEN, f"{why}; next probe in {delay:g} s")

    def _close(self) -> None:
        self._opens = 0
        self.tripped.clear()
        self._set(State.CLOSED, "probe succeeded")

    def _set(self, state: State, why: str) -> None:
        previous, self.state = self.state, state
        if self._on_change is not None:
            self._on_change(previous, state, why)
