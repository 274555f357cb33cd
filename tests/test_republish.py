"""The relay's copies (retry tiers, DLQ) against a hostile or broken broker side: duplicate
event ids in flight, headers a publisher forged, confirms that never come, header keys that
do not fit. Every test runs a real worker against a real broker and the simulator."""

from __future__ import annotations

import asyncio
import contextvars
import json
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pamqp.decode
import pamqp.encode
import pytest
from aio_pika.abc import AbstractChannel
from hypothesis import given, settings
from hypothesis import strategies as st

from consumer.contract import example_event
from consumer.deadletter import header_time, publishable_headers
from consumer.testing.vercel_sim import Fault, VercelSimulator
from consumer.topology import Topology
from tests.brokers import PrivateBroker
from tests.helpers import AMQP_URL, drain_queue, wait_for_dead_letters, wait_until


@pytest.fixture
async def pub_channel() -> AsyncIterator[AbstractChannel]:
    async with await aio_pika.connect(AMQP_URL) as connection:
        yield await connection.channel(publisher_confirms=True)


def body(event_id: str, resource_id: str, **fields: Any) -> bytes:
    """A valid event; the simulator's record names it by `resource_id`."""
    event = example_event(
        "resource.hardened", id=event_id, resource_id=resource_id, installation_id="icfg_alpha"
    )
    return orjson.dumps({**event, **fields})


async def publish(
    channel: AbstractChannel, exchange: str, messages: list[aio_pika.Message]
) -> None:
    target = await channel.get_exchange(exchange)
    for message in messages:
        await target.publish(message, routing_key="resource.hardened")


def delivered(sim: VercelSimulator) -> set[str]:
    return {str(accepted.event.get("resourceId")) for accepted in sim.accepted}


