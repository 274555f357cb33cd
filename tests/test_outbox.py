"""The transactional outbox against a real PostgreSQL and a real RabbitMQ: the write helpers of
every driver, the relay's order, its dead letters, faults and clean-up, and its commands."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aio_pika
import asyncpg
import psycopg
import pytest
from aio_pika.abc import AbstractChannel, AbstractQueue
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session

from consumer.contract import example_event
from consumer.errors import ContractError
from consumer.logs import get_logger
from consumer.outbox import write
from consumer.outbox.metrics import OutboxMetrics
from consumer.outbox.relay import OutboxRelay, RelayConfig
from consumer.outbox.schema import DDL, INSERT_PSYCOPG
from tests.helpers import AMQP_URL, run_cli, wait_until

Writer = Callable[[str, dict[str, Any], bool], Awaitable[None]]


def event(installation: str = "icfg_alpha", **fields: Any) -> dict[str, Any]:
    event_id = f"evt_{uuid.uuid4().hex}"
    return (
        example_event(
            "resource.renamed", id=event_id, installation_id=installation, resource_id=event_id
        )
        | fields
    )


def sqlalchemy_url(dsn: str, driver: str) -> str:
    return dsn.replace("postgresql://", f"postgresql+{driver}://", 1)


async def write_sqlalchemy(dsn: str, body: dict[str, Any], commit: bool) -> None:
    engine = create_engine(sqlalchemy_url(dsn, "psycopg"))
    try:
        with Session(engine) as session, session.begin():
            write.add_event(session, body)
            if not commit:
                session.rollback()
    finally:
        engine.dispose()


async def write_sqlalchemy_async(dsn: str, body: dict[str, Any], commit: bool) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    engine = create_async_engine(sqlalchemy_url(dsn, "asyncpg"))
    try:
        async with AsyncSession(engine) as session, session.begin():
            await write.add_event_async(session, body)
            if not commit:
                await session.rollback()
    finally:
        await engine.dispose()


async def write_psycopg(dsn: str, body: dict[str, Any], commit: bool) -> None:
    with psycopg.connect(dsn) as connection:
        write.add_event_psycopg(connection, body)
        connection.commit() if commit else connection.rollback()


async def write_psycopg_async(dsn: str, body: dict[str, Any], commit: bool) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        await write.add_event_psycopg_async(connection, body)
        await (connection.commit() if commit else connection.rollback())


async def write_asyncpg(dsn: str, body: dict[str, Any], commit: bool) -> None:
    connection = await asyncpg.connect(dsn)
    try:
        transaction = connection.transaction()
        await transaction.start()
        await write.add_event_asyncpg(connection, body)
        await (transaction.commit() if commit else transaction.rollback())
    finally:
        await connection.close()


WRITERS: dict[str, Writer] = {
    "sqlalchemy": write_sqlalchemy,
    "sqlalchemy_async": write_sqlalchemy_async,
    "psycopg": write_psycopg,
    "psycopg_async": write_psycopg_async,
    "asyncpg": write_asyncpg,
}


async def outbox_ids(dsn: str, where: str = "TRUE") -> list[str]:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        cursor = await connection.execute(
            f"SELECT id FROM vercel_outbox WHERE {where} ORDER BY seq"
        )  # type: ignore[arg-type]
        return [row[0] for row in await cursor.fetchall()]


@pytest.mark.parametrize("driver", sorted(WRITERS))
async def test_each_helper_writes_only_with_the_callers_commit(
    outbox_dsn: str, driver: str
) -> None:
    """An event added in a committed transaction is in the outbox; one added in a transaction
    that rolled back is not."""
    kept, dropped = event(), event()
    await WRITERS[driver](outbox_dsn, kept, True)
    await WRITERS[driver](outbox_dsn, dropped, False)
    assert await outbox_ids(outbox_dsn) == [kept["id"]]


@pytest.mark.parametrize("driver", sorted(WRITERS))
async def test_an_invalid_event_fails_the_callers_transaction(outbox_dsn: str, driver: str) -> None:
    """A body that breaks the contract raises ContractError before anything is written."""
    bad = event()
    del bad["occurred_at"]
    with pytest.raises(ContractError, match="occurred_at"):
        await WRITERS[driver](outbox_dsn, bad, True)
    assert await outbox_ids(outbox_dsn) == []


async def test_the_plain_sql_insert_refuses_a_body_that_disagrees(outbox_dsn: str) -> None:
    """The one-parameter INSERT other languages run fills the columns from the body; a repeated
    id fails the transaction (dedup by message id) and so does a body that is not an object."""
    body = event()
    async with await psycopg.AsyncConnection.connect(outbox_dsn, autocommit=True) as connection:
        await connection.execute(INSERT_PSYCOPG, (json.dumps(body),))
        with pytest.raises(psycopg.errors.UniqueViolation):
            await connection.execute(INSERT_PSYCOPG, (json.dumps(body),))
        with pytest.raises(psycopg.errors.IntegrityError):
            await connection.execute(INSERT_PSYCOPG, ('["not", "an", "object"]',))
    assert await outbox_ids(outbox_dsn) == [body["id"]]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(
        st.sampled_from(["id", "type", "occurred_at", "installation_id", "resource_id", "x"]),
        st.one_of(st.text(max_size=20), st.integers(), st.none()),
    )
)
def test_hostile_bodies_are_refused_before_the_insert(body: dict[str, Any]) -> None:
    """Whatever a caller passes, outbox_body either returns JSON the contract accepts or raises
    ContractError: nothing invalid reaches the table through the helpers."""
    from consumer.contract import parse_event

    try:
        text = write.outbox_body(body)
    except ContractError:
        return
    parse_event(text.encode(), max_bytes=1 << 20)


def test_the_documented_insert_is_the_one_the_helpers_run() -> None:
    """docs/outbox.md gives other languages the same INSERT the Python helpers run."""
    from pathlib import Path

    from consumer.outbox.schema import INSERT_ASYNCPG

    docs = (Path(__file__).resolve().parent.parent / "docs" / "outbox.md").read_text()
    blocks = [block.split("```", 1)[0] for block in docs.split("```sql\n")[1:]]
    documented = [" ".join(block.split()) for block in blocks if "INSERT" in block]
    assert documented == [" ".join(INSERT_ASYNCPG.split())]


def test_a_value_json_cannot_hold_is_a_contract_error() -> None:
    """Regression (found by the property test above): an integer beyond 64 bits, or an object
    JSON has no form for, raised orjson's TypeError instead of ContractError."""
    with pytest.raises(ContractError, match="JSON"):
        write.outbox_body(event(resource_id=2**64))
    with pytest.raises(ContractError, match="JSON"):
        write.outbox_body(event(data={"x": object()}))


