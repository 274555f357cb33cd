"""Queue depths for /metrics: messages waiting in the work queue, the retry tiers and the DLQ.

While the worker consumes, `DepthSampler.watch` asks the broker every `interval` seconds with a
passive `queue.declare` per queue, on a channel of its own on the worker's connection: one round
trip per queue (2 + the number of retry tiers), no message touched, nothing declared. The counts
are the broker's *ready* messages: deliveries a consumer holds unacked are not in them. The retry
tiers are summed into one value. When a sample fails (a queue deleted by hand closes the channel)
the depths are dropped rather than left stale, one warning is logged for the whole streak of
failures, and the next interval tries again on a new channel. Sampling is best effort: it never
stops the worker. Every worker reports the same depths, so aggregate them with max(), not sum().
"""

from __future__ import annotations

import asyncio
import contextlib

from aio_pika.abc import AbstractChannel, AbstractConnection
from structlog.typing import FilteringBoundLogger

from consumer.metrics import Metrics
from consumer.topology import Topology, broker_errors

CLOSE_TIMEOUT = 5.0  # seconds to close a channel a failed sample leaves open


class DepthSampler:
    """Samples the depths of a topology's queues into `Metrics`."""

    def __init__(self, topology: Topology, metrics: Metrics, log: FilteringBoundLogger) -> None:
        self._queues = {
            "work": (topology.queue,),
            "retry": tuple(topology.retry_queue(ms) for ms in topology.retry_tiers_ms),
            "dlq": (topology.dead_letter_queue,),
        }
        self._metrics = metrics
        self._log = log
        self._channel: AbstractChannel | None = None
        self._failing = False

    async def watch(self, connection: AbstractConnection, interval: float) -> None:
        """Sample every `interval` seconds until cancelled (the session's end)."""
        self._channel = None  # a channel of an earlier connection is gone with it
        try:
            while True:
                await self.sample(connection)
                await asyncio.sleep(interval)
        finally:
            self._metrics.forget_queue_depths()

    async def sample(self, connection: AbstractConnection) -> None:
        """Read every depth once; on failure drop them and say so (once per streak)."""
        try:
            depths = await self._read(connection)
        except Exception as exc:  # noqa: BLE001 - best effort: the worker must go on regardless
            self._metrics.forget_queue_depths()
            await self._discard_channel()
            if not self._failing:
                self._log.warning("could not sample queue depths", error=str(exc))
            self._failing = True
            return
        self._failing = False
        self._metrics.queue_depths(depths)

    async def _discard_channel(self) -> None:
        channel, self._channel = self._channel, None
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(channel.close(), CLOSE_TIMEOUT)

    async def _read(self, connection: AbstractConnection) -> dict[str, int]:
        with broker_errors("sampling queue depths"):
            if self._channel is None or self._channel.is_closed:
                self._channel = await connection.channel()
            return {kind: await self._total(names) for kind, names in self._queues.items()}

    async def _total(self, names: tuple[str, ...]) -> int:
        assert self._channel is not None
        total = 0
        for name in names:
            queue = await self._channel.declare_queue(name, passive=True)
            total += queue.declaration_result.message_count or 0
        return total
