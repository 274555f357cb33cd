"""Publishing domain events, for partner microservices and the `publish` command.

```python
async with await EventPublisher.connect("amqp://…", exchange="domain-events") as publisher:
    await publisher.publish({"id": "evt_1", "type": "resource.renamed", ...})
```

Each event is checked against the contract first (so a publisher learns of a bad event at
once, not from the consumer's DLQ), then published persistent, with `message_id` = `id`,
routing key = `type`, and mandatory routing with publisher confirms: `publish` returns only
once the broker has the message in a queue, and raises BrokerError when no queue is bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import aio_pika
import orjson
from aio_pika.abc import AbstractConnection, AbstractExchange

from consumer.contract import parse_event
from consumer.topology import broker_errors, connect, open_channel

APP_ID = "vercel-event-consumer.publisher"


class EventPublisher:
    """Publishes contract-checked events to the domain exchange with confirms."""

    def __init__(self, connection: AbstractConnection, exchange: AbstractExchange) -> None:
        self._connection = connection
        self._exchange = exchange

    @classmethod
    async def connect(cls, url: str, *, exchange: str = "domain-events") -> Self:
        connection = await connect(url, name="vercel-consumer-publisher")
        channel = await open_channel(connection)
        with broker_errors(f"declaring exchange {exchange}"):
            declared = await channel.declare_exchange(
                exchange, aio_pika.ExchangeType.TOPIC, durable=True
            )
        return cls(connection, declared)

    async def publish(
        self,
        event: Mapping[str, Any],
        *,
        validate: bool = True,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish one event; ContractError if it breaks the contract (and `validate`).
        `headers` go on the message as they are, e.g. a W3C `traceparent`."""
        body = orjson.dumps(dict(event))
        if validate:
            parse_event(body, max_bytes=len(body))
        event_id, event_type = str(event.get("id")), str(event.get("type"))
        await self.publish_raw(body, event_id=event_id, event_type=event_type, headers=headers)

    async def publish_many(
        self, events: Sequence[Mapping[str, Any]], *, validate: bool = True
    ) -> None:
        """Publish events in order with their confirms pipelined; return once the broker has
        confirmed every one, or raise the first failure (some may be published, as with any
        retried publish). Every event is checked first: an invalid one publishes nothing.

        Order: the publishes are started in order, and each reaches the channel's FIFO lock
        without suspending, so the frames go out in order; only the confirms are awaited
        together."""
        bodies = [orjson.dumps(dict(event)) for event in events]
        if validate:
            for body in bodies:
                parse_event(body, max_bytes=len(body))
        publishes = [
            asyncio.ensure_future(
                self.publish_raw(
                    body, event_id=str(event.get("id")), event_type=str(event.get("type"))
                )
            )
            for body, event in zip(bodies, events, strict=True)
        ]
        results = await asyncio.gather(*publishes, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def publish_raw(
        self,
        body: bytes,
        *,
        event_id: str,
        event_type: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Publish a body as it is, routed by `event_type` (tests and demos of bad input)."""
        message = aio_pika.Message(
            body,
            headers=dict(headers) if headers else None,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=event_id,
            timestamp=datetime.now(UTC),
            app_id=APP_ID,
        )
        with broker_errors(f"publishing event {event_id} to {self._exchange.name}"):
            await self._exchange.publish(message, routing_key=event_type, mandatory=True)

    async def close(self) -> None:
        await self._connection.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()