# ── the relay ────────────────────────────────────────────────────────────────────────────────


@pytest.fixture
async def audit(channel: AbstractChannel, names: dict[str, str]) -> AsyncIterator[AbstractQueue]:
    """A queue bound to everything on the test's exchange, and its DLQ, on the shared broker."""
    exchange = await channel.declare_exchange(
        names["exchange"], aio_pika.ExchangeType.TOPIC, durable=True
    )
    queue = await channel.declare_queue(names["queue"], durable=True)
    await queue.bind(exchange, "#")
    await channel.declare_queue(f"{names['queue']}.dlq", durable=True)
    yield queue
    await channel.queue_delete(names["queue"])
    await channel.queue_delete(f"{names['queue']}.dlq")
    await channel.exchange_delete(names["exchange"])


@contextlib.asynccontextmanager
async def running_relay(
    dsn: str, names: dict[str, str], **overrides: Any
) -> AsyncIterator[OutboxRelay]:
    values: dict[str, Any] = {
        "dsn": dsn,
        "amqp_url": AMQP_URL,
        "exchange": names["exchange"],
        "dead_letter_queue": f"{names['queue']}.dlq",
        "batch_size": 50,
        "poll_interval": 0.2,
    }
    relay = OutboxRelay(RelayConfig(**(values | overrides)), OutboxMetrics(), get_logger("test"))
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        yield relay
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def drain(queue: AbstractQueue, count: int) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """The first `count` messages of `queue`, in queue order (fails if they do not come)."""
    got: list[aio_pika.abc.AbstractIncomingMessage] = []

    async def more() -> bool:
        while (message := await queue.get(fail=False, no_ack=True)) is not None:
            got.append(message)
        return len(got) >= count

    await wait_until(more, timeout=30)
    return got


