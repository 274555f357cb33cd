"""A hostile Vercel and hostile identities, against a real worker on the real broker.

The simulator's faults answer with any status from 100 to 599, redirects, any `Retry-After` and
`X-RateLimit-*` values (numbers, dates, garbage, huge, non-ASCII digits), slow answers, bodies
trickling after the status line, bodies cut short, dropped connections and bytes that are not
HTTP. The invariant, for every event: it is delivered only after a 2xx from the Create Event
URL itself, or else it is dead-lettered with a reason (a retry ends in one of the two); the
worker keeps consuming, and `in_flight` returns to 0. Hostile identities (event, resource and
product ids with delimiters, control characters, Unicode, maximum lengths) reach Create Event
exactly, or are refused by the contract.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from consumer.errors import ContractError, PublishBatchError, Reason
from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.helpers import drain_queue, event, wait_for_dead_letters, wait_until

DEAD_REASONS = {reason.value for reason in Reason}


def logged(relay: Any, outcome: str) -> list[str]:
    """The event ids of the relay's log lines for `outcome` (delivered, retried, ...)."""
    ids = []
    # split("\n"), not splitlines(): an id's raw U+2028 or U+0085 is valid inside a JSON line
    for line in filter(None, relay.log_text().split("\n")):
        record = orjson.loads(line)
        if record.get("event") == outcome:
            ids.append(str(record.get("event_id")))
    return ids


def new_installation(sim: VercelSimulator, tokens_dir: Path) -> str:
    """A fresh installation, known to the simulator and in the tokens directory: a throttle or
    a block learned in one test case does not reach the next."""
    installation = f"icfg_{uuid.uuid4().hex[:10]}"
    token = f"tok_{uuid.uuid4().hex}"
    sim.set_token(installation, token)
    (tokens_dir / installation).write_text(token)
    return installation


DeadLetter = Callable[[], Awaitable[AbstractIncomingMessage]]


@pytest.fixture
def dead_letter(channel: AbstractChannel, names: dict[str, str]) -> DeadLetter:
    """Waits for the one dead letter a test expects in the relay's DLQ, and returns it."""

    async def one() -> AbstractIncomingMessage:
        [dead] = await wait_for_dead_letters(channel, names["queue"], 1, timeout=30)
        return dead

    return one


# ── known cases (issue 11) ───────────────────────────────────────────────────────────────────


async def test_absurd_retry_after_never_stalls_the_worker(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    tokens_dir: Path,
) -> None:
    """Case 4: six events answered 429 with a Retry-After of 309 digits (inf as a float) and a
    far-future date, with concurrency 4: the 100 events of a healthy installation are all
    delivered (the OverflowError used to leak every consumer slot), and in_flight returns to 0."""
    relay = await start_relay(concurrency=4, max_retry_age=3.0)
    stalled = new_installation(sim, tokens_dir)
    far = format_datetime(datetime(9999, 12, 31, tzinfo=UTC), usegmt=True)
    for retry_after in ("9" * 309, far):
        sim.add_fault(Fault(status=429, retry_after=retry_after, installation=stalled, times=3))
    for _ in range(6):
        await publisher.publish(event(installation_id=stalled))
    for n in range(100):
        await publisher.publish(event(resource_id=f"healthy_{n}"))
    await wait_until(lambda: len(sim.accepted) >= 100, timeout=30)
    await wait_until(lambda: relay.worker.in_flight == 0)
    assert "unexpected error" not in relay.log_text()
    assert relay.worker.consuming


