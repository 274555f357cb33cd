"""Poison and hostile input: whatever a publisher sends, the worker ends each message with an
outcome (delivered, or dead-lettered with a reason) and keeps going.

Other AMQP clients may send header strings that are not UTF-8, which pamqp decodes to bytes
that it cannot encode again, and headers close to the frame size. To publish such messages
from Python, `raw_strings()` lets pamqp encode byte strings as they are, only inside the
publishing task (a context variable), so the worker in this process still encodes like
production. (Non-UTF-8 bytes in a short-string property or a header name are another matter:
pamqp cannot even decode that frame, and aiormq closes the channel; see docs/operations.md.)
"""

from __future__ import annotations

import asyncio
import contextvars
import struct
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import orjson
import pamqp.encode
import pytest
from aio_pika.abc import AbstractChannel
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from consumer.contract import example_event, parse_event
from consumer.errors import ContractError
from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.helpers import AMQP_URL, drain_queue, wait_for_dead_letters, wait_until

RAW = contextvars.ContextVar("RAW", default=False)
MAX_BODY = 8192  # the relay's CONSUMER_MAX_BODY_BYTES in these tests
ID_HEADER = "hostile-id"


@pytest.fixture(autouse=True)
def raw_strings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let pamqp encode bytes as AMQP strings byte for byte, while RAW is set in the context."""
    string, table_value = pamqp.encode._string, pamqp.encode.encode_table_value

    def raw_string(encoder: struct.Struct, value: Any) -> bytes:
        if RAW.get() and isinstance(value, bytes):
            return encoder.pack(len(value)) + value
        return string(encoder, value)

    def raw_table_value(value: Any) -> bytes:
        if RAW.get() and isinstance(value, bytes):
            return b"S" + raw_string(struct.Struct(">I"), value)
        return table_value(value)

    monkeypatch.setattr(pamqp.encode, "_string", raw_string)
    monkeypatch.setattr(pamqp.encode, "encode_table_value", raw_table_value)


def hostile_message(
    body: bytes, *, headers: dict[str, Any] | None = None, **properties: Any
) -> aio_pika.Message:
    return aio_pika.Message(body, headers=headers or {}, **properties)


async def publish_raw(
    channel: AbstractChannel, exchange: str, messages: list[aio_pika.Message]
) -> None:
    """Publish with confirms, byte strings encoded as they are (in a task of its own)."""

    async def publish() -> None:
        RAW.set(True)
        target = await channel.get_exchange(exchange)
        for message in messages:
            await target.publish(message, routing_key="resource.hostile")

    await asyncio.create_task(publish())


def good_body(hostile_id: str, installation: str = "icfg_alpha", **fields: Any) -> bytes:
    """A valid event whose id and resource id are `hostile_id` (how the simulator names it)."""
    event = example_event(
        "resource.hostile", id=hostile_id, resource_id=hostile_id, installation_id=installation
    )
    return orjson.dumps({**event, **fields})


def is_valid(body: bytes) -> bool:
    try:
        parse_event(body, max_bytes=MAX_BODY)
    except ContractError:
        return False
    return True


@pytest.fixture
async def relay(start_relay: Callable[..., Awaitable[Any]]) -> Any:
    """One running worker for the whole test (all hypothesis examples)."""
    return await start_relay(max_body_bytes=MAX_BODY, concurrency=16, retry_delays=(0.05,))


@pytest.fixture
async def pub_channel() -> AsyncIterator[AbstractChannel]:
    async with await aio_pika.connect(AMQP_URL) as connection:
        yield await connection.channel(publisher_confirms=True)


class Outcomes:
    """Waits for each hostile id to be delivered (simulator) or dead-lettered (DLQ)."""

    def __init__(self, sim: VercelSimulator, channel: AbstractChannel, queue: str) -> None:
        self.sim = sim
        self.channel = channel
        self.dlq = f"{queue}.dlq"
        self.dead: dict[str, aio_pika.abc.AbstractIncomingMessage] = {}

    def delivered(self) -> set[str]:
        return {str(a.event.get("resourceId")) for a in self.sim.accepted}

    async def wait(self, ids: set[str], timeout: float = 20) -> None:  # noqa: ASYNC109
        async def all_done() -> bool:
            for message in await drain_queue(self.channel, self.dlq):
                self.dead[str((message.headers or {}).get(ID_HEADER))] = message
            return ids <= self.delivered() | set(self.dead)

        try:
            await wait_until(all_done, timeout=timeout, interval=0.05)
        except AssertionError:
            missing = ids - self.delivered() - set(self.dead)
            raise AssertionError(f"{len(missing)} of {len(ids)} without an outcome") from None


@pytest.fixture
async def outcomes(
    sim: VercelSimulator, channel: AbstractChannel, names: dict[str, str]
) -> Outcomes:
    return Outcomes(sim, channel, names["queue"])


def new_id() -> str:
    return f"hostile_{uuid.uuid4().hex}"


# ── known cases ──────────────────────────────────────────────────────────────────────────────


async def test_strings_that_are_not_utf8_survive_into_the_dead_letter(
    relay: Any, pub_channel: AbstractChannel, outcomes: Outcomes, names: dict[str, str]
) -> None:
    """Header strings that are not UTF-8 (bytes to pamqp, which cannot send bytes) no longer
    keep a message in a hand-back loop: the dead letter carries them as the same bytes."""
    hostile_id = new_id()
    message = hostile_message(
        b"not json",
        headers={ID_HEADER: hostile_id, "blob": b"\xff\xfe ok", "nested": [{"x": b"\xc3("}]},
        message_id="id-1",
    )
    await publish_raw(pub_channel, names["exchange"], [message])
    await outcomes.wait({hostile_id})
    dead = outcomes.dead[hostile_id]
    assert dead.headers["dead-letter-reason"] == "invalid_message"
    assert dead.headers["blob"] == bytearray(b"\xff\xfe ok")
    assert dead.headers["nested"] == [{"x": bytearray(b"\xc3(")}]
    assert dead.message_id == "id-1"
    assert "could not republish" not in relay.log_text()


async def test_a_good_event_with_undecodable_headers_is_retried_and_delivered(
    relay: Any,
    sim: VercelSimulator,
    pub_channel: AbstractChannel,
    outcomes: Outcomes,
    names: dict[str, str],
) -> None:
    """The retry copy of a valid event with non-UTF-8 headers can be published too: after a
    503 the event comes back and is delivered."""
    hostile_id = new_id()
    sim.add_fault(Fault(status=503, times=1))
    message = hostile_message(good_body(hostile_id), headers={"blob": b"\xff", "list": [b"\x80"]})
    await publish_raw(pub_channel, names["exchange"], [message])
    await outcomes.wait({hostile_id})
    assert hostile_id in outcomes.delivered()
    assert sim.requests == 2
    assert "could not republish" not in relay.log_text()


async def test_headers_too_large_to_copy_are_dropped_not_looped_on(
    relay: Any,
    sim: VercelSimulator,
    pub_channel: AbstractChannel,
    outcomes: Outcomes,
    names: dict[str, str],
) -> None:
    """Headers that fit the frame on the way in but not next to our dead-letter headers used to
    make the broker close the worker's connection on every attempt. Now the largest headers are
    dropped and named in `dropped-headers`, for dead letters and retries alike."""
    bad_id, good_id = new_id(), new_id()
    huge = {"big": "x" * 129_000, "small": "kept"}
    sim.add_fault(Fault(status=503, times=1))
    messages = [
        hostile_message(b"{}", headers={**huge, ID_HEADER: bad_id}),
        hostile_message(good_body(good_id), headers=huge),
    ]
    await publish_raw(pub_channel, names["exchange"], messages)
    await outcomes.wait({bad_id, good_id})
    dead = outcomes.dead[bad_id]
    assert dead.headers["dead-letter-reason"] == "invalid_message"
    assert dead.headers["dropped-headers"] == "big"
    assert dead.headers["small"] == "kept"
    assert "big" not in dead.headers
    assert good_id in outcomes.delivered()
    assert "broker unavailable" not in relay.log_text()


async def test_a_publishers_x_delivery_count_is_not_taken_for_redeliveries(
    relay: Any, pub_channel: AbstractChannel, outcomes: Outcomes, names: dict[str, str]
) -> None:
    """A first delivery carries whatever `x-delivery-count` its publisher set (the broker sets
    its own only on redeliveries): a valid event with a forged count is delivered, an invalid
    one is invalid_message, neither is taken for a crash loop (redelivery_limit)."""
    good_id, bad_id = new_id(), new_id()
    forged = {"x-delivery-count": 1_000_000}
    messages = [
        hostile_message(good_body(good_id), headers=forged),
        hostile_message(b"{}", headers={**forged, ID_HEADER: bad_id}),
    ]
    await publish_raw(pub_channel, names["exchange"], messages)
    await outcomes.wait({good_id, bad_id})
    assert good_id in outcomes.delivered()
    assert outcomes.dead[bad_id].headers["dead-letter-reason"] == "invalid_message"


async def test_ten_megabyte_bodies_are_dead_lettered_while_good_ones_flow(
    start_relay: Callable[..., Awaitable[Any]],
    pub_channel: AbstractChannel,
    outcomes: Outcomes,
    names: dict[str, str],
) -> None:
    """10 MB bodies (above the default 256 KiB limit) are dead-lettered as invalid_message,
    byte for byte, while the valid events published between them are delivered."""
    await start_relay()  # the default CONSUMER_MAX_BODY_BYTES
    big_ids = [new_id() for _ in range(3)]
    good_ids = [new_id() for _ in range(30)]
    bodies = {hid: good_body(hid, data={"blob": "y" * 10_000_000}) for hid in big_ids}
    messages = [hostile_message(good_body(hid)) for hid in good_ids]
    for n, hid in enumerate(big_ids):
        messages.insert(n * 10, hostile_message(bodies[hid], headers={ID_HEADER: hid}))
    await publish_raw(pub_channel, names["exchange"], messages)
    await outcomes.wait(set(big_ids) | set(good_ids))
    assert set(good_ids) <= outcomes.delivered()
    for hid in big_ids:
        dead = outcomes.dead[hid]
        assert dead.headers["dead-letter-reason"] == "invalid_message"
        assert "262144" in str(dead.headers["dead-letter-detail"])
        assert dead.body == bodies[hid]


# ── generated cases ──────────────────────────────────────────────────────────────────────────

NOT_UTF8 = st.binary(max_size=30).map(lambda tail: b"\xff" + tail)
SHORT_TEXT = st.text(max_size=60)
KEYS = st.one_of(
    st.text(min_size=1, max_size=30),
    st.sampled_from(
        [
            "delivery-attempts",
            "first-attempt-at",
            "original-exchange",
            "x-death",
            "dead-letter-reason",
            "last-error",
            "x-delivery-count",
        ]
    ),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(width=32, allow_nan=False, allow_infinity=False),  # RabbitMQ refuses NaN, inf
    st.text(max_size=80),
    NOT_UTF8,
    st.binary(max_size=40).map(bytearray),
    st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
    ),
    st.decimals(min_value=-1000, max_value=1000, places=2),
)
HEADER_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=12,
)
HUGE = st.integers(50_000, 120_000).map(lambda size: "h" * size)
HEADERS = st.dictionaries(KEYS, HEADER_VALUES, max_size=6) | st.builds(
    lambda small, huge: {**small, "huge": huge}, st.dictionaries(KEYS, SCALARS, max_size=3), HUGE
)
TEXT_PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        name: st.none() | SHORT_TEXT
        for name in (
            "content_type",
            "content_encoding",
            "message_id",
            "correlation_id",
            "type",
            "app_id",
            "reply_to",
        )
    },
)
PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "priority": st.integers(0, 255),
        "delivery_mode": st.sampled_from([1, 2]),
        "timestamp": st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1)),
    },
)
JSON_SCALARS = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
JSON = st.recursive(
    JSON_SCALARS | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(SHORT_TEXT, inner, max_size=4),
    max_leaves=10,
)
NOT_A_STRING = JSON_SCALARS | st.lists(JSON, max_size=3) | st.dictionaries(SHORT_TEXT, JSON)
NOT_AN_OBJECT = JSON_SCALARS | st.text(max_size=20) | st.lists(JSON, max_size=4)
FIELDS = ("id", "type", "occurred_at", "installation_id", "resource_id", "product_id", "data")
BodyMaker = Callable[[str], bytes]  # the message's hostile id → its body


def _nested(depth: int, objects: bool) -> BodyMaker:
    if objects:
        return lambda _: b'{"a":' * depth + b"1" + b"}" * depth
    return lambda _: b"[" * depth + b"]" * depth


def _without(field: str) -> BodyMaker:
    return lambda hid: orjson.dumps(
        {k: v for k, v in orjson.loads(good_body(hid)).items() if k != field}
    )


BAD_BODIES: st.SearchStrategy[BodyMaker] = st.one_of(
    st.binary(max_size=300).map(lambda raw: lambda _: raw),
    NOT_UTF8.map(lambda bad: lambda hid: good_body(hid)[:-1] + b', "x": "' + bad + b'"}'),
    st.builds(_nested, st.integers(1, 200_000), st.booleans()),
    st.builds(
        lambda field, value: lambda hid: good_body(hid, **{field: value}),
        st.sampled_from(FIELDS),
        NOT_A_STRING,
    ),
    st.sampled_from(FIELDS[:5]).map(_without),
    st.integers(MAX_BODY, 3 * MAX_BODY).map(
        lambda size: lambda hid: good_body(hid, data={"blob": "z" * size})
    ),
    NOT_AN_OBJECT.map(lambda value: lambda _: orjson.dumps(value)),
    SHORT_TEXT.map(lambda kind: lambda hid: good_body(hid, type=kind)),
)
GOOD_BODIES: st.SearchStrategy[BodyMaker] = st.dictionaries(SHORT_TEXT, JSON, max_size=4).map(
    lambda data: lambda hid: good_body(hid, data=data)
)
HOSTILE = st.tuples(BAD_BODIES | GOOD_BODIES, HEADERS, TEXT_PROPERTIES, PROPERTIES)


@pytest.fixture
def tally() -> Iterator[Counter[str]]:
    """Counts what the generated test published over all its examples, printed at the end."""
    counts: Counter[str] = Counter()
    yield counts
    print(f"hostile input: {dict(counts)} over {counts['examples']} examples")


@settings(
    max_examples=100,
    deadline=None,
    # A failing example waits for outcomes that never come: shrinking would take many minutes.
    # The failure names the ids still missing instead.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(batch=st.lists(HOSTILE, min_size=15, max_size=40))
async def test_hostile_messages_end_as_dead_letters_and_good_ones_arrive(
    relay: Any,
    pub_channel: AbstractChannel,
    outcomes: Outcomes,
    names: dict[str, str],
    tally: Counter[str],
    batch: list[tuple[BodyMaker, dict[str, Any], dict[str, Any], dict[str, Any]]],
) -> None:
    """Thousands of generated messages (random bytes, bodies that are not UTF-8, nesting 200,000
    deep, fields of the wrong type or missing, oversized bodies, non-objects, unknown types;
    header values of every AMQP type, header strings that are not UTF-8, headers of up to
    120 KB, our own header names with wrong types; odd or missing properties), and a plain
    valid event after every two: each invalid one is dead-lettered as invalid_message, each
    valid one is delivered, and the worker neither stops nor hands a message back."""
    messages, expected_dead, expected_delivered = [], set(), set()
    for n, (make_body, headers, texts, properties) in enumerate(batch):
        hid = new_id()
        body = make_body(hid)
        messages.append(
            hostile_message(body, headers={**headers, ID_HEADER: hid}, **texts, **properties)
        )
        (expected_delivered if is_valid(body) else expected_dead).add(hid)
        if n % 2:
            plain = new_id()
            messages.append(hostile_message(good_body(plain, installation="icfg_beta")))
            expected_delivered.add(plain)
    await publish_raw(pub_channel, names["exchange"], messages)
    tally.update(examples=1, dead_lettered=len(expected_dead), delivered=len(expected_delivered))
    await outcomes.wait(expected_dead | expected_delivered)
    assert expected_delivered <= outcomes.delivered()
    for hid in expected_dead:
        dead = outcomes.dead[hid]
        assert dead.headers["dead-letter-reason"] == "invalid_message", dead.headers
    assert not relay.task.done()
    assert "could not republish" not in relay.log_text()
    assert "broker unavailable" not in relay.log_text()


async def test_the_brokers_own_count_still_stops_a_crash_loop(
    start_relay: Callable[..., Awaitable[Any]],
    pub_channel: AbstractChannel,
    channel: AbstractChannel,
    outcomes: Outcomes,
    names: dict[str, str],
) -> None:
    """The other side of the test above: a message the broker really redelivered more than
    CONSUMER_MAX_REDELIVERIES times is dead-lettered as redelivery_limit, unprocessed."""
    relay = await start_relay(max_redeliveries=3)
    await relay.shutdown()  # declared; now hand the message back by hand, as dying workers do
    hostile_id = new_id()
    await publish_raw(pub_channel, names["exchange"], [hostile_message(good_body(hostile_id))])
    queue = await channel.get_queue(names["queue"])
    for _ in range(4):
        message = await queue.get(timeout=10)
        await message.nack(requeue=True)
    await start_relay(max_redeliveries=3)
    dead = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead[0].headers["dead-letter-reason"] == "redelivery_limit"
    assert hostile_id not in outcomes.delivered()
