"""The relay's copies (retry tiers, DLQ) against a hostile or broken broker side: duplicate
event ids in flight, headers a publisher forged, confirms that never come, header keys that
do not fit. Every test runs a real worker against a real broker and the simulator."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import struct
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import orjson
import pamqp.decode
import pamqp.encode
import pytest
from aio_pika.abc import AbstractChannel
from hypothesis import example, given, settings
from hypothesis import strategies as st

from consumer.contract import example_event
from consumer.deadletter import (
    FRAME_MAX,
    HEADERS_LIMIT,
    attempts_made,
    header_frame_bytes,
    header_time,
    publishable_headers,
    trusted_attempts,
    trusted_headers,
)
from consumer.dlq.export import FORMAT, ExportedMessage, decode_line, encode_line
from consumer.errors import ConfigError
from consumer.nesting import DeepValue
from consumer.testing.vercel_sim import Fault, VercelSimulator
from consumer.topology import Topology
from tests.brokers import PrivateBroker
from tests.helpers import (
    AMQP_URL,
    deepest_fitting,
    drain_queue,
    nested,
    wait_for_dead_letters,
    wait_until,
)


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


def _deepest(make: Callable[[DeepValue], aio_pika.Message]) -> DeepValue:
    return nested(deepest_fitting(make))


def _1200_tables(make: Callable[[DeepValue], aio_pika.Message]) -> DeepValue:
    return nested(1200, tables=True)


@pytest.mark.parametrize("deep_value", [_1200_tables, _deepest], ids=["1200-tables", "deepest"])
async def test_headers_nested_as_deep_as_a_frame_allows_neither_stop_nor_lose_an_event(
    start_relay: Callable[..., Awaitable[Any]],
    sim: VercelSimulator,
    pub_channel: AbstractChannel,
    channel: AbstractChannel,
    deep_value: Callable[[Callable[[DeepValue], aio_pika.Message]], DeepValue],
) -> None:
    """pamqp used to decode headers with two Python calls per level, each copying the rest of
    the frame: at 1,200 tables deep aiormq's reader stopped at RecursionError, the worker
    reconnected in a loop and only the broker's delivery limit took the message out of the
    way (to a DLQ no dlq command could read past). Now what lies beyond 64 levels stays packed
    (consumer/amqptables.py): a valid event with such a header is delivered, an invalid one is
    dead-lettered with its reason, its header byte for byte, both at 1,200 tables and at the
    26,200 arrays or so that fill a 131,072-byte frame. There, the copy has no room for the header
    next to ours: it is dropped and named, like any header too large. No reconnect."""
    relay = await start_relay()
    event_id = f"evt_{uuid.uuid4().hex[:12]}"

    def valid(value: DeepValue) -> aio_pika.Message:
        return aio_pika.Message(body(event_id, event_id), message_id=event_id, headers={"d": value})

    def invalid(value: DeepValue) -> aio_pika.Message:
        return aio_pika.Message(b"not json", message_id=f"{event_id}-x", headers={"d": value})

    sent = deep_value(invalid)
    await publish(pub_channel, relay.topology.exchange, [valid(deep_value(valid))])
    await publish(pub_channel, relay.topology.exchange, [invalid(sent)])
    await wait_until(lambda: event_id in delivered(sim))
    [dead] = await wait_for_dead_letters(channel, relay.topology.queue, 1)
    assert dead.headers["dead-letter-reason"] == "invalid_message"
    if len(sent.raw) < HEADERS_LIMIT:
        assert pamqp.encode.encode_table_value(dead.headers["d"]) == sent.raw
        assert "dropped-headers" not in dead.headers
    else:
        assert "d" not in dead.headers
        assert dead.headers["dropped-headers"] == "d"
    assert relay.worker.reconnects == 0
    assert max(len(line) for line in relay.log_text().splitlines()) < 2048


async def test_a_header_deeper_than_a_frame_holds_is_refused_by_the_broker_itself() -> None:
    """What bounds the depth of a header the relay can be handed: the deepest header within
    FRAME_MAX is taken (26,208 arrays), and a deeper one makes RabbitMQ close the publisher's
    connection (`frame_too_large`). RabbitMQ compares the frame's payload, not the frame, with
    frame_max: 3.10 took a frame up to 8 bytes over it, so the refused one is the first beyond
    that."""

    def message(value: DeepValue) -> aio_pika.Message:
        # With a message_id: aiormq would add one of 32 characters, beyond what is measured.
        return aio_pika.Message(b"{}", headers={"d": value}, message_id="m")

    levels = deepest_fitting(message)
    assert levels == 26_208
    refused = levels + 1
    while header_frame_bytes(message(nested(refused))) <= FRAME_MAX + 8:
        refused += 1
    async with await aio_pika.connect(AMQP_URL) as connection:
        channel = await connection.channel(publisher_confirms=True)
        queue = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(message(nested(levels)), queue.name)
        with pytest.raises(aiormq.exceptions.ConnectionFrameError, match="frame_too_large"):
            await channel.default_exchange.publish(message(nested(refused)), queue.name)


def dollar_tables(levels: int) -> bytes:
    """A headers table of `levels` tables, each the only value of a key starting with `$` (the
    export wraps each as `{"$table": …}`, two JSON levels for one)."""
    inner = b"\x00\x00\x00\x00"
    for _ in range(levels):
        entry = b"\x02$xF" + inner
        inner = len(entry).to_bytes(4, "big") + entry
    return inner


@pytest.mark.parametrize("levels", [1, 63, 64, 65, 1200, 21_000])
def test_deep_headers_decode_without_recursion_and_travel_byte_for_byte(levels: int) -> None:
    """Any depth a frame can carry decodes at the default recursion limit, re-encodes to the
    same bytes, and goes through the dlq export format (orjson stops at 254 levels) and back."""
    raw = dollar_tables(levels)
    consumed, headers = pamqp.decode.field_table(raw)
    assert consumed == len(raw)
    assert pamqp.encode.field_table(headers) == raw
    assert len(repr(headers)) < 1024  # what is left packed is shown short
    line = encode_line(ExportedMessage(b"{}", {"headers": headers}))
    assert pamqp.encode.field_table(decode_line(line, number=1).headers) == raw


def test_a_packed_value_that_is_not_one_well_formed_table_is_refused_on_import() -> None:
    """An export's `$amqp` value is checked before anything is published: a length that runs
    past the value, or an unknown type inside, is a bad record, not a broken connection."""
    for raw in (b"F\x00\x00\x00\x05\x00V", b"A\x00\x00\x00\x01Q", b"S\x00\x00\x00\x00"):
        content = base64.b64encode(raw).decode()
        line = orjson.dumps(
            {
                "format": FORMAT,
                "body_base64": "",
                "properties": {"headers": {"d": {"$amqp": content}}},
            }
        )
        with pytest.raises(ConfigError, match="not a dead-letter export record"):
            decode_line(line, number=1)


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


OUR_COUNT_HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "delivery-attempts": st.one_of(st.integers(-2, 2_000_000), st.booleans(), st.text()),
        "first-attempt-at": st.sampled_from(
            ["2000-01-01T00:00:00Z", "2999-01-01T00:00:00Z", "not a time", ""]
        ),
        "x-other": st.text(max_size=5),
    },
)


@given(st.none() | OUR_COUNT_HEADERS, st.sampled_from(["", "events"]))
@example({"delivery-attempts": 3, "first-attempt-at": "2000-01-01T00:00:00Z"}, "")  # trusted: 3
@example({"delivery-attempts": 3, "first-attempt-at": "2000-01-01T00:00:00Z"}, "events")  # 0
def test_the_fast_attempt_count_is_the_trusted_headers_count(
    headers: dict[str, Any] | None, exchange: str
) -> None:
    """`trusted_attempts` skips copying the headers when there is no count: it must say what
    `attempts_made(trusted_headers(...))` says, for every header set and either route."""
    message: Any = type("Message", (), {"headers": headers, "exchange": exchange})()
    expected = attempts_made(trusted_headers(message, datetime.now(UTC)))
    assert trusted_attempts(message) == expected