async def test_a_redirect_to_a_page_that_answers_200_is_not_a_delivery(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """Case 5: a 302 to a page answering 200 is not `delivered`: the event is retried and
    delivered only when Create Event itself answers 201 (aiohttp used to follow the redirect
    as a GET and ack the 200)."""
    relay = await start_relay()
    assert sim.url is not None
    sim.add_fault(Fault(status=302, headers={"Location": f"{sim.url}/_sim/stats"}, times=1))
    body = event()
    await publisher.publish(body)
    await wait_until(lambda: len(sim.accepted) == 1)
    await wait_until(lambda: body["id"] in logged(relay, "delivered"))
    assert [refused.status for refused in sim.refused] == [302]
    assert logged(relay, "retried") == [body["id"]]
    assert logged(relay, "delivered") == [body["id"]]


@pytest.mark.parametrize("installation_id", [".", "..", "a%2Fb", "a/b", "icfg_é", "icfg\x01"])
async def test_installation_ids_that_could_leave_the_path_are_invalid_messages(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    dead_letter: DeadLetter,
    installation_id: str,
) -> None:
    """Case 6: with a fallback token set, an installation id `.`, `..`, with a slash, a percent
    sign, non-ASCII or a control character is dead-lettered as invalid_message and no request
    leaves for Vercel (`POST /v1/installations/../events` used to go out with the fallback)."""
    await start_relay(vercel_token="tok_fallback")
    await publisher.publish(event(installation_id=installation_id), validate=False)
    dead = await dead_letter()
    assert dead.headers["dead-letter-reason"] == "invalid_message"
    assert "installation_id" in str(dead.headers["dead-letter-detail"])
    assert sim.requests == 0


async def test_a_broken_token_file_is_dead_lettered_never_sent_the_fallback(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    dead_letter: DeadLetter,
    tokens_dir: Path,
) -> None:
    """Token store: an installation whose token file starts with a byte-order mark is
    dead-lettered as no_credentials saying so; the fallback token is never sent for it."""
    await start_relay(vercel_token="tok_fallback")
    (tokens_dir / "icfg_bom").write_bytes(b"\xef\xbb\xbftok_bom")
    await publisher.publish(event(installation_id="icfg_bom"))
    dead = await dead_letter()
    assert dead.headers["dead-letter-reason"] == "no_credentials"
    assert "byte-order mark" in str(dead.headers["dead-letter-detail"])
    assert sim.requests == 0


# ── hostile identities, end to end ───────────────────────────────────────────────────────────

# Event ids up to the 255 bytes of an AMQP message_id, with path delimiters, percent signs,
# control characters (C0, DEL, C1, U+2028), bidi overrides and non-ASCII.
HOSTILE_EVENT_IDS = [
    "\x1b[2J\n\x00\r",
    "../../v2/x?y=1#z",
    "%2e%2e/%2F",
    "\u202e\u2028\x85\x7f\x9b",
    "中" * 85,  # 255 bytes
    "é" * 127 + "a",  # 255 bytes
    "a" * 255,
]


async def test_hostile_ids_reach_create_event_exactly_and_log_one_line_each(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """Valid events whose event, resource and product ids hold delimiters, control characters,
    Unicode and maximum lengths: each is delivered once, to its installation's one-segment
    path, its body carrying exactly its resource and product ids; the worker's JSON log stays
    one record per line and names each event id exactly."""
    relay = await start_relay()
    wanted = {}
    for n, hostile in enumerate(HOSTILE_EVENT_IDS):
        resource_id = (hostile + str(n))[-256:]  # distinct: never coalesced
        wanted[resource_id] = hostile
        await publisher.publish(event(id=hostile, resource_id=resource_id, product_id=hostile))
    await wait_until(lambda: len(sim.accepted) >= len(wanted), timeout=30)
    await wait_until(lambda: relay.worker.in_flight == 0)
    assert sorted(entry.event["resourceId"] for entry in sim.accepted) == sorted(wanted)
    for entry in sim.accepted:
        assert entry.installation_id == "icfg_alpha"
        assert entry.event["productId"] == wanted[entry.event["resourceId"]]
    log = relay.logs.getvalue()
    assert not any(byte < 0x20 for byte in log.replace(b"\n", b""))
    assert sorted(logged(relay, "delivered")) == sorted(HOSTILE_EVENT_IDS)


@pytest.mark.parametrize("event_id", ["a" * 256, "中" * 86, "é" * 128])
async def test_an_id_longer_than_a_message_id_is_a_contract_error_even_unvalidated(
    start_relay: Any, publisher: EventPublisher, event_id: str
) -> None:
    """An event id over 255 bytes in UTF-8 cannot be an AMQP message_id: the contract refuses
    it, and the publisher refuses it even with validate=False (aiormq raised TypeError from
    inside the publish, which escaped publish_many and wedged the outbox relay on the row)."""
    await start_relay()  # its queue makes the valid event of the batch routable
    with pytest.raises(ContractError, match="at most 255"):
        await publisher.publish(event(id=event_id))
    with pytest.raises(ContractError, match="at most 255"):
        await publisher.publish(event(id=event_id), validate=False)
    ok = event()
    with pytest.raises(PublishBatchError) as batch:
        await publisher.publish_many([event(id=event_id), ok], validate=False)
    assert batch.value.confirmed == [ok["id"]]
    [(failed_id, error)] = batch.value.failures
    assert failed_id == event_id
    assert isinstance(error, ContractError)


# ── a body that trickles after the status line ───────────────────────────────────────────────


async def test_a_2xx_whose_body_trickles_past_the_timeout_is_delivered_once(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """A 201 whose status line and headers come at once and whose body then takes 4 s, twice
    CONSUMER_HTTP_TIMEOUT: Vercel created the event when it said 201, so it is delivered, not
    retried (a retry would create it twice); the slot is freed and the next event goes through."""
    relay = await start_relay(http_timeout=2.0)
    sim.add_fault(Fault(status=201, body=b'{"ok": true, "pad": "......"}', trickle=0.15, times=1))
    slow, after = event(), event()
    await publisher.publish(slow)
    await wait_until(lambda: slow["id"] in logged(relay, "delivered"), timeout=20)
    await publisher.publish(after)
    await wait_until(lambda: len(sim.accepted) == 1, timeout=20)
    assert [refused.status for refused in sim.refused] == [201]
    assert sim.accepted[0].event["resourceId"] == after["resource_id"]
    assert logged(relay, "retried") == []
    assert sorted(logged(relay, "delivered")) == sorted([slow["id"], after["id"]])
    await wait_until(lambda: relay.worker.in_flight == 0)
    assert relay.worker.consuming


@pytest.mark.parametrize("trickle", [0.01, 0.15], ids=["within-timeout", "past-timeout"])
async def test_a_5xx_whose_body_trickles_is_retried_then_delivered(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher, trickle: float
) -> None:
    """A 503 whose body trickles in (all of it within CONSUMER_HTTP_TIMEOUT, or not): never
    delivered on it; retried, then delivered once Create Event itself answers 201."""
    relay = await start_relay(http_timeout=2.0)
    sim.add_fault(Fault(status=503, trickle=trickle, times=1))
    body = event()
    await publisher.publish(body)
    await wait_until(lambda: body["id"] in logged(relay, "delivered"), timeout=20)
    assert [refused.status for refused in sim.refused] == [503]
    assert [entry.event["resourceId"] for entry in sim.accepted] == [body["resource_id"]]
    assert logged(relay, "retried") == [body["id"]]
    assert logged(relay, "delivered") == [body["id"]]
    await wait_until(lambda: relay.worker.in_flight == 0)
    assert relay.worker.consuming


# ── a hostile Vercel, generated ──────────────────────────────────────────────────────────────

HEADER_TEXT = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=30)
NUMBERS = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.integers(0, 400).map(lambda digits: "9" * digits),
    st.sampled_from(["²", "\uff11\uff10", "٣", "1e9", "inf", "nan", "-0", " 5 ", "0x10", "1.5"]),
)
DATES = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(9999, 1, 1)).map(
    lambda when: format_datetime(when.replace(tzinfo=UTC), usegmt=True)
)
HEADER_VALUES = NUMBERS | DATES | HEADER_TEXT
RATE_HEADER_NAMES = (
    "Retry-After",
    "X-RateLimit-Limit",
    "X-RateLimit-Remaining",
    "X-RateLimit-Reset",
)
RATE_HEADERS = st.fixed_dictionaries(
    {},
    optional=dict.fromkeys(RATE_HEADER_NAMES, HEADER_VALUES),
)
STATUSES = st.integers(100, 599) | st.sampled_from([200, 201, 204, 301, 302, 307, 308, 429, 503])
REDIRECT_TARGETS = st.sampled_from(["/_sim/stats", "/v1/installations/icfg_alpha/events", ""])


