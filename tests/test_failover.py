"""Several broker URLs (failover), the reconnect backoff, and one log line per outage."""

from __future__ import annotations

import asyncio
import io
import logging
import random
import uuid
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.amqpurl import broker_address, list_problem, split_urls, with_tls
from consumer.backoff import Backoff
from consumer.errors import BrokerError, ConfigError
from consumer.logs import configure_logging
from consumer.settings import load_settings
from consumer.testing.vercel_sim import VercelSimulator
from consumer.topology import Connector, connect
from tests.brokers import PrivateBroker
from tests.chaos import CHAOS_TOKENS, Scenario
from tests.helpers import AMQP_URL

# Passwords as operators type them: commas, at-signs and colons included, never a scheme.
PASSWORDS = st.text(
    alphabet=st.characters(
        whitelist_categories=("Ll", "Lu", "Nd"), whitelist_characters=",@:;!*-_."
    ),
    min_size=1,
    max_size=20,
).filter(lambda p: "://" not in p)


@given(st.lists(st.tuples(PASSWORDS, st.integers(1, 65535)), min_size=1, max_size=4))
def test_a_list_splits_into_its_urls_whatever_the_passwords(
    nodes: list[tuple[str, int]],
) -> None:
    """A comma inside a password never splits the list: only `,scheme://` does."""
    urls = [f"amqp://user:{password}@node{i}:{port}/" for i, (password, port) in enumerate(nodes)]
    assert split_urls(" , ".join(urls)) == tuple(urls)


@given(PASSWORDS)
def test_a_bad_url_is_named_by_its_position_never_by_its_password(password: str) -> None:
    """The second URL of two has no host: the error says so without repeating either URL."""
    password = f"Zq9{password}"  # distinctive: a one-letter password is in any sentence
    value = f"amqp://u:{password}@node1:5672/,amqp://u:{password}@/"
    problem = list_problem(value)
    assert problem is not None
    assert problem.startswith("URL 2 of 2 ")
    assert password not in problem


def test_one_url_keeps_working_and_a_list_is_checked_url_by_url() -> None:
    """A single URL is a list of one; each URL of a list is checked; addresses name them all."""
    assert split_urls("amqp://guest:guest@localhost:5672/") == (
        "amqp://guest:guest@localhost:5672/",
    )
    assert list_problem("amqp://a/,amqps://b:5671/") is None
    assert (
        list_problem("amqp://a/,http://b/")
        == "URL 2 of 2 must be an amqp:// or amqps:// URL with a host"
    )
    assert list_problem(" ") == "give at least one amqp:// or amqps:// URL"
    assert broker_address("amqp://u:p@a/,amqps://u:p@b/") == "a:5672, b:5671"


def test_the_setting_rejects_a_bad_list_in_one_sentence_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """CONSUMER_AMQP_URL with a broken second URL: one sentence naming the variable."""
    monkeypatch.setenv("CONSUMER_AMQP_URL", "amqp://u:hunter2@a/,amqp://u:hunter2@b:99999/")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert "CONSUMER_AMQP_URL" in str(caught.value)
    assert "URL 2 of 2" in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_the_redacted_form_masks_every_password(monkeypatch: pytest.MonkeyPatch) -> None:
    """The `starting` line's URL list shows every node, no password."""
    monkeypatch.setenv("CONSUMER_AMQP_URL", "amqp://u:s3cr3t@a/,amqps://v:t0p,s3cr3t@b/")
    redacted = load_settings().amqp_url_redacted
    assert redacted == "amqp://u:***@a/,amqps://v:***@b/"


def test_tls_files_go_to_every_amqps_url_that_names_none(tmp_path: Path) -> None:
    """CONSUMER_AMQP_CAFILE reaches each amqps:// URL; a URL's own cafile wins; amqp:// URLs
    are left alone."""
    value = "amqps://a/,amqps://b/?cafile=/own.pem,amqp://c/"
    assert with_tls(value, {"cafile": "/ca.pem"}) == (
        "amqps://a/?cafile=/ca.pem,amqps://b/?cafile=/own.pem,amqp://c/"
    )


# -- the backoff ----------------------------------------------------------------------------


