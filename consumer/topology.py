"""The broker edge: connecting, the queues' names and arguments, and one idempotent declare.

```
publishers ──▶ <exchange> (topic, durable) ──resource.# / billing.#──▶ <queue> (quorum)
                                                                         │   ▲
                        consumer: retry ─▶ <queue>.retry.<ms>ms (quorum, │   │ x-message-ttl,
                                            one per tier)  ──────────────┼───┘ at-least-once DLX
                        consumer: dead letter ─▶ <queue>.dlq (quorum)   ◀┘
```

Retries and dead letters go through the default exchange by queue name, never back through the
domain exchange whose other subscribers would see them again. Retry tiers dead-letter back to
the work queue at-least-once (quorum queues, `x-overflow: reject-publish`), so a message in a
tier survives a broker restart and is never dropped on its way back; the work queue likewise
dead-letters into the DLQ whatever the broker itself gives up on. aio-pika and aiormq errors
are mapped to `BrokerError` here (see `broker_errors`).

Delivery limits (docs/operations.md, "Delivery limits"): RabbitMQ 4.0-4.2 give every quorum
queue a limit of 20 returns by default, and a return is any delivery that ends without an ack
(a reject, or a channel that closed holding it). Over the limit a message is dead-lettered, or
dropped where the queue has no dead-letter target. So the work queue is declared with a limit
above the default `CONSUMER_MAX_REDELIVERIES` (the worker's own check, with its reason, comes
first; the broker's dead-letters into the DLQ as a backstop), and the DLQ with a limit no one
reaches.
The retry tiers are never consumed (their messages only expire), so no limit applies to them.
Queues that an earlier release declared without a limit keep their arguments (the broker
refuses to change them): `declare` notices and reports them, and a policy protects them.

`CONSUMER_AMQP_URL` may list several nodes of a cluster (consumer/amqpurl.py): `Connector`
tries them in turn, starting after the one it last reached, so losing a node fails over to the
next at once. TLS failures (an untrusted or expired certificate, a plain port given as
amqps://) become one sentence (`describe_tls_error`), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractQueue

from consumer.amqpurl import broker_address as broker_address  # re-exported for the dlq tool
from consumer.amqpurl import split_urls
from consumer.errors import BrokerCause, BrokerError

BINDINGS = ("resource.#", "billing.#")
QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
CONNECT_TIMEOUT = 10.0  # seconds; a broker that does not answer by then counts as down
# Seconds between AMQP heartbeats unless the URL sets `?heartbeat=`. aiormq would ask for 60
# and give up on a silent peer (a network partition, a frozen broker) only after 3 x 61 s;
# at 10 it notices within about 35 s and reconnects.
HEARTBEAT = 10
DELIVERY_LIMIT = "x-delivery-limit"
# A backstop above CONSUMER_MAX_REDELIVERIES (10 by default), so the worker's own check, with its
# reason, normally comes first. Not higher: what only the broker can remove (a message aiormq
# cannot decode, which closes the channel before our code sees it) loops once per reconnect
# until this limit moves it to the DLQ. A CONSUMER_MAX_REDELIVERIES of 50 or more is cut here.
WORK_QUEUE_DELIVERY_LIMIT = 50
# As good as none, with the same meaning on every version: -1 means "no limit" on 4.x but drops
# a message at its first return on 3.10 (both measured), and 3.10 applies no limit by default.
DLQ_DELIVERY_LIMIT = 2**31 - 1


@dataclass(frozen=True, slots=True)
class Topology:
    """The names of everything the consumer declares and publishes to."""

    exchange: str
    queue: str
    retry_tiers_ms: tuple[int, ...]

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.queue}.dlq"

    def retry_queue(self, delay_ms: int) -> str:
        return f"{self.queue}.retry.{delay_ms}ms"


@contextlib.contextmanager
def broker_errors(action: str) -> Iterator[None]:
    """Re-raise anything the AMQP stack throws while doing `action` as a BrokerError."""
    try:
        yield
    except (
        aiormq.exceptions.AMQPError,
        aio_pika.exceptions.AMQPException,
        OSError,
        # aio-pika and aiormq say "this channel or connection is already closed" with
        # RuntimeError (ChannelInvalidStateError among them) when it closed between two calls.
        RuntimeError,
    ) as exc:
        tls = _tls_cause(exc)
        if tls is not None:
            message = f"{action} failed: {describe_tls_error(tls)}"
            raise BrokerError(message, cause=BrokerCause.TLS) from exc
        message = f"{action} failed: {type(exc).__name__}: {exc}"
        raise BrokerError(message, cause=_cause_of(exc)) from exc
    except TimeoutError as exc:
        raise BrokerError(f"{action} timed out", cause=BrokerCause.UNREACHABLE) from exc


def _cause_of(exc: BaseException) -> BrokerCause:
    """The kind of a failure that is not TLS's, by the AMQP stack's own exception types."""
    if isinstance(
        exc,
        aiormq.exceptions.ProbableAuthenticationError
        | aiormq.exceptions.AuthenticationError
        | aiormq.exceptions.ConnectionNotAllowed,
    ):
        return BrokerCause.CREDENTIALS
    if isinstance(exc, OSError | aiormq.exceptions.AMQPConnectionError):
        return BrokerCause.UNREACHABLE
    return BrokerCause.OTHER


def connection_name() -> str:
    """How the broker's management UI names this process's connection: host (the pod) and pid."""
    return f"vercel-consumer {socket.gethostname()} pid {os.getpid()}"


async def connect(url: str, *, name: str = "vercel-consumer") -> AbstractConnection:
    """Open one AMQP connection to the first broker of the list `url` that answers, named for
    the broker's UI (no automatic reconnect: the worker owns that loop)."""
    return await Connector(url, name=name)()