def _answer(
    status: int, headers: dict[str, str], target: str, body: bytes | None
) -> Callable[[str], Fault]:
    def make(sim_url: str) -> Fault:
        extra = dict(headers)
        if 300 <= status < 400 and target:
            extra["Location"] = f"{sim_url}{target}"
        return Fault(status=status, headers=extra, body=body, times=1)

    return make


ANSWERS: st.SearchStrategy[Callable[[str], Fault]] = st.one_of(
    st.builds(
        _answer, STATUSES, RATE_HEADERS, REDIRECT_TARGETS, st.none() | st.binary(max_size=50)
    ),
    st.just(lambda _: Fault(drop=True, times=1)),
    st.just(lambda _: Fault(garbage=True, times=1)),
    STATUSES.map(lambda status: lambda _: Fault(status=status, truncate=True, times=1)),
    st.floats(0.0, 1.5).map(lambda seconds: lambda _: Fault(latency=seconds, times=1)),
    st.builds(
        lambda status, every: lambda _: Fault(status=status, trickle=every, times=1),
        st.sampled_from([200, 201, 202, 400, 404, 429, 500, 503]),
        st.floats(0.005, 0.05),  # Vercel's error shape, ~80 bytes: 0.4 to 4 s
    ),
)


@pytest.fixture
async def relay(start_relay: Any) -> Any:
    """One worker for every generated example; retries give up after 4 s."""
    return await start_relay(max_retry_age=4.0, http_timeout=1.0)


