"""Chaos for the transactional outbox: writers, two relays, a real worker and the simulator,
while relays are killed, PostgreSQL restarts and the broker restarts.

OUTBOX_CHAOS_EVENTS sets the number of committed events (CI: 3,000; the issue's run: 10,000).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import uuid
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import psycopg

from consumer.contract import example_event
from consumer.outbox.write import add_event_psycopg_async
from consumer.testing.vercel_sim import VercelSimulator
from tests.brokers import PrivateBroker
from tests.chaos import CHAOS_TOKENS, Scenario, WorkerProcess, delivered_ids, worker_env
from tests.helpers import wait_until
from tests.postgres import restart_cluster

EVENTS = int(os.environ.get("OUTBOX_CHAOS_EVENTS", "3000"))
WRITERS = 4
ROLLBACK_SHARE = 0.1
BATCH = 200
TOKENS = {**CHAOS_TOKENS, **{f"icfg_o{n}": f"tok_o{n}_s3cr3t" for n in range(6)}}
AUDIT = f"outbox-chaos-audit-{uuid.uuid4().hex[:8]}"


class Writers:
    """WRITERS concurrent services committing 1-3 events of one installation per transaction;
    ROLLBACK_SHARE of the transactions roll back. A transaction cut by a PostgreSQL restart
    has an unknown outcome: the table says afterwards whether it committed."""

    def __init__(self, dsn: str, total: int) -> None:
        self.dsn = dsn
        self.total = total
        self.committed: set[str] = set()
        self.rolled_back: set[str] = set()
        self.uncertain: set[str] = set()
        self.interrupted = 0

    async def run(self) -> None:
        await asyncio.gather(*(self._writer(n) for n in range(WRITERS)))

    async def _writer(self, seed: int) -> None:
        chance = random.Random(seed)
        while len(self.committed) < self.total:
            try:
                async with await psycopg.AsyncConnection.connect(self.dsn) as connection:
                    while len(self.committed) < self.total:
                        await self._transaction(connection, chance)
            except psycopg.OperationalError:
                self.interrupted += 1
                await asyncio.sleep(0.2)

    async def _transaction(self, connection: Any, chance: random.Random) -> None:
        installation = chance.choice(sorted(TOKENS))
        ids = [f"evt_{uuid.uuid4().hex}" for _ in range(chance.randint(1, 3))]
        rollback = chance.random() < ROLLBACK_SHARE
        self.uncertain.update(ids)
        for event_id in ids:
            body = example_event(
                "resource.renamed", id=event_id, installation_id=installation, resource_id=event_id
            )
            await add_event_psycopg_async(connection, body)
        if rollback:
            await connection.rollback()
            self.rolled_back.update(ids)
        else:
            await connection.commit()
            self.committed.update(ids)
        self.uncertain.difference_update(ids)


async def table(dsn: str, query: str) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn) as connection:
        cursor = await connection.execute(query)  # type: ignore[arg-type]
        return await cursor.fetchall()


async def audit_order(amqp_url: str) -> tuple[dict[str, list[str]], int]:
    """Per installation, the ids in the order they first reached the broker; and the number of
    messages (repeats included). Read by a consumer (one `get` per message is slow), until
    nothing more comes for a few seconds."""
    order: dict[str, list[str]] = {}
    seen: set[str] = set()
    count = 0
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.get_queue(AUDIT)
        with contextlib.suppress(TimeoutError):
            async with queue.iterator(timeout=5, no_ack=True) as messages:
                async for message in messages:
                    count += 1
                    body = orjson.loads(message.body)
                    if body["id"] not in seen:
                        seen.add(body["id"])
                        order.setdefault(body["installation_id"], []).append(body["id"])
        await channel.queue_delete(AUDIT)
    return order, count


async def test_outbox_chaos(private_broker: PrivateBroker, outbox_dsn: str, tmp_path: Path) -> None:
    """Every committed event reaches Vercel through a real worker, no rolled-back one does, and
    each installation's events reach the broker in commit order, while one of two relays is
    killed with kill -9 twice, PostgreSQL restarts once and the broker once."""
    async with (
        VercelSimulator(dict(TOKENS)) as sim,
        Scenario(private_broker.url, sim, tmp_path) as scenario,
    ):
        for installation, token in TOKENS.items():
            (tmp_path / "tokens" / installation).write_text(token)
        await declare_audit(private_broker.url, str(scenario.settings["exchange"]))
        worker = scenario.worker()
        worker.start()
        relays = [relay_process(scenario, outbox_dsn, tmp_path, n) for n in (1, 2)]
        for relay in relays:
            relay.start()
        await worker.wait_consuming()

        writers = Writers(outbox_dsn, EVENTS)
        writing = asyncio.create_task(writers.run())
        await chaos(writers, relays[0], private_broker)
        await writing

        committed = {row[0] for row in await table(outbox_dsn, "SELECT id FROM vercel_outbox")}
        assert writers.committed <= committed
        assert not committed & writers.rolled_back
        scenario.published = sorted(committed)
        await wait_until(lambda: unsent(outbox_dsn), timeout=120)
        report = await scenario.finish(
            f"outbox: {len(committed)} committed by {WRITERS} writers, "
            f"{len(writers.rolled_back)} rolled back, {writers.interrupted} cut by the restart"
        )
        assert not set(delivered_ids(sim)) & writers.rolled_back
        order, messages = await audit_order(private_broker.url)
        expected: dict[str, list[str]] = {}
        for installation, event_id in await table(
            outbox_dsn, "SELECT installation_id, id FROM vercel_outbox ORDER BY seq"
        ):
            expected.setdefault(installation, []).append(event_id)
        assert order == expected
        # At most one batch per relay per fault: 2 kills, and both relays at each restart.
        assert messages - report.published <= (2 + 2 * 2) * BATCH
        print(
            f"outbox chaos: {report.published} committed, {report.delivered} delivered, "
            f"lost {report.lost}, rolled back {len(writers.rolled_back)} (published 0), "
            f"{messages - report.published} duplicate publishes, "
            f"{report.extra_deliveries} extra deliveries, order kept for {len(order)} "
            f"installations, {report.seconds:.1f} s"
        )


async def unsent(dsn: str) -> bool:
    rows = await table(dsn, "SELECT count(*) FROM vercel_outbox WHERE sent_at IS NULL")
    return bool(rows[0][0] == 0)


async def chaos(writers: Writers, relay: WorkerProcess, broker: PrivateBroker) -> None:
    """At 20 % and 60 % of the writing, kill -9 the first relay and start it again; at 40 %
    restart PostgreSQL; at 80 % restart the broker."""

    async def at(share: float) -> None:
        await wait_until(lambda: len(writers.committed) >= share * writers.total, timeout=120)

    await at(0.2)
    await relay.kill()
    relay.start()
    await at(0.4)
    await asyncio.to_thread(restart_cluster)
    await at(0.6)
    await relay.kill()
    relay.start()
    await at(0.8)
    await asyncio.to_thread(broker.restart)


async def declare_audit(amqp_url: str, exchange: str) -> None:
    """A quorum queue that sees every published event in broker order (it survives the
    restart)."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(
            AUDIT, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, "#")


def relay_process(scenario: Scenario, dsn: str, workdir: Path, n: int) -> WorkerProcess:
    env = worker_env(
        amqp_url=scenario.amqp_url,
        exchange=scenario.settings["exchange"],
        queue=scenario.queue,
        outbox_dsn=dsn,
        outbox_poll_interval=0.5,
        outbox_batch_size=BATCH,
    )
    relay = WorkerProcess(env, workdir / f"relay-{n}.log", command=("outbox", "relay"))
    scenario.workers.append(relay)
    return relay
