"""The worker's lifecycle: connect, declare, consume with bounded concurrency, drain, reconnect.

`Worker.run(stop)` loops over broker sessions until `stop` is set. A session opens a connection
and one channel (prefetch = concurrency, publisher confirms), declares the topology and consumes
until the channel closes or `stop` is set. Losing the broker ends the session; the next one
starts at once (the connector fails over to the next broker of the list), then after a capped,
jittered backoff (consumer/backoff.py). An outage is logged once, as a warning when it starts
and one line when it is over ("broker reconnected after N s"); the attempts in between are
debug lines. Deliveries in flight when the channel is lost get `LOST_GRACE` seconds to finish
their Vercel call (their ack fails; the handler remembers what Vercel accepted, so that the
redelivery is not sent twice), then are cancelled. Deliveries of a lost channel are never acked
on the next one: each message holds its own channel, and the broker redelivers whatever that
channel left unacked.

On `stop` the worker cancels its consumer, waits up to `shutdown_timeout` for deliveries in
flight, cancels what is left (unacked, so the broker redelivers it) and closes the connection.

When the circuit breaker opens (Vercel down for everyone) the worker cancels its consumer, so
messages wait in the work queue, and fetches one message at a time (`basic.get`) as a probe
whenever the breaker allows one; once a probe succeeds the breaker closes and it consumes again.

`readiness()` says whether the worker is consuming, and why not: starting, disconnected (with
the broker's error), circuit_open, shutting_down, or broker_blocked (the broker blocked the
connection over a memory or disk alarm, noticed within BLOCKED_POLL seconds: nothing can be
published or acked until it lifts;
retry and dead-letter publishes wait, bounded by their confirm timeout, and whatever was not
acked is redelivered). `in_flight`, `consuming` and `reconnects`
are read by the metrics at scrape time. A `session_task` (the queue-depth poller) runs
alongside each broker session, on its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
)
from structlog.typing import FilteringBoundLogger

from consumer.backoff import Backoff
from consumer.breaker import CircuitBreaker
from consumer.errors import BrokerError
from consumer.topology import (
    Topology,
    broker_errors,
    declare,
    is_blocked,
    open_channel,
    unprotected_warning,
)

MessageHandler = Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]]
Connect = Callable[[], Awaitable[AbstractConnection]]
SessionTask = Callable[[AbstractConnection], Coroutine[Any, Any, None]]
DeliveryTask = asyncio.Task[None]  # one delivery being handled (Worker._tracked)
Tracked = Callable[[AbstractIncomingMessage], Coroutine[Any, Any, DeliveryTask]]
LOST_GRACE = 2.0  # seconds deliveries in flight may finish after their channel was lost
BLOCKED_POLL = 0.5  # seconds between looks at whether the broker blocks the connection
EMPTY_QUEUE_POLL = 1.0  # seconds between probe fetches while the work queue is empty


class Status(enum.StrEnum):
    """Where the worker is: /readyz's `status` and `reason` vocabulary."""

    STARTING = "starting"
    CONSUMING = "consuming"  # the only ready state
    CIRCUIT_OPEN = "circuit_open"  # Vercel is failing for everyone: probing one at a time
    BROKER_BLOCKED = "broker_blocked"  # a resource alarm: publishes wait
    DISCONNECTED = "disconnected"  # no broker session; `cause` says which kind of failure
    SHUTTING_DOWN = "shutting_down"