async def insert_events(dsn: str, bodies: list[dict[str, Any]]) -> None:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        for body in bodies:
            await write.add_event_psycopg_async(connection, body)
        await connection.commit()


async def test_two_relays_publish_each_installation_in_commit_order(
    outbox_dsn: str, names: dict[str, str], audit: AbstractQueue
) -> None:
    """Events of 6 installations written by 3 concurrent writers, relayed by two relays with
    small batches, reach the queue with every installation's events in commit (seq) order."""
    installations = [f"icfg_{n}" for n in range(6)]

    async def writer(n: int) -> None:
        for i in range(40):
            await insert_events(outbox_dsn, [event(installations[(n + i) % 6]) for _ in range(3)])

    async with (
        running_relay(outbox_dsn, names, batch_size=7),
        running_relay(outbox_dsn, names, batch_size=5),
    ):
        await asyncio.gather(*(writer(n) for n in range(3)))
        messages = await drain(audit, 360)
    expected = await order_by_installation(outbox_dsn)
    assert first_seen_by_installation(messages) == expected


async def order_by_installation(dsn: str) -> dict[str, list[str]]:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        cursor = await connection.execute(
            "SELECT installation_id, id FROM vercel_outbox ORDER BY seq"
        )
        order: dict[str, list[str]] = {}
        for installation, event_id in await cursor.fetchall():
            order.setdefault(installation, []).append(event_id)
    return order


def first_seen_by_installation(
    messages: list[aio_pika.abc.AbstractIncomingMessage],
) -> dict[str, list[str]]:
    """Per installation, message ids in the order they first appear (repeats ignored)."""
    import orjson

    order: dict[str, list[str]] = {}
    seen: set[str] = set()
    for message in messages:
        body = orjson.loads(message.body)
        if body["id"] not in seen:
            seen.add(body["id"])
            order.setdefault(body["installation_id"], []).append(body["id"])
    return order


async def test_a_row_locked_by_someone_else_holds_back_only_its_installations_later_rows(
    outbox_dsn: str, names: dict[str, str], audit: AbstractQueue
) -> None:
    """While an outside transaction holds a lock on alpha's first row, the relay publishes beta
    but nothing of alpha (the rows after the locked one would overtake it); once the lock is
    gone, alpha's rows follow in order."""
    alpha = [event("icfg_alpha") for _ in range(3)]
    beta = [event("icfg_beta") for _ in range(2)]
    await insert_events(outbox_dsn, alpha + beta)
    async with await psycopg.AsyncConnection.connect(outbox_dsn) as locker:
        await locker.execute(
            "SELECT 1 FROM vercel_outbox WHERE id = %s FOR UPDATE", (alpha[0]["id"],)
        )
        async with running_relay(outbox_dsn, names):
            beta_messages = await drain(audit, 2)
            await asyncio.sleep(0.5)  # a few polls: alpha must still wait
            assert await audit.get(fail=False) is None
            await locker.rollback()
            alpha_messages = await drain(audit, 3)
    assert [m.message_id for m in beta_messages] == [e["id"] for e in beta]
    assert [m.message_id for m in alpha_messages] == [e["id"] for e in alpha]