@settings(
    max_examples=12,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # shrinking would wait for minutes
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@example(answers=[_answer(302, {}, "/_sim/stats", None)])  # a GET there answers 200
@example(answers=[_answer(429, {"Retry-After": "9" * 309}, "", None)])
@example(answers=[_answer(201, {"X-RateLimit-Remaining": "²", "X-RateLimit-Reset": "1"}, "", b"")])
@example(answers=[lambda _: Fault(status=201, trickle=0.03, times=1)])  # body past the timeout
@example(answers=[lambda _: Fault(status=503, trickle=0.03, times=1)])
@given(answers=st.lists(ANSWERS, min_size=1, max_size=5))
async def test_whatever_vercel_answers_each_event_ends_delivered_only_after_a_2xx(
    relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
    tokens_dir: Path,
    answers: list[Callable[[str], Fault]],
) -> None:
    """Each of a few events meets one generated answer (then Vercel behaves): every event ends
    delivered, only with a 2xx from Create Event itself on record for it, or dead-lettered
    with a reason from the vocabulary; the worker keeps consuming and in_flight returns to 0."""
    assert sim.url is not None
    sim.clear_faults()
    installation = new_installation(sim, tokens_dir)
    for make in answers:
        sim.add_fault(make(sim.url))
    ids = {f"hostile_{uuid.uuid4().hex[:12]}" for _ in answers}
    for hid in ids:
        await publisher.publish(event(id=hid, resource_id=hid, installation_id=installation))
    dead: dict[str, Any] = {}

    async def all_ended() -> bool:
        for message in await drain_queue(channel, f"{names['queue']}.dlq"):
            dead[str(message.message_id)] = message
        return ids <= set(logged(relay, "delivered")) | set(dead)

    await wait_until(all_ended, timeout=30, interval=0.1)
    created = {str(entry.event.get("resourceId")) for entry in sim.accepted}
    two_xx = {
        str((refused.event or {}).get("resourceId"))
        for refused in sim.refused
        if 200 <= refused.status < 300
    }
    for hid in ids & set(logged(relay, "delivered")):
        assert hid in created | two_xx, f"{hid} delivered without a 2xx from Create Event"
    for hid in ids & set(dead):
        headers = dead[hid].headers
        assert headers["dead-letter-reason"] in DEAD_REASONS
        assert headers["dead-letter-detail"]
    await wait_until(lambda: relay.worker.in_flight == 0)
    assert relay.worker.consuming or relay.worker.readiness()[1].get("reason") == "circuit_open"
    assert not relay.task.done()
    assert "unexpected error" not in relay.log_text()


async def test_a_message_only_ever_deferred_still_ages_out(
    tokens_dir: Path,
    sim: VercelSimulator,
    start_relay: Any,
    dead_letter: DeadLetter,
    publisher: EventPublisher,
) -> None:
    """An installation blocked for the capped hour (a 429 with a huge Retry-After): its event
    is deferred without spending attempts, and still dead-lettered as retries_exhausted once
    CONSUMER_MAX_RETRY_AGE has passed (its first-attempt-at was dropped as untrusted while its
    attempt count was 0, so it never aged and cycled through the tiers for good)."""
    await start_relay(max_retry_age=2.0)
    blocked = new_installation(sim, tokens_dir)
    sim.add_fault(Fault(status=429, retry_after="9" * 20, installation=blocked, times=1))
    await publisher.publish(event(installation_id=blocked))
    dead = await dead_letter()
    assert dead.headers["dead-letter-reason"] == "retries_exhausted"
    assert dead.headers["delivery-attempts"] in (0, 1)  # no attempt spent on a deferral