class Worker:
    """Consumes the work queue and hands each delivery to a handler made for its channel."""

    def __init__(
        self,
        *,
        connect: Connect,
        topology: Topology,
        make_handler: Callable[[AbstractChannel], MessageHandler],
        breaker: CircuitBreaker,
        concurrency: int,
        shutdown_timeout: float,
        log: FilteringBoundLogger,
        backoff: Backoff | None = None,
        session_task: SessionTask | None = None,
    ) -> None:
        self._connect = connect
        self.topology = topology
        self._make_handler = make_handler
        self._breaker = breaker
        self._concurrency = concurrency
        self._shutdown_timeout = shutdown_timeout
        self._log = log
        self._backoff = Backoff() if backoff is None else backoff
        self._outage_since: float | None = None  # monotonic time the broker was lost
        self._in_flight: set[asyncio.Task[Any]] = set()
        self._status = Status.STARTING
        self._consumed = False  # whether the current session got as far as consuming
        self._session_task = session_task
        self._stop: asyncio.Event | None = None
        self._broker_lost: BrokerError | None = None  # the error that ended the last session
        self._broker = ""  # host:port of the broker of the current session
        self.reconnects = 0  # sessions that failed or ended on a broker error
        self._reported: set[str] = set()  # queues already warned about (once per process)
        self._blocked: tuple[str, float] | None = None  # the broker's reason, since when

    @property
    def consuming(self) -> bool:
        return self._status is Status.CONSUMING

    @property
    def broker_blocked(self) -> bool:
        """Whether the broker is blocking this worker's connection right now (a resource alarm)."""
        return self._blocked is not None

    @property
    def in_flight(self) -> int:
        """Deliveries being handled right now."""
        return len(self._in_flight)

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """(ready, detail): ready while consuming; otherwise the reason, and the breaker's state."""
        stopping = self._stop is not None and self._stop.is_set()
        status = Status.SHUTTING_DOWN if stopping else self._status  # from the signal on
        detail: dict[str, Any] = {"status": status.value, "circuit": self._breaker.state.value}
        if status in (Status.CONSUMING, Status.CIRCUIT_OPEN) and self._blocked is not None:
            detail.update(reason=Status.BROKER_BLOCKED.value, detail=self._blocked[0])
            return False, detail
        if status is not Status.CONSUMING:
            detail["reason"] = status.value
        if status is Status.DISCONNECTED and self._broker_lost is not None:
            detail["detail"] = str(self._broker_lost)  # for the log: hosts, the broker's words
            detail["cause"] = self._broker_lost.cause.value  # for /readyz
        return status is Status.CONSUMING, detail

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, reconnecting with backoff whenever the broker is lost."""
        self._stop = stop
        while not stop.is_set():
            try:
                await self._session(stop)
            except BrokerError as exc:
                self._status, self._broker_lost = Status.DISCONNECTED, exc
                self.reconnects += 1
                if self._consumed:
                    self._backoff.reset()  # it worked until now: try again (elsewhere) at once
                delay = self._backoff.next_delay()
                self._report_outage(str(exc), delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        self._log.info("worker stopped")

    def _report_outage(self, error: str, delay: float) -> None:
        """A warning when the broker is first lost; the attempts after it at debug."""
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            self._log.warning("broker unavailable", error=error, retry_in_s=round(delay, 2))
        else:
            self._log.debug("broker still unavailable", error=error, retry_in_s=round(delay, 2))

    def _report_recovery(self, connection: AbstractConnection) -> None:
        url = getattr(connection, "url", None)  # aio-pika's Connection has one (yarl)
        broker = f"{url.host}:{url.port}" if url is not None else ""
        if self._outage_since is not None:
            seconds = round(time.monotonic() - self._outage_since, 1)
            self._log.info(f"broker reconnected after {seconds} s", broker=broker, outage_s=seconds)
            self._outage_since = None
        self._broker = broker

    async def _session(self, stop: asyncio.Event) -> None:
        self._consumed = False
        connection = await self._connect()
        alarms = asyncio.create_task(self._watch_blocked(connection))
        watcher: asyncio.Task[None] | None = None
        try:
            channel = await open_channel(connection, prefetch=self._concurrency)
            declared = await declare(channel, self.topology)
            self._report_unprotected(declared.without_delivery_limit, declared.broker_version)
            queue = declared.work_queue
            self._broker_lost = None
            self._report_recovery(connection)
            if self._session_task is not None:
                watcher = asyncio.create_task(self._session_task(connection))
            handler = self._tracked(self._make_handler(channel))
            await self._consume_until_stopped(queue, handler, channel, stop)
            self._status = Status.SHUTTING_DOWN
            await self._drain()
        finally:
            if self._status is not Status.SHUTTING_DOWN:
                self._status = Status.DISCONNECTED
            alarms.cancel()
            await asyncio.wait({alarms})
            self._blocked = None  # a new connection starts unblocked
            if watcher is not None:
                watcher.cancel()
                await asyncio.wait({watcher})
            if self._in_flight and self._status is Status.DISCONNECTED:
                # Let Vercel calls under way finish: what Vercel accepts is remembered, so its
                # redelivery is acked without a second call (consumer/accepted.py).
                await asyncio.wait(set(self._in_flight), timeout=LOST_GRACE)
            await self._abandon_in_flight()
            with contextlib.suppress(Exception):
                await connection.close()

    async def _watch_blocked(self, connection: AbstractConnection) -> None:
        """Follow whether the broker blocks the connection, every BLOCKED_POLL seconds."""
        while (blocked := is_blocked(connection)) is not None:
            self._on_blocked("resource alarm" if blocked else None)
            await asyncio.sleep(BLOCKED_POLL)

    def _on_blocked(self, reason: str | None) -> None:
        """The broker blocked (`reason`) or unblocked (None) the connection: one line each."""
        loop = asyncio.get_running_loop()
        if reason is not None and self._blocked is None:
            self._blocked = (reason, loop.time())
            self._log.warning(
                "broker blocked the connection; publishes and acks wait", broker_reason=reason
            )
        elif reason is None and self._blocked is not None:
            seconds = round(loop.time() - self._blocked[1], 1)
            self._blocked = None
            self._log.info("broker unblocked the connection", blocked_s=seconds)

    def _report_unprotected(self, queues: Sequence[str], broker_version: str) -> None:
        """Warn, once per queue, about a queue an earlier release declared without a limit."""
        for queue in queues:
            if queue not in self._reported:
                self._reported.add(queue)
                message = unprotected_warning(queue, self.topology, broker_version)
                self._log.warning("queue without delivery limit", queue=queue, detail=message)

    async def _consume_until_stopped(
        self,
        queue: AbstractQueue,
        handler: Tracked,
        channel: AbstractChannel,
        stop: asyncio.Event,
    ) -> None:
        """Consume, pausing while the circuit is open; return on stop, raise if the channel dies."""
        while True:
            if self._breaker.is_open and not await self._probe_until_closed(
                queue, handler, channel, stop
            ):
                return
            with broker_errors("starting the consumer"):
                consumer_tag = await queue.consume(handler)
            self._status, self._consumed = Status.CONSUMING, True
            self._log.info(
                "consuming",
                queue=self.topology.queue,
                concurrency=self._concurrency,
                broker=self._broker,
            )
            event = await _first_of(
                stop=stop.wait(), lost=channel.closed(), tripped=self._breaker.tripped.wait()
            )
            if event == "lost":
                raise BrokerError("the channel to the broker was closed")
            self._status = Status.SHUTTING_DOWN if event == "stop" else Status.CIRCUIT_OPEN
            with contextlib.suppress(BrokerError), broker_errors("cancelling the consumer"):
                await queue.cancel(consumer_tag)
            if event == "stop":
                return

    async def _probe_until_closed(
        self,
        queue: AbstractQueue,
        handler: Tracked,
        channel: AbstractChannel,
        stop: asyncio.Event,
    ) -> bool:
        """One message at a time while the breaker is open; False when stop came first."""
        self._status = Status.CIRCUIT_OPEN
        self._log.warning("circuit open; consumption paused", queue=self.topology.queue)
        idle = 0.0
        while self._breaker.is_open:
            pause = max(self._breaker.probe_due_in(), idle)
            event = await _first_of(
                stop=stop.wait(), lost=channel.closed(), due=asyncio.sleep(pause)
            )
            if event == "stop":
                return False
            if event == "lost":
                raise BrokerError("the channel to the broker was closed")
            with broker_errors("fetching a probe message"):
                message = await queue.get(no_ack=False, fail=False)
            idle = EMPTY_QUEUE_POLL if message is None else 0.0
            if message is not None:
                self._breaker.begin_probe()
                await asyncio.shield(await handler(message))  # its task, tracked and shielded
        self._log.info("circuit closed; consumption resumes", queue=self.topology.queue)
        return True

    def _tracked(self, handler: MessageHandler) -> Tracked:
        """Each delivery in a task of ours: aiormq cancels its callbacks when the channel
        closes, which would cut off a Vercel call that Vercel may already have accepted; ours
        get `LOST_GRACE` to finish instead (see `_session`).

        aio-pika runs `tracked` in a task it owns; `tracked` returns as soon as the delivery's
        own task is started, without awaiting it. Nothing of aiormq's then waits on our task, so
        its cancellation cannot reach it, and no `asyncio.shield` is needed: per delivery that
        is a shield future, its callbacks and a wake-up of aio-pika's task fewer (bench/README.md,
        "What the profile showed"). It must stay a coroutine function: aio-pika wraps a plain
        function in one that awaits what it returns, which would make our task cancellable."""
        loop = asyncio.get_running_loop()
        in_flight = self._in_flight

        async def tracked(message: AbstractIncomingMessage) -> DeliveryTask:
            task = loop.create_task(handler(message))
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
            return task

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


async def _first_of(**waits: Awaitable[Any]) -> str:
    """Wait for the first of `waits` to finish; return its name (the first given wins a tie)."""
    tasks = {name: asyncio.ensure_future(wait) for name, wait in waits.items()}
    try:
        await asyncio.wait(tasks.values(), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks.values():
            task.cancel()
    return next(name for name, task in tasks.items() if task.done() and not task.cancelled())