async def test_an_invalid_row_is_dead_lettered_and_the_rows_behind_it_go_on(
    outbox_dsn: str, names: dict[str, str], audit: AbstractQueue, channel: AbstractChannel
) -> None:
    """A row whose body was changed to break the contract goes to the DLQ with reason
    invalid_message and a detail; the installation's rows after it are published."""
    rows = [event() for _ in range(3)]
    await insert_events(outbox_dsn, rows)
    async with await psycopg.AsyncConnection.connect(outbox_dsn) as connection:
        await connection.execute(
            "UPDATE vercel_outbox SET body = body - 'occurred_at' WHERE id = %s", (rows[1]["id"],)
        )
        await connection.commit()
    published, dead = await relay_two_and_one_dead_letter(outbox_dsn, names, audit, channel)
    assert [m.message_id for m in published] == [rows[0]["id"], rows[2]["id"]]
    assert dead[0].message_id == rows[1]["id"]
    assert dead[0].headers["dead-letter-reason"] == "invalid_message"
    assert "occurred_at" in str(dead[0].headers["dead-letter-detail"])
    assert await outbox_ids(outbox_dsn, "sent_at IS NULL") == []


async def relay_two_and_one_dead_letter(
    outbox_dsn: str, names: dict[str, str], audit: AbstractQueue, channel: AbstractChannel
) -> tuple[list[aio_pika.abc.AbstractIncomingMessage], list[aio_pika.abc.AbstractIncomingMessage]]:
    """Run a relay until two rows are published and one is in the DLQ (and counted)."""
    async with running_relay(outbox_dsn, names) as relay:
        published = await drain(audit, 2)
        dlq = await channel.get_queue(f"{names['queue']}.dlq")
        dead = await drain(dlq, 1)
        await wait_until(lambda: relay.metrics.dead_lettered._value.get() == 1)
    return published, dead


async def test_a_row_whose_id_cannot_be_a_message_id_is_dead_lettered_without_one(
    outbox_dsn: str, names: dict[str, str], audit: AbstractQueue, channel: AbstractChannel
) -> None:
    """A row written by the plain SQL INSERT (no contract check) whose event id has 256
    characters, more than an AMQP message_id holds: dead-lettered as invalid_message, with the
    id in its body but not as its message_id, and the rows behind it go on (its publish raised
    TypeError, and the relay retried that batch for good; found by the hostile-identity tests)."""
    rows = [event(), event(id="a" * 256), event()]
    async with await psycopg.AsyncConnection.connect(outbox_dsn) as connection:
        for body in rows:
            await connection.execute(INSERT_PSYCOPG, (json.dumps(body),))
        await connection.commit()
    published, dead = await relay_two_and_one_dead_letter(outbox_dsn, names, audit, channel)
    assert [m.message_id for m in published] == [rows[0]["id"], rows[2]["id"]]
    assert dead[0].message_id != rows[1]["id"]  # aio-pika gives it one of its own
    assert json.loads(dead[0].body)["id"] == rows[1]["id"]
    assert dead[0].headers["dead-letter-reason"] == "invalid_message"
    assert "255" in str(dead[0].headers["dead-letter-detail"])
    assert await outbox_ids(outbox_dsn, "sent_at IS NULL") == []


async def test_with_the_broker_down_rows_stay_unsent_and_go_once_it_is_back(
    outbox_dsn: str, names: dict[str, str], audit: AbstractQueue, free_port: int
) -> None:
    """A relay that cannot reach the broker publishes nothing, marks nothing sent, says why in
    /readyz terms and counts the failures; a relay with a broker then publishes every row."""
    rows = [event() for _ in range(4)]
    await insert_events(outbox_dsn, rows)
    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port}/"
    async with running_relay(outbox_dsn, names, amqp_url=dead_broker) as relay:
        await wait_until(lambda: relay.metrics.publish_failures._value.get() >= 2)
        assert relay.readiness() == (False, {"reason": "broker_unavailable"})
    assert len(await outbox_ids(outbox_dsn, "sent_at IS NULL")) == 4
    async with running_relay(outbox_dsn, names) as relay:
        messages = await drain(audit, 4)
        await wait_until(lambda: relay.readiness()[0])
    assert [m.message_id for m in messages] == [e["id"] for e in rows]
    assert await outbox_ids(outbox_dsn, "sent_at IS NULL") == []


