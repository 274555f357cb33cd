"""Publishing domain events, for partner microservices and the `publish` command.

```python
async with await EventPublisher.connect("amqp://…", exchange="domain-events") as publisher:
    await publisher.publish({"id": "evt_1", "type": "resource.renamed", ...})
    await publisher.publish_many(events)
```

Each event is checked against the contract first (a publisher learns of a bad event at once,
not from the consumer's DLQ), then published persistent, with `message_id` = `id`, routing
key = `type`, mandatory routing and publisher confirms. Every publish returns once the broker
has confirmed the message into a queue, or raises a `PublishError` (consumer/errors.py): never
a silent drop.

- **Pipelined:** publishes from many tasks (or one `publish_many`) share one channel, up to
  `max_in_flight` awaiting their confirms at once; each is awaited on its own.
- **Reconnects:** a publish that meets a lost connection or channel reconnects (with backoff,
  through one `topology.Connector`, so to the next URL of a multi-URL setting) and publishes again,
  until it is confirmed or its `timeout` runs out (seconds, reconnects included, counted from
  when the publish gets one of the `max_in_flight` slots). A message
  whose confirm was lost with the connection may then be queued twice: consumers are
  at-least-once and dedupe by id.
- **Duplicate ids:** aiormq pairs a basic.return with its publish by `message_id` (the latest
  publish of that id wins), so two unroutable publishes of one id in flight at once could be
  misattributed and one of them reported confirmed. Publishes of one id are therefore
  serialised; different ids run in parallel.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import aio_pika
import aiormq
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractExchange

from consumer.contract import MESSAGE_ID_MAX_BYTES, parse_event
from consumer.errors import (
    BrokerError,
    ConsumerError,
    ContractError,
    PublishBatchError,
    PublishNotConfirmed,
    PublishTimeout,
    PublishUnroutable,
)
from consumer.logs import get_logger
from consumer.topology import Connector, broker_errors, open_channel

APP_ID = "vercel-event-consumer.publisher"
MAX_IN_FLIGHT = 1024  # publishes awaiting their confirm at once
PUBLISH_TIMEOUT = 30.0  # seconds a publish may take, reconnects included
RECONNECT_DELAYS = (0.1, 0.2, 0.5, 1.0, 2.0)  # seconds between attempts, the last repeats
_JITTER = (0.8, 1.2)
_log = get_logger("consumer.publish")


class _Link:
    """One connection, its confirming channel and the declared exchange."""

    def __init__(
        self, connection: AbstractConnection, channel: AbstractChannel, exchange: AbstractExchange
    ) -> None:
        self.connection = connection
        self.channel = channel
        self.exchange = exchange

    @property
    def usable(self) -> bool:
        return not (self.connection.is_closed or self.channel.is_closed)


class EventPublisher:
    """Publishes contract-checked events to the domain exchange with confirms; safe to share
    between tasks."""

    def __init__(
        self,
        url: str,
        *,
        exchange: str = "domain-events",
        max_in_flight: int = MAX_IN_FLIGHT,
        timeout: float = PUBLISH_TIMEOUT,
        name: str = "vercel-consumer-publisher",
    ) -> None:
        if max_in_flight < 1 or timeout <= 0:
            raise ValueError("max_in_flight must be at least 1 and timeout positive")
        # One connector for the publisher's life: a reconnect goes on from the broker after
        # the one last reached, rather than retrying the first URL (perhaps the lost node).
        self._connect = Connector(url, name=name)
        self._exchange_name = exchange
        self._timeout = timeout
        self._max_in_flight = max_in_flight
        self._slots = asyncio.Semaphore(max_in_flight)
        self._busy: dict[str, asyncio.Future[None]] = {}  # event id → its publish under way
        self._link: _Link | None = None
        self._linking = asyncio.Lock()
        self._closed = False
        self.reconnects = 0  # how often a lost link was replaced (for tests and metrics)

    @classmethod
    async def connect(cls, url: str, **options: Any) -> Self:
        """A publisher already connected (BrokerError when the broker cannot be reached)."""
        publisher = cls(url, **options)
        await publisher._connected(stale=None, wait=False)
        return publisher

    async def publish(
        self,
        event: Mapping[str, Any],
        *,
        validate: bool = True,
        headers: Mapping[str, Any] | None = None,
    ) -> None:
        """Publish one event and wait for its confirm. ContractError if it breaks the contract
        (and `validate`); PublishError if it was not confirmed. `headers` go on the message
        as they are, e.g. a W3C `traceparent`."""
        body = orjson.dumps(dict(event))
        if validate:
            parse_event(body, max_bytes=len(body))
        event_id, event_type = str(event.get("id")), str(event.get("type"))
        await self.publish_raw(body, event_id=event_id, event_type=event_type, headers=headers)

    async def publish_many(
        self, events: Iterable[Mapping[str, Any]], *, validate: bool = True
    ) -> None:
        """Publish a batch, pipelined; return once every event is confirmed. Otherwise raise
        PublishBatchError (after every publish has ended) naming the confirmed ids and each
        failed id with its error (ContractError for an invalid event, a PublishError)."""
        batch = list(events)
        outcomes: list[ConsumerError | None] = [None] * len(batch)
        queue = iter(range(len(batch)))

        async def worker() -> None:
            # A few workers taking events in turn, rather than a task per event waiting on
            # the semaphore: a batch of 100,000 costs 100,000 coroutines, not tasks.
            for index in queue:
                try:
                    await self.publish(batch[index], validate=validate)
                except ConsumerError as error:
                    outcomes[index] = error

        await asyncio.gather(*(worker() for _ in range(min(len(batch), self._max_in_flight))))
        failures = [
            (str(event.get("id")), error)
            for event, error in zip(batch, outcomes, strict=True)
            if error is not None
        ]
        if failures:
            confirmed = [
                str(event.get("id"))
                for event, error in zip(batch, outcomes, strict=True)
                if error is None
            ]
            raise PublishBatchError(confirmed, failures)

    async def publish_raw(
        self,
        body: bytes,
        *,
        event_id: str,
        event_type: str,
        headers: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
    ) -> None:
        """Publish a body as it is, routed by `event_type`, and wait for its confirm."""
        if len(event_id.encode("utf-8", "surrogatepass")) > MESSAGE_ID_MAX_BYTES:
            # Even unvalidated: the id is the message_id, an AMQP short string, and the client
            # raised TypeError for a longer one, which escaped publish_many (and wedged the
            # outbox relay on that row) instead of being the event's own ContractError.
            raise ContractError(
                f"id: must be at most {MESSAGE_ID_MAX_BYTES} bytes in UTF-8 (the AMQP message_id)"
            )
        async with self._slots:
            done = await self._claim(event_id)
            try:
                async with asyncio.timeout(self._timeout):
                    await self._publish_until_confirmed(
                        body, event_id, event_type, dict(headers or {}), content_type
                    )
            except TimeoutError:
                raise PublishTimeout(
                    f"event {event_id} not confirmed within {self._timeout:g} s",
                    event_id=event_id,
                ) from None
            finally:
                del self._busy[event_id]
                done.set_result(None)  # the next publish of this id may go

    async def _claim(self, event_id: str) -> asyncio.Future[None]:
        """Wait until no publish of `event_id` is under way, then mark this one as it."""
        while (busy := self._busy.get(event_id)) is not None:
            await asyncio.wait({busy})  # not `await busy`: a cancelled waiter would cancel it
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._busy[event_id] = done
        return done

    async def _publish_until_confirmed(
        self, body: bytes, event_id: str, event_type: str, headers: dict[str, Any], ctype: str
    ) -> None:
        link: _Link | None = None
        while True:
            link = await self._connected(stale=link)
            message = aio_pika.Message(
                body,
                headers=headers or None,
                content_type=ctype,
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event_id,
                timestamp=datetime.now(UTC),
                app_id=APP_ID,
            )
            try:
                with _publish_errors(event_id, event_type, self._exchange_name):
                    await link.exchange.publish(message, routing_key=event_type, mandatory=True)
                return
            except _LinkLost:
                continue  # the next turn reconnects and publishes again

    async def _connected(self, stale: _Link | None, *, wait: bool = True) -> _Link:
        """The current link; a new one if it is `stale` or unusable (one task reconnects,
        the others wait for it), retrying with backoff until the caller's deadline unless
        not to `wait` (then BrokerError)."""
        link = self._link
        if link is not None and link is not stale and link.usable and not self._closed:
            return link  # the common case, without queueing on the lock
        async with self._linking:
            attempt = 0
            while self._link is None or self._link is stale or not self._link.usable:
                if self._closed:
                    raise PublishNotConfirmed("the publisher is closed")
                if self._link is not None:
                    await self._drop_link()
                    self.reconnects += 1
                    _log.warning("publisher lost its connection; reconnecting")
                try:
                    self._link = await self._open_link()
                except BrokerError as error:
                    if not wait:
                        raise
                    delay = _backoff(attempt)
                    _log.warning(
                        "publisher cannot reach the broker",
                        error=str(error),
                        retry_in_s=round(delay, 2),
                    )
                    await asyncio.sleep(delay)
                    attempt += 1
            return self._link

    async def _open_link(self) -> _Link:
        connection = await self._connect()
        try:
            channel = await open_channel(connection)
            with broker_errors(f"declaring exchange {self._exchange_name}"):
                exchange = await channel.declare_exchange(
                    self._exchange_name, aio_pika.ExchangeType.TOPIC, durable=True
                )
        except BaseException:
            await _close_quietly(connection)
            raise
        return _Link(connection, channel, exchange)

    async def _drop_link(self) -> None:
        if self._link is not None:
            link, self._link = self._link, None
            await _close_quietly(link.connection)

    async def close(self) -> None:
        """Close the connection; publishes still waiting raise PublishNotConfirmed."""
        self._closed = True
        async with self._linking:
            await self._drop_link()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()


class _LinkLost(Exception):
    """The connection or channel went away before the publish was confirmed."""


@contextmanager
def _publish_errors(event_id: str, event_type: str, exchange: str) -> Iterator[None]:
    """Map aio-pika's and aiormq's answers to one publish onto our tree."""
    try:
        yield
    except aiormq.exceptions.PublishError:
        raise PublishUnroutable(
            f"event {event_id} was returned: no queue is bound to routing key {event_type!r}"
            f" on exchange {exchange!r}",
            event_id=event_id,
        ) from None
    except aiormq.exceptions.DeliveryError as exc:
        raise PublishNotConfirmed(
            f"event {event_id} was nacked by the broker ({exc.frame!r})", event_id=event_id
        ) from None
    except (
        aiormq.exceptions.AMQPError,
        aio_pika.exceptions.AMQPException,
        OSError,
        RuntimeError,  # aio-pika's "channel closed" between two calls
        asyncio.CancelledError,  # aiormq cancels pending confirms of a closed channel
    ) as exc:
        if isinstance(exc, asyncio.CancelledError) and _cancelling():
            raise  # our caller's cancellation (or our timeout), not the channel's
        raise _LinkLost(str(exc)) from exc


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _backoff(attempt: int) -> float:
    delay = RECONNECT_DELAYS[min(attempt, len(RECONNECT_DELAYS) - 1)]
    return delay * random.uniform(*_JITTER)  # noqa: S311 - jitter, not cryptography


async def _close_quietly(connection: AbstractConnection) -> None:
    try:
        async with asyncio.timeout(5):
            await connection.close()
    except Exception:  # noqa: BLE001, S110 - it is being discarded; a dead one may not close
        pass
