"""Coalesced sending: deliveries about the same thing share one Create Event call.

Each delivery's task calls `CoalescedSend.send(event, token, headers)` where it would call
Vercel. The first delivery of a key leads: it waits `window` seconds (CONSUMER_COALESCE_WINDOW,
0 by default: one turn of the event loop, so that deliveries read from the broker together
with it join) for others, then makes one call carrying the newest event's payload
(`consumer/coalesce.py`) and hands its answer, or its error, to every delivery that call
settles. A delivery of a key whose call is already in flight waits for the next call, which
the first of them leads once the current one ends (trailing edge): a delivery is only ever
settled by a call that started after it was received. Each delivery then goes on in its own
task: acked after a 2xx, or through its own retry decision (its own attempts, its own dead
letter with its own body) after an error. Waiting deliveries are ones the worker holds anyway
(prefetch bounds them); they cost a future each, no consumer slot more.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from consumer.coalesce import CoalesceKey, Coalescer, coalesce_key, newest
from consumer.contract import Event
from consumer.vercel import Delivered

Send = Callable[[Event, str, dict[str, str] | None], Awaitable[Delivered]]
_LEAD = object()  # a waiting delivery's future gets this when it is to lead the next call


@dataclass(eq=False, slots=True)
class _Member:
    event: Event
    # Made only for a member that waits: the one that arrives first leads at once and never
    # waits for its turn, and that is nearly every delivery when events do not repeat (one
    # future per delivery fewer; bench/README.md, "What the profile showed").
    turn: asyncio.Future[Any] | None = None


class CoalescedSend:
    """Sends through `send`, one call per key at a time for every delivery waiting on it."""

    def __init__(
        self,
        send: Send,
        coalescer: Coalescer[Any],
        *,
        window: float,
        on_coalesced: Callable[[int], None],
    ) -> None:
        self._send = send
        self._coalescer = coalescer  # shared by the worker's handlers
        self._window = window
        self._on_coalesced = on_coalesced  # calls saved (a batch of n saves n - 1)

    async def send(self, event: Event, token: str, headers: dict[str, str] | None) -> Delivered:
        key = coalesce_key(event)
        me = _Member(event)
        if not self._coalescer.arrive(key, me):
            # Made before anything else can run: `_promote` and `_settle` only ever see a
            # waiting member with its future.
            me.turn = turn = asyncio.get_running_loop().create_future()
            try:
                outcome = await turn
            except asyncio.CancelledError:
                self._promote(self._coalescer.withdraw(key, me))
                raise
            if outcome is not _LEAD:
                assert isinstance(outcome, Delivered)
                return outcome
        return await self._lead(key, me, token, headers)

    async def _lead(
        self, key: CoalesceKey, me: _Member, token: str, headers: dict[str, str] | None
    ) -> Delivered:
        """Gather (the window), make the key's call, settle its batch, hand the lead on."""
        try:
            # With no window, one turn of the loop: deliveries read from the broker together
            # with this one (a burst arrives in few reads) join its call instead of the next.
            await asyncio.sleep(self._window)
        except asyncio.CancelledError:
            self._promote(self._coalescer.withdraw(key, me))
            raise
        batch = self._coalescer.start(key)
        try:
            delivered = await self._send(newest([m.event for m in batch]), token, headers)
        except BaseException as exc:
            _settle(batch, me, error=exc)
            raise
        else:
            _settle(batch, me, result=delivered)
            if len(batch) > 1:
                self._on_coalesced(len(batch) - 1)
            return delivered
        finally:
            self._promote(self._coalescer.finish(key))

    @staticmethod
    def _promote(leader: _Member | None) -> None:
        if leader is not None and leader.turn is not None and not leader.turn.done():
            leader.turn.set_result(_LEAD)


def _settle(
    batch: list[_Member],
    me: _Member,
    *,
    result: Delivered | None = None,
    error: BaseException | None = None,
) -> None:
    """Hand the call's answer (or error) to every other delivery it settles."""
    for member in batch:
        turn = member.turn
        if member is me or turn is None or turn.done():
            continue
        if isinstance(error, asyncio.CancelledError):
            turn.cancel()  # the worker is abandoning deliveries: leave them unacked
        elif error is not None:
            turn.set_exception(error)
        else:
            turn.set_result(result)