async def test_with_postgres_unreachable_the_relay_waits_and_says_so(
    names: dict[str, str], free_port: int
) -> None:
    """A relay whose database does not answer keeps trying and reports database_unavailable."""
    dsn = f"postgresql://nobody:secret@127.0.0.1:{free_port}/none"
    async with running_relay(dsn, names) as relay:
        await wait_until(lambda: relay.metrics.database_errors._value.get() >= 2)
        assert relay.readiness() == (False, {"reason": "database_unavailable"})


async def test_a_connection_cut_between_batches_is_reconnected(
    outbox_dsn: str, names: dict[str, str], audit: AbstractQueue
) -> None:
    """Regression (the chaos test's PostgreSQL restart): when the server ends the relay's idle
    connections, the next BEGIN failed with AdminShutdown, which escaped as a traceback and
    ended the relay. Now it counts a database error, reconnects and publishes what follows."""
    async with running_relay(outbox_dsn, names) as relay:
        await wait_until(lambda: relay.readiness()[0])
        async with await psycopg.AsyncConnection.connect(outbox_dsn, autocommit=True) as admin:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
        await wait_until(lambda: relay.metrics.database_errors._value.get() >= 1)
        body = event()
        await insert_events(outbox_dsn, [body])
        (message,) = await drain(audit, 1)
    assert message.message_id == body["id"]


async def test_sent_rows_are_deleted_after_the_retention(
    outbox_dsn: str, names: dict[str, str], audit: AbstractQueue
) -> None:
    """With a retention of 0, rows are deleted once sent; unsent rows are never deleted."""
    await insert_events(outbox_dsn, [event() for _ in range(3)])
    async with running_relay(outbox_dsn, names, retention=0.0) as relay:
        await drain(audit, 3)
        relay._next_cleanup = 0.0  # the next pass sweeps, rather than in a minute
        await insert_events(outbox_dsn, [event()])
        await wait_until(lambda: relay.metrics.deleted._value.get() >= 3)
    assert len(await outbox_ids(outbox_dsn)) <= 1


async def test_the_backlog_gauges_move_while_the_broker_is_unreachable(
    outbox_dsn: str,
    names: dict[str, str],
    audit: AbstractQueue,
    free_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: the gauges were sampled only after a round that reached the broker, so in a
    broker outage they froze (a relay that never reached it reported 0) and the lag alert kept
    quiet through the very outage it is for. Now, with no broker at all, the backlog follows
    the rows as they are committed and the oldest unsent row's age keeps rising; once a relay
    with a broker has published them, both are 0 (sent rows are not counted)."""
    import consumer.outbox.relay as relay_module

    monkeypatch.setattr(relay_module, "SAMPLE_EVERY", 0.1)  # samples in a test's time
    await insert_events(outbox_dsn, [event() for _ in range(5)])
    dead_broker = f"amqp://guest:guest@127.0.0.1:{free_port}/"
    async with running_relay(outbox_dsn, names, amqp_url=dead_broker) as relay:
        backlog, age = relay.metrics.backlog._value, relay.metrics.oldest_unsent_age._value
        await wait_until(lambda: backlog.get() == 5)
        await insert_events(outbox_dsn, [event() for _ in range(3)])
        await wait_until(lambda: backlog.get() == 8)
        async with await psycopg.AsyncConnection.connect(outbox_dsn) as connection:
            cursor = await connection.execute(
                "SELECT extract(epoch FROM now() - min(created_at))::float8 FROM vercel_outbox"
            )
            (waited,) = await cursor.fetchone() or (0.0,)
        sampled = age.get()
        await wait_until(lambda: age.get() >= max(waited, sampled) + 0.5)
        assert relay.readiness() == (False, {"reason": "broker_unavailable"})
        assert relay.metrics.publish_failures._value.get() >= 1
        assert relay.metrics.published._value.get() == 0
    assert len(await outbox_ids(outbox_dsn, "sent_at IS NULL")) == 8
    async with running_relay(outbox_dsn, names) as relay:
        await drain(audit, 8)
        backlog, age = relay.metrics.backlog._value, relay.metrics.oldest_unsent_age._value
        backlog.set(-1)  # so that only a sample taken from now on can pass
        age.set(-1)
        await wait_until(lambda: backlog.get() == 0 and age.get() == 0)


# ── commands ─────────────────────────────────────────────────────────────────────────────────


def test_outbox_sql_prints_the_migration() -> None:
    result = run_cli("outbox", "sql")
    assert result.returncode == 0
    assert result.stdout == DDL


async def test_outbox_init_is_idempotent_and_reports_failures(outbox_dsn: str) -> None:
    """`outbox init` on a database that has the table succeeds again; an unreachable database
    is exit status 1 with one line, no DSN at all exit status 2; no password is printed."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUMER_")}
    again = await asyncio.to_thread(run_cli, "outbox", "init", "--dsn", outbox_dsn, env=env)
    assert again.returncode == 0, again.stderr
    down = await asyncio.to_thread(
        run_cli, "outbox", "init", "--dsn", "postgresql://u:hunter2@127.0.0.1:1/x", env=env
    )
    assert down.returncode == 1
    assert "hunter2" not in down.stderr + down.stdout
    assert len(down.stderr.strip().splitlines()) == 1
    missing = await asyncio.to_thread(run_cli, "outbox", "init", env=env)
    assert missing.returncode == 2
    assert "CONSUMER_OUTBOX_DSN" in missing.stderr


