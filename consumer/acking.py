"""Acks of one channel, batched: one `basic.ack multiple=True` frame for a run of finished
deliveries instead of one frame (and one `send()`) each.

`Acker.ack(message)` is called once the message's outcome is durable (Vercel's 2xx, or its copy
confirmed in a retry tier or the DLQ) and returns once an ack covering it has been written to
the channel, or raises `BrokerError` when it could not be (the channel is gone: the broker
redelivers the message). Nothing is acked earlier than that call: `consumer/ackrun.py` only lets
a frame cover consecutive tags that have all completed or been settled otherwise.

Completions within one turn of the event loop share a frame: the flush runs on the next turn.
A delivery that is still being handled holds back the acks of completed ones above it; so that a
slow one cannot keep them, and their consumer slots (prefetch), waiting for long, completed tags
above a gap are acked one by one once more than `max_held` wait, or after `max_hold` seconds.
"""

from __future__ import annotations

import asyncio

from aio_pika.abc import AbstractIncomingMessage

from consumer.ackrun import AckRun
from consumer.errors import BrokerError
from consumer.topology import broker_errors

MAX_HOLD = 0.05  # seconds a completed delivery waits at most for a gap below it to close


class Acker:
    """Batches the acks of one channel's deliveries (see the module docstring)."""

    def __init__(self, *, max_held: int, max_hold: float = MAX_HOLD) -> None:
        self._run = AckRun()
        self._max_held = max(1, max_held)
        self._max_hold = max_hold
        self._messages: dict[int, AbstractIncomingMessage] = {}
        self._waiters: dict[int, asyncio.Future[None]] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self._dirty = False
        self._expired = False
        self._timer: asyncio.TimerHandle | None = None

    def received(self, message: AbstractIncomingMessage) -> None:
        """Note a delivery as it arrives (in the channel's order)."""
        self._run.received(_tag(message))

    def awaiting_outcome(self, message: AbstractIncomingMessage) -> bool:
        """False once `message` completed (its ack is queued or sent) or was released."""
        return self._run.awaiting(_tag(message))

    def released(self, message: AbstractIncomingMessage) -> None:
        """The delivery was settled without an ack (rejected back to the queue)."""
        self._run.released(_tag(message))
        self._wake()

    async def ack(self, message: AbstractIncomingMessage) -> None:
        """Ack `message` (its outcome is durable) in the next batch; return once it is sent."""
        tag = _tag(message)
        waiter = asyncio.get_running_loop().create_future()
        self._messages[tag], self._waiters[tag] = message, waiter
        self._run.completed(tag)
        self._wake()
        await waiter

    def _wake(self) -> None:
        self._dirty = True
        if self._flush_task is None:
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        try:
            while self._dirty:
                self._dirty = False
                run = self._run.take_run()
                if run is not None:
                    await self._send(run.top, run.tags, multiple=True)
                if self._run.completed_count > self._max_held or self._expired:
                    self._expired = False
                    await self._ack_held()
                self._arm_timer()
        finally:
            self._flush_task = None

    async def _ack_held(self) -> None:
        """Ack, one by one, the completed deliveries a gap keeps from a run."""
        for tag in self._run.held():
            self._run.released(tag)
            await self._send(tag, (tag,), multiple=False)

    async def _send(self, top: int, tags: tuple[int, ...], *, multiple: bool) -> None:
        message = self._messages[top]
        error: BrokerError | None = None
        try:
            with broker_errors("acking"):
                await message.ack(multiple=multiple)
        except BrokerError as exc:
            error = exc
        except Exception as exc:  # noqa: BLE001 - a waiter left hanging would hold its slot
            error = BrokerError(f"acking failed: {type(exc).__name__}: {exc}")
        for tag in tags:
            self._messages.pop(tag, None)
            waiter = self._waiters.pop(tag, None)
            if waiter is not None and not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)

    def _arm_timer(self) -> None:
        if self._run.completed_count == 0:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._max_hold, self._expire)

    def _expire(self) -> None:
        self._timer = None
        self._expired = True
        self._wake()


def _tag(message: AbstractIncomingMessage) -> int:
    tag = message.delivery_tag
    if tag is None:  # only no_ack deliveries lack one, and the worker never consumes so
        raise BrokerError("a delivery without a delivery tag cannot be acked")
    return tag
