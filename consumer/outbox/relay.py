"""The outbox relay: committed outbox rows → the domain exchange, at least once, in order.

One loop per process, on one PostgreSQL connection: claim a batch (consumer/outbox/store.py),
dead-letter the rows whose body broke the contract, publish the rest with confirms, mark them
all sent, commit. Publishing happens inside the claim transaction, so a relay that dies or
loses the broker or PostgreSQL mid-batch leaves the batch unsent and it is published again:
at most one batch of duplicates (the worker and Vercel see the same event id twice).

It wakes when a writer's NOTIFY arrives (a second connection LISTENs) and every
`poll_interval` seconds regardless, so a lost notification, or none at all behind PgBouncer in
transaction mode, costs one interval. A full batch is followed at once by the next. Between
batches it deletes sent rows older than `retention`, `DELETE_BATCH` at a time. PostgreSQL or
the broker away: it says so once, waits and reconnects; rows wait unsent.

The backlog gauges for /metrics are sampled by a task of their own on a third connection,
every `SAMPLE_EVERY` seconds whatever the loop is doing: the broker's outage is exactly when
the oldest unsent row's age must keep rising (the lag alert reports it), and a loop that
cannot publish, or waits `PUBLISH_TIMEOUT` on a blocked broker, would freeze them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection
from structlog.typing import FilteringBoundLogger

import consumer.outbox.store as store
from consumer.contract import MESSAGE_ID_MAX_BYTES, parse_event
from consumer.deadletter import rfc3339, truncate_utf8
from consumer.errors import BrokerError, ContractError, DatabaseError, Reason
from consumer.headers import DEAD_LETTERED_AT, DETAIL, REASON
from consumer.outbox.metrics import OutboxMetrics
from consumer.outbox.store import OutboxRow
from consumer.publish.publisher import EventPublisher
from consumer.topology import broker_errors, connect, open_channel

DELETE_BATCH = 1000
CLEANUP_EVERY = 60.0  # seconds between retention sweeps
SAMPLE_EVERY = 5.0  # seconds between backlog samples
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)  # seconds; the last repeats
PUBLISH_TIMEOUT = 30.0  # seconds for one batch's confirms; then the broker counts as down
OUTBOX_ROW = "outbox-seq"  # dead letters say which row they came from


@dataclass(frozen=True, slots=True)
class RelayConfig:
    dsn: str
    amqp_url: str
    exchange: str
    dead_letter_queue: str
    batch_size: int = 500
    poll_interval: float = 1.0
    retention: float = 86_400.0
    max_body_bytes: int = 256 * 1024
    listen: bool = True  # False: polling only (behind PgBouncer in transaction mode; benches)


class _Broker:
    """The relay's broker side: the event publisher, and a channel for dead letters."""

    def __init__(self, connection: AbstractConnection, publisher: EventPublisher) -> None:
        self.connection = connection
        self.publisher = publisher

    @classmethod
    async def open(cls, config: RelayConfig) -> _Broker:
        publisher = await EventPublisher.connect(config.amqp_url, exchange=config.exchange)
        try:
            connection = await connect(config.amqp_url, name="vercel-consumer-outbox-dlq")
        except BrokerError:
            await publisher.close()
            raise
        return cls(connection, publisher)

    async def dead_letter(self, row: OutboxRow, queue: str, why: str) -> None:
        """Put the row's body in the DLQ as the worker would: reason, detail, when."""
        # An id too long for the AMQP message_id (a row written without the contract's check)
        # is why the row is here: kept in the body and the table, left off the message (aio-pika
        # gives it a random one), or the publish raised TypeError and the relay retried this
        # row for good.
        fits = len(row.id.encode("utf-8", "surrogatepass")) <= MESSAGE_ID_MAX_BYTES
        message = aio_pika.Message(
            row.body,
            headers={
                REASON: Reason.INVALID_MESSAGE.value,
                DETAIL: truncate_utf8(f"outbox row {row.seq}: {why}"),
                DEAD_LETTERED_AT: rfc3339(datetime.now(UTC)),
                OUTBOX_ROW: row.seq,
            },
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=row.id if fits else None,
        )
        with broker_errors(f"dead-lettering outbox row {row.seq} to {queue}"):
            channel = await open_channel(self.connection)
            try:
                await channel.default_exchange.publish(message, routing_key=queue, mandatory=True)
            finally:
                await channel.close()

    async def close(self) -> None:
        with contextlib.suppress(BrokerError), broker_errors("closing"):
            await self.publisher.close()
            await self.connection.close()