async def test_the_relay_command_serves_health_and_metrics_and_stops_on_sigterm(
    outbox_dsn: str, names: dict[str, str], audit: AbstractQueue, free_port: int, tmp_path: Any
) -> None:
    """`vercel-consumer outbox relay` publishes a committed row, is ready on /readyz once it
    reaches PostgreSQL and the broker, counts the row on /metrics, and exits 0 on SIGTERM;
    its log never shows the DSN's password."""
    import httpx

    from tests.chaos import WorkerProcess, worker_env

    env = worker_env(
        amqp_url=AMQP_URL,
        exchange=names["exchange"],
        queue=names["queue"],
        outbox_dsn=outbox_dsn,
        health_port=free_port,
        health_host="127.0.0.1",
    )
    relay = WorkerProcess(env, tmp_path / "relay.log", command=("outbox", "relay"))
    relay.start()
    try:
        base = f"http://127.0.0.1:{free_port}"

        async def ready() -> bool:
            try:
                async with httpx.AsyncClient() as client:
                    return (await client.get(f"{base}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_until(ready, timeout=30)
        body = event()
        await insert_events(outbox_dsn, [body])
        (message,) = await drain(audit, 1)
        assert message.message_id == body["id"]
        async with httpx.AsyncClient() as client:
            metrics = (await client.get(f"{base}/metrics")).text
            alive = (await client.get(f"{base}/livez")).status_code
        assert "vercel_consumer_outbox_published_total 1.0" in metrics
        assert "vercel_consumer_outbox_backlog" in metrics
        assert alive == 200
    finally:
        assert await relay.stop() == 0
    password = outbox_dsn.split(":")[2].split("@")[0]
    assert password not in "\n".join(relay.log_lines())
    assert relay.foreign_lines() == []


async def test_a_refused_publish_leaves_the_batch_unsent_with_the_reason(
    outbox_dsn: str, names: dict[str, str], channel: AbstractChannel
) -> None:
    """When the broker returns the batch (no queue bound to the exchange), nothing is marked
    sent; each row counts the failed attempt and keeps the reason."""
    await insert_events(outbox_dsn, [event(), event()])
    try:
        async with running_relay(outbox_dsn, names) as relay:
            await wait_until(lambda: relay.metrics.publish_failures._value.get() >= 1)
    finally:
        await channel.exchange_delete(names["exchange"])
    async with await psycopg.AsyncConnection.connect(outbox_dsn) as connection:
        cursor = await connection.execute(
            "SELECT sent_at, attempts, last_error FROM vercel_outbox ORDER BY seq"
        )
        rows = await cursor.fetchall()
    assert [row[0] for row in rows] == [None, None]
    assert all(row[1] >= 1 for row in rows)
    assert all("no queue is bound" in row[2] for row in rows)