@given(st.integers(0, 2**32), st.floats(0.1, 120))
def test_the_worker_idles_at_most_the_cap_after_the_broker_is_back(
    seed: int, outage: float
) -> None:
    """Whatever the outage's length and the draws, the first attempt after the broker returns
    comes at most `cap` seconds later (the old doubling backoff idled 18.5 s after a 12 s
    outage); the first attempt after a loss is immediate."""
    backoff = Backoff(rng=random.Random(seed))
    now = 0.0
    delays = []
    while now < outage:  # each attempt fails while the broker is away
        delays.append(backoff.next_delay())
        now += delays[-1]
    assert delays[0] == 0.0
    assert all(0.0 <= delay <= backoff.cap for delay in delays)
    assert now - outage <= backoff.cap


@given(st.integers(0, 2**32))
def test_two_workers_do_not_retry_in_lock_step(seed: int) -> None:
    """Jitter: two workers that lost the same node draw different waits."""
    first, second = Backoff(rng=random.Random(seed)), Backoff(rng=random.Random(seed + 1))
    waits = [(first.next_delay(), second.next_delay()) for _ in range(6)]
    assert any(a != b for a, b in waits[1:])


def test_a_reset_makes_the_next_attempt_immediate() -> None:
    backoff = Backoff(rng=random.Random(1))
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 0.0


# -- connecting through a list, on real brokers ----------------------------------------------


def _dead_url(free_port: int) -> str:
    return f"amqp://guest:hunter2@127.0.0.1:{free_port}/"


@pytest.mark.broker
async def test_the_connector_fails_over_to_the_next_url(free_port: int) -> None:
    """A list whose first broker is down connects to the second, at once; the next connect
    starts after the broker last reached."""
    connector = Connector(f"{_dead_url(free_port)},{AMQP_URL}")
    connection = await connector()
    try:
        assert not connection.is_closed
        assert connector.address == broker_address(AMQP_URL)
    finally:
        await connection.close()


async def test_when_every_broker_is_down_one_error_names_each_without_passwords(
    free_port: int,
) -> None:
    """Every URL failing gives one BrokerError naming each broker's address and failure."""
    with pytest.raises(BrokerError) as caught:
        await connect(f"{_dead_url(free_port)},{_dead_url(free_port)}")
    message = str(caught.value)
    assert message.count(f"connecting to 127.0.0.1:{free_port} failed") == 2
    assert "hunter2" not in message


async def test_an_outage_is_one_warning_and_one_line_when_it_is_over(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """The worker's broker restarts: its log holds one `broker unavailable` warning, one
    `broker reconnected after N s` line, and no line of the AMQP library at warning or error
    (its transport errors are folded into ours)."""
    async with (
        VercelSimulator(CHAOS_TOKENS) as sim,
        Scenario(private_broker.url, sim, tmp_path) as scenario,
    ):
        await scenario.publish(50)
        worker = scenario.worker()
        worker.start()
        await worker.wait_consuming()
        await asyncio.to_thread(private_broker.stop)
        await worker.wait_for("broker unavailable")
        await asyncio.sleep(3)  # several failed attempts meanwhile
        await asyncio.to_thread(private_broker.start)
        await worker.wait_consuming(sessions=2)
        await scenario.finish(f"restart, quiet logs {uuid.uuid4().hex[:4]}")
    lines = worker.events()
    assert sum(1 for e in lines if e.get("event") == "broker unavailable") == 1
    [back] = [e for e in lines if str(e.get("event")).startswith("broker reconnected")]
    print(f"node restart: not consuming for {back['outage_s']} s")
    library = [e for e in lines if "logger" in e and e.get("level") in ("warning", "error")]
    assert library == []
    assert worker.foreign_lines() == []


@pytest.mark.broker
async def test_a_single_url_keeps_working(free_port: int) -> None:
    """One URL, as before: connects; down, it is a BrokerError naming its address."""
    connection = await connect(AMQP_URL)
    await connection.close()
    with pytest.raises(BrokerError, match=f"127.0.0.1:{free_port}"):
        await connect(_dead_url(free_port))


def test_the_librarys_transport_errors_are_folded_but_its_other_errors_stay() -> None:
    """aiormq's 'error when creating transport' (and its other lost-connection reports) go to
    debug, without traceback; any other aiormq error is still logged at its level."""
    stream = io.BytesIO()
    configure_logging("json", "info", stream=stream)
    library = logging.getLogger("aiormq.connection")
    try:
        raise ConnectionRefusedError(111, "Connect call failed")
    except ConnectionRefusedError as exc:
        library.error("error when creating transport: %r", exc, exc_info=True)
        library.warning("Cancelling cause reader exited abnormally", exc_info=True)
    library.error("Unexpected frame %r", "Basic.Nack")
    lines = [orjson.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["event"], line["level"]) for line in lines] == [
        ("Unexpected frame 'Basic.Nack'", "error")
    ]
