"""The worker's lifecycle: connect, declare, consume with bounded concurrency, drain, reconnect.

`Worker.run(stop)` loops over broker sessions until `stop` is set. A session opens a connection
and one channel (prefetch = concurrency, publisher confirms), declares the topology and consumes
until the channel closes or `stop` is set. Losing the broker ends the session; the next one
starts after a backoff. Deliveries of a lost channel are never acked on the next one: each
message holds its own channel, and the broker redelivers whatever that channel left unacked.

On `stop` the worker cancels its consumer, waits up to `shutdown_timeout` for deliveries in
flight, cancels what is left (unacked, so the broker redelivers it) and closes the connection.

`readiness()` says whether the worker consumes, and why not (for /readyz); `in_flight`,
`consuming` and `reconnects` are read by the metrics at scrape time. A `session_task` (the
queue-depth poller) runs alongside each session that consumes, on its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from consumer.errors import BrokerError
from consumer.topology import Topology, broker_errors, declare, open_channel

MessageHandler = Callable[[AbstractIncomingMessage], Awaitable[None]]
Connect = Callable[[], Awaitable[AbstractConnection]]
SessionTask = Callable[[AbstractConnection], Coroutine[Any, Any, None]]
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Worker:
    """Consumes the work queue and hands each delivery to a handler made for its channel."""

    def __init__(
        self,
        *,
        connect: Connect,
        topology: Topology,
        make_handler: Callable[[AbstractChannel], MessageHandler],
        concurrency: int,
        shutdown_timeout: float,
        log: Any,
        reconnect_delays: Sequence[float] = RECONNECT_DELAYS,
        session_task: SessionTask | None = None,
    ) -> None:
        self._connect = connect
        self.topology = topology
        self._make_handler = make_handler
        self._concurrency = concurrency
        self._shutdown_timeout = shutdown_timeout
        self._log = log
        self._reconnect_delays = reconnect_delays
        self._in_flight: set[asyncio.Task[Any]] = set()
        self.consuming = False  # readiness: connected, declared and consuming
        self._consumed = False  # whether the current session got as far as consuming
        self._session_task = session_task
        self._stop: asyncio.Event | None = None
        self._broker_lost: str | None = None  # why the last session ended or failed, if it did
        self.reconnects = 0  # sessions that ended or failed on a broker error
        # Set while consuming to report the worker as not ready anyway (e.g. "circuit_open").
        self.unready_reason: str | None = None

    @property
    def in_flight(self) -> int:
        """Deliveries being handled right now."""
        return len(self._in_flight)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when consuming; otherwise the reason: starting, disconnected, shutting_down,
        or `unready_reason`."""
        if self._stop is not None and self._stop.is_set():
            return False, {"reason": "shutting_down"}
        if not self.consuming:
            if self._broker_lost is not None:
                return False, {"reason": "disconnected", "detail": self._broker_lost}
            return False, {"reason": "disconnected" if self._consumed else "starting"}
        if self.unready_reason is not None:
            return False, {"reason": self.unready_reason}
        return True, {}

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, reconnecting with backoff whenever the broker is lost."""
        failures = 0  # in a row: a session that got as far as consuming starts the count anew
        self._stop = stop
        while not stop.is_set():
            try:
                await self._session(stop)
            except BrokerError as exc:
                self._broker_lost = str(exc)
                self.reconnects += 1
                failures = 1 if self._consumed else failures + 1
                delay = self._reconnect_delays[min(failures, len(self._reconnect_delays)) - 1]
                self._log.warning("broker unavailable", error=str(exc), retry_in_s=delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        self._log.info("worker stopped")

    async def _session(self, stop: asyncio.Event) -> None:
        self._consumed = False
        connection = await self._connect()
        watcher: asyncio.Task[None] | None = None
        try:
            channel = await open_channel(connection, prefetch=self._concurrency)
            queue = await declare(channel, self.topology)
            handler = self._make_handler(channel)
            with broker_errors("starting the consumer"):
                consumer_tag = await queue.consume(self._tracked(handler))
            self.consuming = self._consumed = True
            self._broker_lost = None
            self._log.info("consuming", queue=self.topology.queue, concurrency=self._concurrency)
            if self._session_task is not None:
                watcher = asyncio.create_task(self._session_task(connection))
            lost = await _wait_either(stop.wait(), channel.closed())
            self.consuming = False
            if lost:
                raise BrokerError("the channel to the broker was closed")
            with contextlib.suppress(BrokerError), broker_errors("cancelling the consumer"):
                await queue.cancel(consumer_tag)
            await self._drain()
        finally:
            self.consuming = False
            if watcher is not None:
                watcher.cancel()
                await asyncio.wait({watcher})
            await self._abandon_in_flight()
            with contextlib.suppress(Exception):
                await connection.close()

    def _tracked(self, handler: MessageHandler) -> MessageHandler:
        async def tracked(message: AbstractIncomingMessage) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._in_flight.add(task)
            try:
                await handler(message)
            finally:
                self._in_flight.discard(task)

        return tracked

    async def _drain(self) -> None:
        """Let deliveries in flight finish, up to the shutdown timeout."""
        if not self._in_flight:
            return
        self._log.info("draining", in_flight=len(self._in_flight))
        _, pending = await asyncio.wait(set(self._in_flight), timeout=self._shutdown_timeout)
        if pending:
            self._log.warning(
                "shutdown timeout; leaving deliveries unacked", unfinished=len(pending)
            )

    async def _abandon_in_flight(self) -> None:
        """Cancel what is still running: its messages stay unacked and are redelivered."""
        for task in list(self._in_flight):
            task.cancel()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=5)


async def _wait_either(stopped: Awaitable[Any], closed: Awaitable[Any]) -> bool:
    """Wait until stop is asked for (→ False) or the channel closes (→ True)."""
    stop_task = asyncio.ensure_future(stopped)
    closed_task = asyncio.ensure_future(closed)
    done, pending = await asyncio.wait(
        {stop_task, closed_task}, return_when=asyncio.FIRST_COMPLETED
    )
    for task in pending:
        task.cancel()
    return closed_task in done and stop_task not in done