class Connector:
    """Connects to the brokers of a failover list in turn, starting after the last one reached.

    Each call tries every URL once, at once, before giving up with one BrokerError that names
    each broker's failure: the wait between rounds is the worker's (consumer/backoff.py).
    """

    def __init__(self, url: str, *, name: str = "vercel-consumer") -> None:
        self._urls = split_urls(url)
        self._name = name
        self._next = 0
        self.address = ""  # host:port of the broker last connected to

    async def __call__(self) -> AbstractConnection:
        failures: list[BrokerError] = []
        count = len(self._urls)
        for offset in range(count):
            index = (self._next + offset) % count
            address = broker_address(self._urls[index])
            try:
                connection = await self._open(self._urls[index], address)
            except BrokerError as exc:
                failures.append(exc)
                continue
            self._next, self.address = (index + 1) % count, address
            return connection
        causes = {failure.cause for failure in failures}
        raise BrokerError(
            "; ".join(str(failure) for failure in failures) or "no broker URL given",
            cause=causes.pop() if len(causes) == 1 else BrokerCause.UNREACHABLE,
        )

    async def _open(self, url: str, address: str) -> AbstractConnection:
        with broker_errors(f"connecting to {address}"):
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await aio_pika.connect(
                    with_heartbeat(url), client_properties={"connection_name": self._name}
                )


