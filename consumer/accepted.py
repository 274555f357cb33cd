"""A short memory of events Vercel accepted but whose ack was lost with the channel.

When a broker node dies, every delivery in flight on it comes back: the worker had sent them
to Vercel, Vercel answered 2xx, but the ack could not reach the broker. Without a memory each
one is sent to Vercel a second time. The handler records such an event here, keyed by its id
*and* a hash of its body, and acks a redelivery that matches instead of calling Vercel again:
safe, because Vercel already has exactly that event. A publisher that reuses an id for a
different body does not match, so such an event is never swallowed.

Bounded twice: an entry lives `ttl` seconds (the broker redelivers within seconds of the
reconnect; minutes is generous), and at most `max_entries` are kept, the oldest dropped first.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable

TTL = 300.0  # seconds
MAX_ENTRIES = 10_000  # ~1 MB at most: an id and a 32-byte digest each


class AcceptedMemory:
    """Remembers (event id, body digest) pairs for `ttl` seconds, at most `max_entries`."""

    def __init__(
        self,
        ttl: float = TTL,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl <= 0 or max_entries < 1:
            raise ValueError("AcceptedMemory needs ttl > 0 and max_entries >= 1")
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, bytes], float] = OrderedDict()  # key → expiry

    def __len__(self) -> int:
        self._expire()
        return len(self._entries)

    def remember(self, event_id: str, body: bytes) -> None:
        """Vercel accepted this event; its ack was lost."""
        key = _key(event_id, body)
        self._entries.pop(key, None)
        self._entries[key] = self._clock() + self._ttl
        self._expire()
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def holds(self, event_id: str, body: bytes) -> bool:
        """Whether Vercel accepted this very event (same id, same bytes) in the last `ttl` s."""
        self._expire()
        return _key(event_id, body) in self._entries

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            key, expiry = next(iter(self._entries.items()))
            if expiry > now:
                return
            del self._entries[key]


def _key(event_id: str, body: bytes) -> tuple[str, bytes]:
    return event_id, hashlib.sha256(body).digest()