async def test_duplicate_ids_whose_retry_is_unroutable_are_never_lost(
    start_relay: Callable[..., Awaitable[Any]],
    sim: VercelSimulator,
    pub_channel: AbstractChannel,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """Two messages with one event id (publishers send duplicates) fail at once and both
    retry copies are unroutable (the tiers were deleted under the worker). aiormq pairs a
    `basic.return` with its publish by message_id, so it used to hand the return of one copy
    to the other and take the unroutable one for confirmed: its original was acked and lost
    (5 to 8 of 40). Now every one of the 40 is delivered once the 503s are spent."""
    relay = await start_relay(concurrency=16, retry_delays=(0.05,), max_attempts=50)
    for delay_ms in relay.topology.retry_tiers_ms:
        await channel.queue_delete(relay.topology.retry_queue(delay_ms))
    pairs = [f"evt_dup_{uuid.uuid4().hex[:10]}" for _ in range(20)]
    resources = {f"{event_id}-{copy}": event_id for event_id in pairs for copy in "ab"}
    sim.add_fault(Fault(status=503, times=len(resources)))
    messages = [
        aio_pika.Message(body(event_id, resource), message_id=event_id)
        for resource, event_id in resources.items()
    ]
    await publish(pub_channel, names["exchange"], messages)

    # A lost message never arrives: the wait runs out and names how many are missing.
    try:
        await wait_until(lambda: delivered(sim) >= set(resources), timeout=60, interval=0.2)
    except AssertionError:
        missing = set(resources) - delivered(sim)
        raise AssertionError(f"{len(missing)} of {len(resources)} never delivered") from None
    assert not await drain_queue(channel, relay.topology.dead_letter_queue)


def _ra_servers(queues: list[str], action: str) -> str:
    """Erlang for `rabbitmqctl eval`: suspend or resume the Raft servers of quorum `queues`."""
    names = ", ".join(f'<<"{queue}">>' for queue in queues)
    return (
        '[begin {ok, Q} = rabbit_amqqueue:lookup(rabbit_misc:r(<<"/">>, queue, N)),'
        f" {{Server, _}} = amqqueue:get_pid(Q), sys:{action}(Server) end || N <- [{names}]]."
    )


async def test_a_copy_the_broker_never_confirms_is_handed_back_not_held(
    start_relay: Callable[..., Awaitable[Any]],
    sim: VercelSimulator,
    private_broker: PrivateBroker,
) -> None:
    """A retry tier that cannot commit (a quorum queue without a quorum; here its Raft server
    is suspended) never confirms the copy, and the broker's channel is stuck on its first
    publish to it: it delivers nothing more. The wait used to be unbounded: the slot was held
    for good, and the channel with it, while /readyz stayed green. Now the copy counts as not
    made after CONSUMER_CONFIRM_TIMEOUT, the channel is given up and the worker consumes on a
    new one: later events are delivered while the tier is still stuck. Once the tier is back the
    broker lets go of what the old channel held and those are delivered: nothing acked early,
    nothing lost."""
    relay = await start_relay(
        amqp_url=private_broker.url, retry_delays=(0.05,), confirm_timeout=1.0
    )
    tiers = [relay.topology.retry_queue(ms) for ms in relay.topology.retry_tiers_ms]
    private_broker.ctl("eval", _ra_servers(tiers, "suspend"))
    first, *later = (f"evt_{uuid.uuid4().hex[:12]}" for _ in range(5))
    try:
        sim.add_fault(Fault(status=503, times=1))
        async with await aio_pika.connect(private_broker.url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            exchange = relay.topology.exchange
            await publish(channel, exchange, [aio_pika.Message(body(first, first))])
            await wait_until(lambda: "no confirm from the broker within 1 s" in relay.log_text())
            await wait_until(lambda: relay.worker.reconnects == 1 and relay.worker.consuming)
            assert relay.worker.in_flight == 0
            await publish(channel, exchange, [aio_pika.Message(body(i, i)) for i in later])
            # The broker keeps the stuck channel's consumer and gives it its share.
            await wait_until(lambda: bool(delivered(sim) & set(later)), timeout=30)
            private_broker.ctl("eval", _ra_servers(tiers, "resume"))
            await wait_until(lambda: delivered(sim) >= {first, *later}, timeout=60)
    finally:
        private_broker.ctl("eval", _ra_servers(tiers, "resume"), check=False)
        await _delete_topology(private_broker.url, relay.topology)


async def _delete_topology(url: str, topology: Topology) -> None:
    async with await aio_pika.connect(url) as connection:
        channel = await connection.channel()
        for delay_ms in topology.retry_tiers_ms:
            await channel.queue_delete(topology.retry_queue(delay_ms))
        await channel.queue_delete(topology.queue)
        await channel.queue_delete(topology.dead_letter_queue)
        await channel.exchange_delete(topology.exchange)


LONG_NAMES = contextvars.ContextVar("LONG_NAMES", default=False)


@pytest.fixture(autouse=True)
def long_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let pamqp encode table keys longer than 128 bytes whole (as other clients do), only in
    a task that set LONG_NAMES: the worker in this process still encodes like production."""
    cut = pamqp.encode.field_table

    def field_table(value: Any) -> bytes:
        if not LONG_NAMES.get() or not value:
            return cut(value)
        data = b"".join(
            pamqp.encode.short_string(key) + pamqp.encode.encode_table_value(item)
            for key, item in sorted(value.items())
        )
        return struct.pack(">I", len(data)) + data

    monkeypatch.setattr(pamqp.encode, "field_table", field_table)
    monkeypatch.setitem(pamqp.encode.METHODS, "table", field_table)


FORGED = {
    "original-exchange": "amq.forged",
    "original-routing-key": "forged.key",
    "original-user-id": "admin",
    "dead-letter-reason": "forged",
    "dead-lettered-at": "2000-01-01T00:00:00Z",
    "dropped-headers": "forged",
    "last-error": "forged",
}


async def test_our_headers_on_a_publishers_message_are_ours_not_the_publishers(
    start_relay: Callable[..., Awaitable[Any]],
    pub_channel: AbstractChannel,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """A publisher presetting `original-exchange` and `original-routing-key` (which `dlq replay
    --to-origin` publishes to, with the operator's credentials) or any other header of ours used
    to have them kept (setdefault). Now the dead letter carries the delivery's exchange and
    routing key, and nothing of ours that the publisher wrote."""
    relay = await start_relay()
    await publish(pub_channel, names["exchange"], [aio_pika.Message(b"{}", headers=FORGED)])
    [dead] = await wait_for_dead_letters(channel, relay.topology.queue, 1)
    headers = dead.headers
    assert headers["original-exchange"] == names["exchange"]
    assert headers["original-routing-key"] == "resource.hardened"
    assert headers["dead-letter-reason"] == "invalid_message"
    assert headers.get("last-error") != "forged"
    assert "original-user-id" not in headers
    assert "dropped-headers" not in headers
    assert headers["dead-lettered-at"] != FORGED["dead-lettered-at"]


@pytest.mark.parametrize("through", ["exchange", "queue"])
async def test_a_forged_past_first_attempt_does_not_exhaust_a_first_delivery(
    through: str,
    start_relay: Callable[..., Awaitable[Any]],
    sim: VercelSimulator,
    pub_channel: AbstractChannel,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """A first delivery claiming its first attempt was in 2000, after 999,999 attempts, used to
    be dead-lettered as retries_exhausted on its first 503. Those headers are trusted only on
    copies we made (through the default exchange, with our attempt count and a readable, past
    stamp; a replay or a publisher writing to the queue itself keeps the origin headers only):
    from the domain exchange the publisher's are dropped, so the event is retried and delivered.
    """
    relay = await start_relay(max_attempts=4, max_retry_age=3600)
    sim.add_fault(Fault(status=503, times=1))
    event_id = f"evt_{uuid.uuid4().hex[:12]}"
    stale = {"first-attempt-at": "2000-01-01T00:00:00Z", "delivery-attempts": 999_999}
    if through == "exchange":
        message = aio_pika.Message(body(event_id, event_id), headers=stale)
        await publish(pub_channel, names["exchange"], [message])
    else:  # a bad stamp on a message put in the queue by name: not trusted either
        bad = {**stale, "first-attempt-at": 1}
        message = aio_pika.Message(body(event_id, event_id), headers=bad)
        await pub_channel.default_exchange.publish(message, routing_key=relay.topology.queue)
    await wait_until(lambda: event_id in delivered(sim))
    assert sim.requests == 2
    assert not await drain_queue(channel, relay.topology.dead_letter_queue)


async def test_a_forged_future_first_attempt_is_not_carried_over(
    start_relay: Callable[..., Awaitable[Any]],
    pub_channel: AbstractChannel,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """A `first-attempt-at` in 2200 (or not a string) would keep a message's age at 0 and its
    retries that spend no attempt (rate limits, an open circuit) going for ever; it is replaced
    by the time of the real first attempt, on copies through the domain exchange and through
    the queue alike."""
    relay = await start_relay()
    future = {"first-attempt-at": "2200-01-01T00:00:00Z", "delivery-attempts": 1}
    await publish(pub_channel, names["exchange"], [aio_pika.Message(b"{}", headers=future)])
    await pub_channel.default_exchange.publish(
        aio_pika.Message(b"{}", headers=future), routing_key=relay.topology.queue
    )
    dead = await wait_for_dead_letters(channel, relay.topology.queue, 2)
    for letter in dead:
        stamp = header_time(letter.headers, "first-attempt-at")
        assert stamp is not None
        assert stamp <= datetime.now(UTC)
        assert letter.headers["delivery-attempts"] == 1


async def test_header_names_longer_than_amqp_allows_are_dropped_not_cut(
    start_relay: Callable[..., Awaitable[Any]],
    pub_channel: AbstractChannel,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """RabbitMQ takes header names up to 255 bytes, but AMQP (and so pamqp) allows 128: pamqp
    used to cut longer names on every copy, silently (two names could even become one). Such a
    header, at the top or nested, is dropped from the copy and named in `dropped-headers`; a
    name of exactly 128 bytes is kept."""
    relay = await start_relay()
    long_name, nested, exact = "l" * 200, "nested", "e" * 128
    headers = {long_name: "v", nested: {"inner": {"n" * 129: 1}}, exact: "kept"}

    async def publish_long_names() -> None:
        LONG_NAMES.set(True)
        message = aio_pika.Message(b"{}", headers=headers)
        await publish(pub_channel, names["exchange"], [message])

    await asyncio.create_task(publish_long_names())
    [dead] = await wait_for_dead_letters(channel, relay.topology.queue, 1)
    assert dead.headers[exact] == "kept"
    assert set(str(dead.headers["dropped-headers"]).split(",")) == {long_name, nested}
    assert not [name for name in dead.headers if name.startswith(("l", "nested"))]


NESTED_TOO_DEEP = object()  # stands for headers nested 1,200 tables deep (8 KB on the wire)


def nested_tables(levels: int) -> bytes:
    """An AMQP field table holding `levels` tables each inside the next (built without the
    recursion that pamqp would need, and fail at, to encode it)."""
    table = struct.pack(">I", 0)
    for _ in range(levels):
        entry = b"\x01aF" + table
        table = struct.pack(">I", len(entry)) + entry
    return table


async def test_headers_nested_too_deep_to_decode_log_one_line_and_a_delivery_limit_clears_them(
    start_relay: Callable[..., Awaitable[Any]],
    sim: VercelSimulator,
    private_broker: PrivateBroker,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """aiormq cannot decode headers nested 1,200 deep (RecursionError): the channel closes
    before the message reaches our code and the worker reconnects, again and again. Each time
    aiormq's log line carried a 218 KB traceback; now it is one short line. What takes the
    message out of the way is the broker's delivery limit (a policy; docs/operations.md): the
    work queue dead-letters it, and the event behind it gets through (or, having shared its
    deliveries, is in the DLQ too; kept, not lost)."""
    encode = pamqp.encode.encode_table_value
    deep = b"F" + nested_tables(1200)
    monkeypatch.setattr(
        pamqp.encode,
        "encode_table_value",
        lambda value: deep if value is NESTED_TOO_DEEP else encode(value),
    )
    relay = await start_relay(amqp_url=private_broker.url)
    queue, dlq = relay.topology.queue, relay.topology.dead_letter_queue
    event_id = f"evt_{uuid.uuid4().hex[:12]}"
    try:
        async with await aio_pika.connect(private_broker.url) as connection:
            channel = await connection.channel(publisher_confirms=True)
            poison = aio_pika.Message(b"{}", headers={"deep": NESTED_TOO_DEEP})
            await publish(channel, relay.topology.exchange, [poison])
            await wait_until(lambda: relay.worker.reconnects >= 2)
            # Whether aiormq's RecursionError line itself reaches the relay's log depends on
            # the library-log bridge and the folding of lost-connection reports (it did after
            # other tests of the suite, not in this test alone): what holds either way is that
            # no line is a 218 KB traceback.
            assert max(len(line) for line in relay.log_text().splitlines()) < 2048
            policy = json.dumps({"delivery-limit": 3})
            private_broker.ctl("set_policy", "limit-" + queue, f"^{queue}$", policy)
            await publish(
                channel, relay.topology.exchange, [aio_pika.Message(body(event_id, event_id))]
            )

            async def cleared() -> bool:
                depth = await channel.declare_queue(dlq, passive=True)
                dead = depth.declaration_result.message_count
                return dead == 2 or (dead == 1 and event_id in delivered(sim))

            await wait_until(cleared, timeout=60, interval=0.5)
    finally:
        private_broker.ctl("clear_policy", "limit-" + queue, check=False)
        await _delete_topology(private_broker.url, relay.topology)


NAMES = st.text(min_size=1, max_size=140) | st.text(alphabet="é", min_size=60, max_size=70)
VALUES = st.recursive(
    st.one_of(st.integers(-(2**31), 2**31 - 1), st.text(max_size=20), st.none()),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(NAMES, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(NAMES, VALUES, max_size=6))
def test_a_copys_headers_arrive_whole_or_are_named_as_dropped(headers: dict[str, Any]) -> None:
    """Whatever the names and nesting, the headers of a copy decode to exactly what we meant
    to send (no name cut short by pamqp), and every header left out is named (as far as the
    1 KiB list holds; a comma in a name makes the list ambiguous, see docs/contract.md)."""
    sent = publishable_headers(headers)
    _, decoded = pamqp.decode.field_table(pamqp.encode.field_table(sent))
    assert decoded == sent
    kept = set(sent) - {"dropped-headers"}
    assert kept <= set(headers)
    named = str(sent.get("dropped-headers", ""))
    if not named.endswith("..."):  # the list itself is cut at 1 KiB
        assert all(name in named for name in set(headers) - kept)