def _tls_cause(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind `exc` (aiormq wraps it in AMQPConnectionError), if any."""
    seen: BaseException | None = exc
    for _ in range(5):  # a short chain; never loop on a cycle
        if seen is None:
            return None
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def describe_tls_error(exc: ssl.SSLError) -> str:
    """One sentence for a failed TLS handshake, saying what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = exc.verify_message or exc.reason or "verification failed"
        return (
            f"TLS: the broker's certificate was not accepted ({why}); check that"
            " CONSUMER_AMQP_CAFILE (or the URL's cafile) is the CA that signed it and that it"
            " is still valid"
        )
    reason = str(exc.reason or exc).lower().replace("_", " ")
    if "wrong version" in reason or "record layer" in reason or "unknown protocol" in reason:
        return (
            "TLS: the broker did not answer with TLS (is this a plain AMQP port given as"
            " amqps://? RabbitMQ's TLS port is usually 5671)"
        )
    if "certificate" in reason or "alert" in reason:
        return (
            f"TLS: the broker refused the handshake ({exc.reason}); check the client"
            " certificate (CONSUMER_AMQP_CERTFILE, CONSUMER_AMQP_KEYFILE)"
        )
    return f"TLS handshake failed ({exc.reason or exc})"


def is_blocked(connection: AbstractConnection) -> bool | None:
    """Whether the broker blocks `connection` right now (a memory or disk alarm:
    `connection.blocked`, which stops every publish on it); None when the client cannot tell.

    aiormq 7 keeps this in a private event that its frame reader clears on `connection.blocked`
    and sets on `connection.unblocked`, with no callback and without the broker's reason: it is
    only read (polled by the worker), so nothing of the client's own handling changes.
    """
    underlay = connection.transport.connection if connection.transport else None
    unblocked = getattr(underlay, "_Connection__connection_unblocked", None)
    return not unblocked.is_set() if isinstance(unblocked, asyncio.Event) else None


def with_heartbeat(url: str, seconds: int = HEARTBEAT) -> str:
    """`url` asking for heartbeats every `seconds`, unless its query already says how often."""
    parts = urlsplit(url)
    if any(key == "heartbeat" for key, _ in parse_qsl(parts.query)):
        return url
    query = f"{parts.query}&heartbeat={seconds}" if parts.query else f"heartbeat={seconds}"
    return urlunsplit(parts._replace(query=query))


async def open_channel(connection: AbstractConnection, *, prefetch: int = 0) -> AbstractChannel:
    """A channel with publisher confirms, unroutable mandatory publishes raising, and QoS."""
    with broker_errors("opening a channel"):
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        if prefetch:
            await channel.set_qos(prefetch_count=prefetch)
        return channel


@dataclass(frozen=True, slots=True)
class Declared:
    """What `declare` made sure of: the work queue, the broker's version, and the queues that
    an earlier release declared without our delivery limit (see `unprotected_warning`)."""

    work_queue: AbstractQueue
    broker_version: str
    without_delivery_limit: tuple[str, ...]


async def declare(channel: AbstractChannel, topology: Topology) -> Declared:
    """Declare exchange, DLQ, work queue, bindings and retry tiers.

    Safe to repeat. A queue that exists with other arguments is reported, not replaced; the DLQ
    or work queue of an earlier release, which differs only by having no delivery limit, is
    used as it is and named in the result.
    """
    with broker_errors("declaring the topology"):
        connection = (await channel.get_underlay_channel()).connection
        exchange = await channel.declare_exchange(
            topology.exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        # The DLQ first: the work queue dead-letters into it.
        dlq_limited = await declare_with_delivery_limit(
            connection, topology.dead_letter_queue, QUORUM, DLQ_DELIVERY_LIMIT
        )
        work_limited = await declare_with_delivery_limit(
            connection,
            topology.queue,
            dead_lettering_to(topology.dead_letter_queue),
            WORK_QUEUE_DELIVERY_LIMIT,
        )
        work_queue = await channel.get_queue(topology.queue, ensure=False)
        for routing_key in BINDINGS:
            await work_queue.bind(exchange, routing_key)
        for delay_ms in topology.retry_tiers_ms:
            await channel.declare_queue(
                topology.retry_queue(delay_ms),
                durable=True,
                arguments={**dead_lettering_to(topology.queue), "x-message-ttl": delay_ms},
            )
        unprotected = [topology.dead_letter_queue] if not dlq_limited else []
        unprotected += [topology.queue] if not work_limited else []
        version = connection.server_properties.get("version", "")
        return Declared(work_queue, _text(version), tuple(unprotected))


async def declare_with_delivery_limit(
    connection: aiormq.abc.AbstractConnection, queue: str, arguments: dict[str, Any], limit: int
) -> bool:
    """Declare `queue` with `arguments` and delivery limit `limit`; True if it has that limit,
    False if an earlier release declared it without one (it is then declared as it is).

    The broker refuses the limit on such a queue and closes the channel, so each try gets a
    channel of its own. Also the way to ask whether an existing DLQ is protected (declare it
    with `QUORUM` and `DLQ_DELIVERY_LIMIT`): AMQP shows no queue's arguments.
    """
    for limited in (True, False):
        extra = {DELIVERY_LIMIT: limit} if limited else {}
        channel = await connection.channel()
        try:
            await channel.queue_declare(queue, durable=True, arguments={**arguments, **extra})
        except aiormq.exceptions.ChannelPreconditionFailed as exc:
            if not limited or DELIVERY_LIMIT not in str(exc):
                raise
            continue
        finally:
            if not channel.is_closed:
                await channel.close()
        return limited
    raise AssertionError("unreachable: the second try returns or raises")


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def unprotected_warning(queue: str, topology: Topology, broker_version: str) -> str:
    """The one sentence an operator needs about a queue declared without our delivery limit."""
    if queue == topology.dead_letter_queue:
        risk = (
            "RabbitMQ 4.0-4.2 drop a dead letter after 20 deliveries (each dlq command's look"
            " counts), as the DLQ has no dead-letter target"
        )
        policy = f'{{"delivery-limit":{DLQ_DELIVERY_LIMIT}}}'  # not -1: 3.10 drops at once
    else:
        risk = (
            "RabbitMQ 4.0-4.2 dead-letter a message into the DLQ after 20 deliveries, maybe"
            " before CONSUMER_MAX_REDELIVERIES, with x-death reason delivery_limit"
        )
        policy = f'{{"delivery-limit":{WORK_QUEUE_DELIVERY_LIMIT}}}'
    return (
        f"queue {queue} was declared by an earlier release without x-delivery-limit, and its"
        f" arguments cannot change: {risk} (this broker is {broker_version or 'unknown'});"
        f" protect it with a policy, e.g. rabbitmqctl set_policy --apply-to queues"
        f" {queue}-limit '^{_regex_quoted(queue)}$' '{policy}' (see docs/operations.md)"
    )


def _regex_quoted(name: str) -> str:
    return "".join(f"\\{c}" if c in ".^$*+?()[]{}|\\" else c for c in name)


def dead_lettering_to(queue: str) -> dict[str, Any]:
    """Quorum queue arguments that hand what the queue lets go of to `queue`, at least once.

    For a retry tier that is every message, when its TTL expires. For the work queue it is a
    safety net: we never reject without requeue, but a broker that gives up on a message
    (RabbitMQ 4 applies a delivery limit of 20 to quorum queues by default) then puts it in
    the DLQ instead of dropping it.
    """
    return {
        **QUORUM,
        "x-dead-letter-exchange": "",
        "x-dead-letter-routing-key": queue,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",  # at-least-once dead-lettering requires it
    }