class OutboxRelay:
    """Publishes committed outbox rows until `run`'s stop event is set."""

    def __init__(
        self, config: RelayConfig, metrics: OutboxMetrics, log: FilteringBoundLogger
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.log = log
        self._wake = asyncio.Event()
        self._db: store.Connection | None = None
        self._broker: _Broker | None = None
        self._failures = 0
        self._problem: str | None = "starting"
        self._next_cleanup = 0.0

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready while connected to PostgreSQL and the broker and the last batch went through."""
        if self._problem is None:
            return True, {}
        return False, {"reason": self._problem}

    async def run(self, stop: asyncio.Event) -> None:
        helpers = {
            asyncio.create_task(self._listen() if self.config.listen else _idle()),
            asyncio.create_task(self._sample()),
        }
        try:
            while not stop.is_set():
                await self._step(stop)
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.wait(helpers)
            await self._drop_database()
            await self._drop_broker()

    async def _step(self, stop: asyncio.Event) -> None:
        """One batch, then a wait unless it was full; on failure, a wait before trying again."""
        self._wake.clear()  # a NOTIFY from now on means rows this batch may not have seen
        try:
            claimed = await self.relay_batch()
            await self._housekeeping()
        except DatabaseError as exc:
            self.metrics.database_errors.inc()
            await self._drop_database()
            await self._back_off("database_unavailable", str(exc), stop)
            return
        except BrokerError as exc:
            self.metrics.publish_failures.inc()
            await self._drop_broker()
            await self._back_off("broker_unavailable", str(exc), stop)
            return
        except Exception as exc:  # noqa: BLE001 - the relay outlives what nobody foresaw
            self.log.error("outbox relay error", error=type(exc).__name__, detail=str(exc))
            await self._drop_database()
            await self._drop_broker()
            await self._back_off("internal_error", f"{type(exc).__name__}: {exc}", stop)
            return
        if self._failures:
            self.log.info("outbox relay recovered", after_failures=self._failures)
        self._failures, self._problem = 0, None
        if claimed < self.config.batch_size:
            await self._wait(stop, self.config.poll_interval, wake=True)

    async def relay_batch(self) -> int:
        """Claim, publish and mark one batch; the number of rows it claimed."""
        broker = await self._broker_side()  # first: readiness means both are reachable
        db = await self._database()
        rows: list[OutboxRow] = []
        try:  # BEGIN and COMMIT fail too when PostgreSQL goes away: both map to DatabaseError
            with store.database_errors("relaying a batch"):
                async with db.transaction():
                    rows = await store.claim(db, self.config.batch_size)
                    if not rows:
                        return 0
                    valid = await self._dead_letter_invalid(db, broker, rows)
                    await self._publish(broker, valid)
                    await store.mark_sent(db, [row.seq for row in valid])
        except BrokerError as exc:  # rolled back: the rows are unsent and unlocked again
            await self._note_failure(db, rows, str(exc))
            raise
        self._count_published(valid)
        return len(rows)

    async def _publish(self, broker: _Broker, rows: Sequence[OutboxRow]) -> None:
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await broker.publisher.publish_many([orjson.loads(row.body) for row in rows])
        except TimeoutError:
            raise BrokerError(f"publishing timed out after {PUBLISH_TIMEOUT} s") from None

    async def _dead_letter_invalid(
        self, db: store.Connection, broker: _Broker, rows: Sequence[OutboxRow]
    ) -> list[OutboxRow]:
        """Send the rows whose body broke the contract to the DLQ, marked; return the others."""
        valid = []
        for row in rows:
            try:
                parse_event(row.body, max_bytes=self.config.max_body_bytes)
            except ContractError as exc:
                await broker.dead_letter(row, self.config.dead_letter_queue, exc.detail)
                await store.mark_dead_lettered(db, row.seq, exc.detail)
                self.metrics.dead_lettered.inc()
                self.log.warning(
                    "outbox row dead-lettered",
                    seq=row.seq,
                    event_id=row.id,
                    installation_id=row.installation_id,
                    reason=Reason.INVALID_MESSAGE.value,
                    detail=exc.detail,
                )
            else:
                valid.append(row)
        return valid

    def _count_published(self, rows: Sequence[OutboxRow]) -> None:
        now = datetime.now(UTC)
        for row in rows:
            self.metrics.latency.observe(max(0.0, (now - row.created_at).total_seconds()))
        self.metrics.published.inc(len(rows))

    async def _note_failure(
        self, db: store.Connection, rows: Sequence[OutboxRow], error: str
    ) -> None:
        """Count the failed attempt on the rows (best effort: PostgreSQL may be failing too)."""
        if rows:
            with contextlib.suppress(DatabaseError):
                await store.note_failure(db, [row.seq for row in rows], error[:1000])

    async def _housekeeping(self) -> None:
        """Now and then: delete old sent rows."""
        now = time.monotonic()
        db = await self._database()
        if now >= self._next_cleanup:
            self._next_cleanup = now + CLEANUP_EVERY
            deleted = DELETE_BATCH
            while deleted == DELETE_BATCH:
                deleted = await store.delete_sent(db, self.config.retention, DELETE_BATCH)
                self.metrics.deleted.inc(deleted)

    async def _sample(self) -> None:
        """Set the backlog gauges every SAMPLE_EVERY seconds while PostgreSQL answers, whether
        or not the broker does; reconnect when the connection is lost. Until it is back the
        gauges keep their last value, and database_errors_total counts the failures."""
        failures = 0
        while True:
            try:
                async with await store.connect(self.config.dsn, autocommit=True) as connection:
                    while True:
                        count, age = await store.backlog(connection)
                        self.metrics.backlog.set(count)
                        self.metrics.oldest_unsent_age.set(age)
                        failures = 0
                        await asyncio.sleep(SAMPLE_EVERY)
            except Exception as exc:  # noqa: BLE001 - stale gauges, never a stopped relay
                if isinstance(exc, DatabaseError):
                    self.metrics.database_errors.inc()
                failures += 1
                if failures == 1:  # once per outage
                    self.log.warning("outbox backlog not sampled", detail=str(exc))
            await asyncio.sleep(_delay(failures))

    async def _listen(self) -> None:
        """Set the wake-up event on every NOTIFY; reconnect when the connection is lost."""
        failures = 0
        while True:
            try:
                async with await store.connect(self.config.dsn, autocommit=True) as connection:
                    self._wake.set()  # anything notified while away: look now
                    failures = 0
                    async for _ in store.notifications(connection):
                        self._wake.set()
            except Exception:  # noqa: BLE001 - a lost listener costs latency, never the relay
                failures += 1
            await asyncio.sleep(_delay(failures))

    async def _database(self) -> store.Connection:
        if self._db is None or self._db.closed:
            self._db = await store.connect(self.config.dsn)
        return self._db

    async def _broker_side(self) -> _Broker:
        if self._broker is None:
            self._broker = await _Broker.open(self.config)
        return self._broker

    async def _drop_database(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(Exception):  # a dead connection may fail to close
                await db.close()

    async def _drop_broker(self) -> None:
        broker, self._broker = self._broker, None
        if broker is not None:
            await broker.close()

    async def _back_off(self, problem: str, detail: str, stop: asyncio.Event) -> None:
        self._failures += 1
        if self._problem != problem:  # once per outage, not once per attempt
            self.log.warning("outbox relay waiting", problem=problem, detail=detail)
        self._problem = problem
        await self._wait(stop, _delay(self._failures), wake=False)

    async def _wait(self, stop: asyncio.Event, seconds: float, *, wake: bool) -> None:
        """Sleep up to `seconds`, less if the stop event (or with `wake`, a NOTIFY) comes."""
        waiters = {asyncio.create_task(stop.wait())}
        if wake:
            waiters.add(asyncio.create_task(self._wake.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


async def _idle() -> None:
    await asyncio.Event().wait()


def _delay(failures: int) -> float:
    return RECONNECT_DELAYS[min(max(failures - 1, 0), len(RECONNECT_DELAYS) - 1)]
