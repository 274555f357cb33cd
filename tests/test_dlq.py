"""`dlq` against the real broker: inspect leaves everything, replay and purge move exactly what
matches, nothing is lost or doubled by crashes or by two operators at once."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
import pamqp.encode
import pytest
from aio_pika.abc import AbstractChannel, AbstractConnection, AbstractIncomingMessage

from consumer.dlq.export import ExportedMessage, decode_line, encode_line
from consumer.dlq.model import DeadLetterInfo, Filter
from consumer.dlq.progress import ProgressLines
from consumer.dlq.purge import purge
from consumer.dlq.render import describe_import
from consumer.dlq.replay import ReplayOptions, replay
from consumer.dlq.restore import import_export
from consumer.dlq.session import DlqSession, locked_session, look
from consumer.errors import BrokerError
from consumer.nesting import DeepValue
from consumer.testing.vercel_sim import VercelSimulator
from consumer.topology import QUORUM, WORK_QUEUE_DELIVERY_LIMIT, Topology, declare
from tests.brokers import VERSION, PrivateBroker
from tests.helpers import (
    AMQP_URL,
    Relay,
    deepest_fitting,
    drain_queue,
    event,
    nested,
    run_cli,
    wait_until,
)


def at(minute: int) -> datetime:
    return datetime(2026, 11, 26, 10, minute, tzinfo=UTC)


@dataclass(frozen=True)
class Sample:
    """One synthetic dead letter: what the seed publishes and the filters look at."""

    key: int
    reason: str
    event_type: str
    installation: str | None
    status: int | None
    minute: int
    body: bytes | None = None  # None: a valid event body

    def message(self, topology: Topology) -> aio_pika.Message:
        body = self.body
        if body is None:
            fields = {"id": f"evt_{self.key}", "type": self.event_type}
            body = orjson.dumps({**fields, "installation_id": self.installation, "x": "y"})
        return aio_pika.Message(
            body,
            headers=self.headers(topology),
            message_id=f"evt_{self.key}",
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )

    def headers(self, topology: Topology) -> dict[str, Any]:
        if self.reason == "delivery_limit":  # made by the broker, not by us
            return {
                "x-death": [
                    {
                        "count": 1,
                        "reason": "delivery_limit",
                        "queue": topology.queue,
                        "time": at(self.minute),
                        "exchange": topology.exchange,
                        "routing-keys": [self.event_type],
                    }
                ],
                "x-first-death-reason": "delivery_limit",
                "x-first-death-queue": topology.queue,
                "x-first-death-exchange": topology.exchange,
            }
        headers: dict[str, Any] = {
            "dead-letter-reason": self.reason,
            "dead-letter-detail": f"sample {self.key}",
            "delivery-attempts": 2,
            "first-attempt-at": "2026-11-26T09:00:00.000Z",
            "dead-lettered-at": f"2026-11-26T10:{self.minute:02d}:00.000Z",
            "original-exchange": topology.exchange,
            "original-routing-key": self.event_type,
        }
        if self.status is not None:
            headers["dead-letter-http-status"] = self.status
        return headers


SAMPLES = [
    Sample(0, "no_credentials", "resource.renamed", "icfg_alpha", None, 0),
    Sample(1, "invalid_message", "resource.created", None, None, 1, body=b"\xff{ not json"),
    Sample(2, "rejected_by_vercel", "billing.plan_changed", "icfg_beta", 404, 2),
    Sample(3, "rejected_by_vercel", "resource.renamed", "icfg_alpha", 401, 3),
    Sample(4, "retries_exhausted", "resource.deleted", "icfg_beta", 503, 4),
    Sample(5, "no_credentials", "billing.plan_changed", "icfg_gamma", None, 5),
    Sample(6, "delivery_limit", "resource.renamed", "icfg_alpha", None, 6),
    Sample(7, "rejected_by_vercel", "resource.renamed", "icfg_gamma", 422, 7),
]

FILTER_CASES = {
    "reason": (Filter(reason="no_credentials"), None, {0, 5}),
    "reason of a body that is not JSON": (Filter(reason="invalid_message"), None, {1}),
    "reason the broker gave": (Filter(reason="delivery_limit"), None, {6}),
    "type glob": (Filter(type_glob="billing.*"), None, {2, 5}),
    "type glob, routing key of a non-JSON body": (Filter(type_glob="resource.c*"), None, {1}),
    "installation": (Filter(installation="icfg_beta"), None, {2, 4}),
    "status": (Filter(status="404"), None, {2}),
    "status class": (Filter(status="4xx"), None, {2, 3, 7}),
    "since": (Filter(since=at(4)), None, {4, 5, 6, 7}),
    "until": (Filter(until=at(2)), None, {0, 1}),
    "since and until": (Filter(since=at(2), until=at(5)), None, {2, 3, 4}),
    "several criteria": (Filter(reason="rejected_by_vercel", installation="icfg_alpha"), None, {3}),
    "limit": (Filter(reason="rejected_by_vercel"), 2, {2, 3}),
    "nothing matches": (Filter(installation="icfg_nobody"), None, set()),
}


@pytest.fixture
async def topology(amqp: AbstractConnection, names: dict[str, str]) -> AsyncIterator[Topology]:
    """The relay's topology (exchange, work queue, DLQ) under this test's names."""
    topology = Topology(names["exchange"], names["queue"], ())
    channel = await amqp.channel()
    await declare(channel, topology)
    yield topology
    channel = await amqp.channel()
    await channel.queue_delete(topology.dead_letter_queue)
    await channel.queue_delete(topology.queue)
    await channel.exchange_delete(topology.exchange)


async def seed(
    amqp: AbstractConnection, topology: Topology, samples: list[Sample], into: str | None = None
) -> None:
    """Publish `samples` as dead letters of `topology` to its DLQ (or to `into`)."""
    channel = await amqp.channel(publisher_confirms=True)
    for sample in samples:
        await channel.default_exchange.publish(
            sample.message(topology), routing_key=into or topology.dead_letter_queue
        )
    await channel.close()


async def seed_many(amqp: AbstractConnection, topology: Topology, count: int) -> None:
    """`count` plain no_credentials dead letters, evt_0 … evt_<count-1>."""
    channel = await amqp.channel(publisher_confirms=True)
    for start in range(0, count, 500):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    Sample(key, "no_credentials", "resource.renamed", "icfg_x", None, 0).message(
                        topology
                    ),
                    routing_key=topology.dead_letter_queue,
                )
                for key in range(start, min(start + 500, count))
            )
        )
    await channel.close()


def snapshot(messages: list[AbstractIncomingMessage]) -> list[tuple[str | None, bytes, Any]]:
    """What must not change: id, exact body and our headers (not the broker's count)."""
    return [
        (
            message.message_id,
            message.body,
            {k: v for k, v in (message.headers or {}).items() if k != "x-delivery-count"},
        )
        for message in messages
    ]


async def consume(
    channel: AbstractChannel, queue: str, count: int
) -> list[AbstractIncomingMessage]:
    """Take `count` messages with basic.consume, as the worker does (basic.get would hide a
    stale x-delivery-count: it always sets its own)."""
    inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
    declared = await channel.get_queue(queue, ensure=False)
    tag = await declared.consume(inbox.put, no_ack=True)
    messages = [await asyncio.wait_for(inbox.get(), 10) for _ in range(count)]
    await declared.cancel(tag)
    return messages


def keys(messages: list[AbstractIncomingMessage]) -> list[int]:
    return [int((message.message_id or "").removeprefix("evt_")) for message in messages]


def quiet(total: int) -> ProgressLines:
    return ProgressLines(io.StringIO(), total, "test")


def session(topology: Topology, wait: float = 30.0) -> Any:
    return locked_session(
        AMQP_URL, topology.dead_letter_queue, wait=wait, name="test dlq", notify=lambda _: None
    )


async def reference(amqp: AbstractConnection, topology: Topology) -> list[Any]:
    """The seeded dead letters as a consumer sees them, read from a scratch queue."""
    channel = await amqp.channel()
    scratch = await channel.declare_queue(exclusive=True)
    await seed(amqp, topology, SAMPLES, into=scratch.name)
    return snapshot(await drain_queue(channel, scratch.name))


async def test_inspecting_leaves_every_message_in_place_and_in_order(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """List with filters and limits, and stats, change nothing: afterwards the DLQ holds the
    same messages, byte for byte, in the same order."""
    await seed(amqp, topology, SAMPLES)
    for wanted, limit in [(Filter(), None), (Filter(reason="no_credentials"), 1), (Filter(), 3)]:
        async with session(topology) as dlq:
            await look(dlq, wanted, limit)
    remaining = await drain_queue(channel, topology.dead_letter_queue)
    assert keys(remaining) == [sample.key for sample in SAMPLES]
    assert snapshot(remaining) == await reference(amqp, topology)


@pytest.mark.parametrize("case", list(FILTER_CASES))
async def test_filter_round_trip(
    case: str, amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """Each filter lists exactly its dead letters, then replays exactly those to the work
    queue (bodies intact); the others stay in the DLQ, in their order."""
    wanted, limit, expected = FILTER_CASES[case]
    await seed(amqp, topology, SAMPLES)
    async with session(topology) as dlq:
        listed = await look(dlq, wanted, limit)
    assert {int((info.event_id or "").removeprefix("evt_")) for info in listed} == expected

    async with session(topology) as dlq:
        summary = await replay(dlq, wanted, ReplayOptions(topology.queue, limit=limit), quiet)
    assert (summary.moved, summary.failed, summary.aborted) == (len(expected), 0, None)

    moved = await drain_queue(channel, topology.queue)
    assert keys(moved) == sorted(expected)
    bodies = {sample.key: sample.message(topology).body for sample in SAMPLES}
    assert all(message.body == bodies[key] for message, key in zip(moved, keys(moved), strict=True))
    left = await drain_queue(channel, topology.dead_letter_queue)
    assert keys(left) == [sample.key for sample in SAMPLES if sample.key not in expected]


async def test_dry_run_changes_nothing(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """A dry run reports what would move and moves nothing: the work queue stays empty, the
    DLQ keeps every message in order."""
    await seed(amqp, topology, SAMPLES)
    options = ReplayOptions(topology.queue, dry_run=True)
    async with session(topology) as dlq:
        summary = await replay(dlq, Filter(reason="no_credentials"), options, quiet)
    assert [info.event_id for info in summary.would_move] == ["evt_0", "evt_5"]
    assert (summary.moved, summary.skipped) == (0, len(SAMPLES) - 2)
    assert await drain_queue(channel, topology.queue) == []
    remaining = await drain_queue(channel, topology.dead_letter_queue)
    assert snapshot(remaining) == await reference(amqp, topology)


async def test_a_replayed_copy_starts_afresh(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """The copy has the same body and properties, no attempts or failure headers, no broker
    history, and replay-count 1 with a replayed-at stamp."""
    await seed(amqp, topology, [SAMPLES[3], SAMPLES[6]])
    async with session(topology) as dlq:
        await look(dlq, Filter(), None)  # a first look: the broker counts a redelivery
    async with session(topology) as dlq:
        await replay(dlq, Filter(), ReplayOptions(topology.queue), quiet)
    ours, brokers = await consume(channel, topology.queue, 2)
    assert ours.body == SAMPLES[3].message(topology).body
    assert (ours.message_id, ours.content_type) == ("evt_3", "application/json")
    assert ours.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    headers = ours.headers or {}
    assert headers["replay-count"] == 1
    assert datetime.fromisoformat(str(headers["replayed-at"])) <= datetime.now(UTC)
    assert "delivery-attempts" not in headers
    assert "dead-letter-reason" not in headers
    assert "x-delivery-count" not in headers  # a consumer would take it for redeliveries
    assert headers["original-routing-key"] == "resource.renamed"
    assert not any(name.startswith("x-") for name in brokers.headers or {})
    assert (brokers.headers or {})["original-exchange"] == topology.exchange


async def test_to_origin_publishes_through_the_original_exchange(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """--to-origin routes each copy by its original exchange and key (so the exchange's
    other subscribers see it); a dead letter whose headers name any other exchange (a
    publisher can preset them) is not published there: it fails, and stays in the DLQ."""
    other = await channel.declare_queue(exclusive=True)
    await other.bind(topology.exchange, "billing.#")
    elsewhere = await channel.declare_exchange(f"{topology.exchange}-elsewhere", durable=False)
    trap = await channel.declare_queue(exclusive=True)
    await trap.bind(elsewhere, "#")
    steered = Sample(9, "no_credentials", "resource.renamed", "icfg_alpha", None, 9)
    forged = steered.message(topology)
    forged.headers["original-exchange"] = elsewhere.name
    await seed(amqp, topology, [SAMPLES[2]])
    publisher = await amqp.channel(publisher_confirms=True)
    await publisher.default_exchange.publish(forged, routing_key=topology.dead_letter_queue)
    options = ReplayOptions(topology.queue, exchange=topology.exchange, to_origin=True)
    try:
        async with session(topology) as dlq:
            summary = await replay(dlq, Filter(), options, quiet)
        assert (summary.moved, summary.failed) == (1, 1)
        assert "not the relay's" in summary.errors[0]
        assert keys(await drain_queue(channel, topology.queue)) == [2]  # via the binding
        assert keys(await drain_queue(channel, other.name)) == [2]  # the other subscriber
        assert await drain_queue(channel, trap.name) == []  # never steered elsewhere
        assert keys(await drain_queue(channel, topology.dead_letter_queue)) == [9]
    finally:
        await elsewhere.delete()


async def test_a_token_fixed_after_no_credentials_is_delivered_on_replay(
    start_relay: Any, sim: VercelSimulator, tokens_dir: Path, channel: AbstractChannel
) -> None:
    """An event for an installation without a token is dead-lettered; once the token is
    added, replaying it delivers it to Vercel and empties the DLQ."""
    relay: Relay = await start_relay()
    publisher = await channel.declare_exchange(relay.topology.exchange, passive=True)
    body = event(installation_id="icfg_gamma", resource_id="res_late")
    await publisher.publish(aio_pika.Message(orjson.dumps(body)), routing_key=body["type"])

    async def depth() -> int:
        declared = await channel.declare_queue(relay.topology.dead_letter_queue, passive=True)
        return declared.declaration_result.message_count or 0

    await wait_until(lambda: depth_is(depth, 1))
    (tokens_dir / "icfg_gamma").write_text("tok_gamma_s3cr3t")
    sim.set_token("icfg_gamma", "tok_gamma_s3cr3t")
    async with session(relay.topology) as dlq:
        options = ReplayOptions(relay.topology.queue)
        summary = await replay(dlq, Filter(reason="no_credentials"), options, quiet)
    assert summary.moved == 1
    await wait_until(lambda: any(a.installation_id == "icfg_gamma" for a in sim.accepted))
    assert await depth() == 0


async def depth_is(depth: Any, wanted: int) -> bool:
    return bool(await depth() == wanted)


async def test_two_replays_at_once_move_each_message_exactly_once(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """Two operators replaying at the same time: the second waits for the first's lock, and
    every dead letter reaches the work queue exactly once."""
    await seed_many(amqp, topology, 400)
    waited: list[str] = []

    async def operator(notify: Any) -> int:
        async with locked_session(
            AMQP_URL, topology.dead_letter_queue, wait=60, name="op", notify=notify
        ) as dlq:
            summary = await replay(dlq, Filter(), ReplayOptions(topology.queue), quiet)
        assert summary.ok
        return summary.moved

    moved = await asyncio.gather(operator(waited.append), operator(waited.append))
    assert sum(moved) == 400
    assert len(waited) == 1  # exactly one of them had to wait
    replayed = Counter(keys(await drain_queue(channel, topology.queue)))
    assert replayed == Counter(range(400))
    assert await drain_queue(channel, topology.dead_letter_queue) == []


async def test_a_second_command_gives_up_on_the_lock_after_its_wait(
    amqp: AbstractConnection, topology: Topology
) -> None:
    """While one command holds the DLQ, another with --wait 0 fails at once, clearly."""
    await seed(amqp, topology, SAMPLES[:2])
    async with session(topology):
        with pytest.raises(BrokerError, match="another dlq command"):
            async with session(topology, wait=0):
                pass


async def test_a_missing_queue_is_reported(amqp: AbstractConnection, names: dict[str, str]) -> None:
    """A DLQ that does not exist is named in the error; nothing is declared."""
    with pytest.raises(BrokerError, match=f"queue {names['queue']}.dlq does not exist"):
        async with session(Topology(names["exchange"], names["queue"], ())):
            pass


async def test_purge_exports_then_import_restores_byte_identical_messages(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology, tmp_path: Path
) -> None:
    """Purge with --export deletes exactly the matches after writing them; importing the file
    puts back the same bodies, properties and headers; the rest never moved."""
    await seed(amqp, topology, SAMPLES)
    export = tmp_path / "dead-letters.jsonl"
    shown: list[DeadLetterInfo] = []

    async def confirm(infos: list[DeadLetterInfo]) -> bool:
        shown.extend(infos)
        return True

    wanted = Filter(type_glob="resource.*")
    async with session(topology) as dlq:
        summary = await purge(dlq, wanted, limit=None, export=export, confirm=confirm)
    expected = [sample.key for sample in SAMPLES if sample.event_type.startswith("resource.")]
    assert summary.deleted == len(expected) == len(shown)
    left = await drain_queue(channel, topology.dead_letter_queue)
    assert keys(left) == [2, 5]

    imported = await import_export(
        AMQP_URL,
        topology.dead_letter_queue,
        export,
        skip=0,
        name="test import",
        make_progress=quiet,
    )
    assert (imported.imported, imported.error) == (len(expected), None)
    restored = await drain_queue(channel, topology.dead_letter_queue)
    originals = [entry for entry in await reference(amqp, topology) if entry[0] != "evt_2"]
    assert snapshot(restored) == [entry for entry in originals if entry[0] != "evt_5"]
    assert [m.properties.content_type for m in restored] == ["application/json"] * len(expected)


async def test_a_declined_purge_deletes_nothing(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology, tmp_path: Path
) -> None:
    """When the operator does not confirm, nothing is deleted and no export is written."""
    await seed(amqp, topology, SAMPLES)

    async def decline(infos: list[DeadLetterInfo]) -> bool:
        return False

    export = tmp_path / "never.jsonl"
    async with session(topology) as dlq:
        summary = await purge(dlq, Filter(), limit=None, export=export, confirm=decline)
    assert summary.declined
    assert summary.deleted == 0
    assert not export.exists()
    assert len(await drain_queue(channel, topology.dead_letter_queue)) == len(SAMPLES)


async def test_rate_limit_holds_over_a_window(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """With --rate 20, at no point have more than 20 per second (+1) reached the work queue;
    in the end all of them have."""
    await seed_many(amqp, topology, 30)
    started = time.monotonic()
    samples: list[tuple[float, int]] = []

    async def run() -> Any:
        async with session(topology) as dlq:
            return await replay(dlq, Filter(), ReplayOptions(topology.queue, rate=20), quiet)

    task = asyncio.create_task(run())
    while not task.done():
        declared = await channel.declare_queue(topology.queue, passive=True)
        samples.append((time.monotonic() - started, declared.declaration_result.message_count))
        await asyncio.sleep(0.1)
    assert (await task).moved == 30
    assert len(samples) > 3
    assert all(depth <= 20 * elapsed + 1 for elapsed, depth in samples), samples


def start_replay(topology: Topology, *extra: str, url: str = AMQP_URL) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "CONSUMER_AMQP_URL": url,
        "CONSUMER_QUEUE": topology.queue,
        "CONSUMER_EXCHANGE": topology.exchange,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "consumer", "dlq", "replay", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def test_kill_9_at_random_points_loses_nothing(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """`kill -9` of a replay at random points, three times, then a replay to the end: every
    dead letter is in the work queue, at most one duplicate per kill, none left behind."""
    total, kills = 300, 3
    await seed_many(amqp, topology, total)
    rng = random.Random()
    moved_so_far = 0

    async def depth() -> int:
        declared = await channel.declare_queue(topology.queue, passive=True)
        return declared.declaration_result.message_count or 0

    for _ in range(kills):
        target = moved_so_far + rng.randint(5, (total - moved_so_far) // 4)
        process = start_replay(topology, "--rate", "300")
        try:
            await wait_until(lambda target=target: depth_is_at_least(depth, target), timeout=60)
        finally:
            process.send_signal(signal.SIGKILL)
            process.wait(10)
        moved_so_far = await depth()
    finisher = start_replay(topology)
    out, err = finisher.communicate(timeout=120)
    assert finisher.returncode == 0, out + err

    replayed = Counter(keys(await drain_queue(channel, topology.queue)))
    assert set(replayed) == set(range(total))  # nothing lost
    duplicates = sum(count - 1 for count in replayed.values())
    assert duplicates <= kills
    assert await drain_queue(channel, topology.dead_letter_queue) == []


async def depth_is_at_least(depth: Any, wanted: int) -> bool:
    return bool(await depth() >= wanted)


async def test_a_session_sees_the_queue_as_it_was_when_it_began(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """Dead letters that arrive during a pass are left for the next one; every message is
    still there afterwards."""
    await seed(amqp, topology, SAMPLES[:3])
    async with session(topology) as dlq:
        first = await look(dlq, Filter(), 1)
        await seed(amqp, topology, SAMPLES[3:5])
        rest = await look(dlq, Filter(), None)
        assert isinstance(dlq, DlqSession)
        assert dlq.scan.expected == 3
    assert [info.event_id for info in first + rest] == ["evt_0", "evt_1", "evt_2"]
    # Looking moves each to the back: the late ones land among the kept copies, none is lost.
    assert keys(await drain_queue(channel, topology.dead_letter_queue)) == [0, 3, 4, 1, 2]


# ── the command line, as an operator or a script runs it ─────────────────────────────────────


def dlq_cli(
    topology: Topology, *args: str, url: str = AMQP_URL
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "CONSUMER_AMQP_URL": url,
        "CONSUMER_QUEUE": topology.queue,
        "CONSUMER_EXCHANGE": topology.exchange,
    }
    return run_cli("dlq", *args, env=env)


async def test_cli_stats_list_and_dry_run_for_people_and_scripts(
    amqp: AbstractConnection, topology: Topology
) -> None:
    """`stats --json` and `list --json` parse as JSON with the right figures; the tables name
    every dead letter; a dry run prints what would move; all exit 0."""
    await seed(amqp, topology, SAMPLES)
    stats = dlq_cli(topology, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    figures = json.loads(stats.stdout)
    assert figures["total"] == len(SAMPLES)
    assert figures["by_reason"]["rejected_by_vercel"] == 3
    assert figures["by_status"]["404"] == 1
    listed = dlq_cli(topology, "list", "--json", "--type", "billing.*")
    assert [row["event_id"] for row in json.loads(listed.stdout)] == ["evt_2", "evt_5"]
    table = dlq_cli(topology, "list")
    assert all(f"evt_{sample.key} " in table.stdout for sample in SAMPLES)
    assert "all are still in the DLQ" in table.stdout
    dry = dlq_cli(topology, "replay", "--dry-run", "--reason", "no_credentials")
    assert dry.returncode == 0, dry.stderr
    assert "would move 2" in dry.stdout
    assert "evt_5" in dry.stdout


async def test_cli_replay_reports_a_summary_and_fails_when_a_message_failed(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """`replay --json` prints only JSON on stdout; when a message could not be re-published
    the exit status is 1 and the message is still in the DLQ."""
    await seed(amqp, topology, SAMPLES[:3])
    result = dlq_cli(topology, "replay", "--json", "--type", "resource.*")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["moved"] == 2  # progress lines, if any, go to stderr
    await channel.exchange_delete(topology.exchange)  # --to-origin now has nowhere to go
    failing = dlq_cli(topology, "replay", "--to-origin")
    assert failing.returncode == 1
    assert "failed 1" in failing.stdout
    assert "still in the DLQ" in failing.stdout
    assert keys(await drain_queue(channel, topology.dead_letter_queue)) == [2]


async def test_cli_purge_needs_a_yes_then_export_and_import_round_trip(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology, tmp_path: Path
) -> None:
    """Without --yes and without a terminal, purge refuses (exit 2) and deletes nothing; with
    --yes it prints what it deletes, exports it, and `import` puts it back."""
    await seed(amqp, topology, SAMPLES)
    refused = dlq_cli(topology, "purge", "--reason", "invalid_message")
    assert refused.returncode == 2
    assert "--yes" in refused.stderr
    export = tmp_path / "purged.jsonl"
    purged = dlq_cli(
        topology, "purge", "--reason", "invalid_message", "--yes", "--export", str(export)
    )
    assert purged.returncode == 0, purged.stderr
    assert "evt_1" in purged.stdout
    assert "deleted 1 dead letters" in purged.stdout
    again = dlq_cli(topology, "purge", "--yes", "--export", str(export))
    assert again.returncode == 2  # never overwrites an export
    restored = dlq_cli(topology, "import", str(export))
    assert restored.returncode == 0, restored.stderr
    assert "imported 1 of 1" in restored.stdout
    remaining = await drain_queue(channel, topology.dead_letter_queue)
    assert keys(remaining) == [0, 2, 3, 4, 5, 6, 7, 1]  # the import goes to the back


async def test_cli_reads_exports_replays_and_purges_headers_nested_as_deep_as_a_frame_allows(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology, tmp_path: Path
) -> None:
    """A dead letter whose headers nest 1,200 tables deep (the delivery limit used to bring
    such a message here, undecodable) and one nested as deep as a 131,072-byte frame allows
    (26,000 arrays or so) used to stop every dlq command at RecursionError, exit 1. Now each
    command counts them and exits 0; looking keeps them byte for byte; the export holds them
    (packed, `$amqp`), `import` puts them back; purge removes one, replay moves the other with
    its header whole."""
    deep_sample, deepest_sample, plain = SAMPLES[0], SAMPLES[1], SAMPLES[2]

    def with_header(sample: Sample, value: DeepValue) -> aio_pika.Message:
        message = sample.message(topology)
        message.headers = {**message.headers, "deep": value}
        return message

    deep = nested(1200, tables=True)
    deepest = nested(deepest_fitting(lambda value: with_header(deepest_sample, value)))
    publisher = await amqp.channel(publisher_confirms=True)
    for message in (with_header(deep_sample, deep), with_header(deepest_sample, deepest)):
        await publisher.default_exchange.publish(message, topology.dead_letter_queue)
    await seed(amqp, topology, [plain])

    stats = dlq_cli(topology, "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["total"] == 3
    listed = dlq_cli(topology, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [row["reason"] for row in json.loads(listed.stdout)] == [
        "no_credentials",
        "invalid_message",
        "rejected_by_vercel",
    ]
    export = tmp_path / "deep.jsonl"
    purged = dlq_cli(topology, "purge", "--yes", "--export", str(export))
    assert purged.returncode == 0, purged.stderr
    assert "deleted 3 dead letters" in purged.stdout
    first, second, _ = (decode_line(line, number=1) for line in export.read_bytes().splitlines())
    assert pamqp.encode.encode_table_value(first.headers["deep"]) == deep.raw
    assert pamqp.encode.encode_table_value(second.headers["deep"]) == deepest.raw
    assert b'"$amqp"' in export.read_bytes()

    restored = dlq_cli(topology, "import", str(export))
    assert restored.returncode == 0, restored.stderr
    assert "imported 3 of 3" in restored.stdout
    removed = dlq_cli(topology, "purge", "--yes", "--reason", "invalid_message")
    assert removed.returncode == 0, removed.stderr
    assert "deleted 1 dead letters" in removed.stdout
    replayed = dlq_cli(topology, "replay", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["moved"] == 2
    moved = await drain_queue(channel, topology.queue)
    assert keys(moved) == [0, 2]
    assert pamqp.encode.encode_table_value(moved[0].headers["deep"]) == deep.raw
    assert await drain_queue(channel, topology.dead_letter_queue) == []


@pytest.mark.parametrize(
    ("args", "status", "says"),
    [
        (("list", "--status", "4o4"), 2, "--status"),
        (("list", "--reason", "no_credential"), 2, "expected one of"),
        (("list", "--since", "last tuesday"), 2, "ISO 8601"),
        (("replay", "--rate", "0"), 2, "must be more than 0"),
        (("import", "/nonexistent/export.jsonl"), 2, "cannot read"),
    ],
)
def test_cli_bad_usage_exits_2_with_one_line(
    args: tuple[str, ...], status: int, says: str, names: dict[str, str]
) -> None:
    """Wrong flags or files end with status 2 and a message, before touching the broker."""
    result = dlq_cli(Topology(names["exchange"], names["queue"], ()), *args)
    assert result.returncode == status
    assert says in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.broker
def test_cli_broker_trouble_exits_1_with_a_clear_message(names: dict[str, str]) -> None:
    """An unreachable broker and a missing DLQ each end with status 1 and say which."""
    topology = Topology(names["exchange"], names["queue"], ())
    unreachable = dlq_cli(topology, "stats", url="amqp://guest:guest@127.0.0.1:1/")
    assert unreachable.returncode == 1
    assert "127.0.0.1:1" in unreachable.stderr
    missing = dlq_cli(topology, "replay")
    assert missing.returncode == 1
    assert f"queue {names['queue']}.dlq does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr + unreachable.stderr


async def test_looking_never_counts_a_delivery(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """25 looks (more than RabbitMQ 4's default delivery limit of 20) leave each dead letter
    as if never delivered: every look settles a copy, nothing is handed back to be counted."""
    await seed(amqp, topology, SAMPLES[:2])
    for _ in range(25):
        async with session(topology) as dlq:
            await look(dlq, Filter(), None)
    remaining = await consume(channel, topology.dead_letter_queue, 2)
    assert [(m.headers or {}).get("x-delivery-count", 0) for m in remaining] == [0, 0]
    assert snapshot(remaining) == (await reference(amqp, topology))[:2]


async def test_a_look_clears_what_earlier_releases_counted(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """A dead letter that earlier releases' commands handed back 5 times (count 5) comes out
    of one look with no count at all, the rest of it unchanged."""
    await seed(amqp, topology, SAMPLES[:1])
    for _ in range(5):  # what a command of today's release did: hold, then close the channel
        holder = await amqp.channel()
        queue = await holder.get_queue(topology.dead_letter_queue, ensure=False)
        assert await queue.get(no_ack=False, fail=False) is not None
        await holder.close()
    async with session(topology) as dlq:
        await look(dlq, Filter(), None)
    [kept] = await consume(channel, topology.dead_letter_queue, 1)
    assert (kept.headers or {}).get("x-delivery-count", 0) == 0
    assert snapshot([kept]) == (await reference(amqp, topology))[:1]


@contextlib.asynccontextmanager
async def own_topology(
    url: str, names: dict[str, str], *, as_earlier_release: bool = False
) -> AsyncIterator[tuple[AbstractConnection, AbstractChannel, Topology]]:
    """The relay's topology on the broker at `url`, with a connection and a channel to it;
    deleted afterwards. `as_earlier_release`: its DLQ as the release before delivery limits
    declared it, the one a broker may drop from."""
    connection = await aio_pika.connect(url)
    topology = Topology(names["exchange"], names["queue"], ())
    channel = await connection.channel()
    if as_earlier_release:  # no delivery limit on the DLQ: 4.x drops at its 21st return
        await channel.declare_queue(topology.dead_letter_queue, durable=True, arguments=QUORUM)
    await declare(channel, topology)
    try:
        yield connection, channel, topology
    finally:
        await channel.queue_delete(topology.queue)
        await channel.queue_delete(topology.dead_letter_queue)
        await channel.exchange_delete(topology.exchange)
        await connection.close()


def close_connections_named(broker: PrivateBroker, name: str) -> None:
    """Close, from the broker's side, the connections whose client called itself `name`."""
    listing = broker.ctl("-s", "list_connections", "pid", "client_properties").stdout
    for line in listing.splitlines():
        if f'{{"connection_name","{name}"}}' in line:
            broker.ctl("close_connection", line.split("\t")[0], "test: connection dropped")


async def test_losing_the_broker_mid_replay_stops_it_and_loses_nothing(
    private_broker: PrivateBroker, names: dict[str, str]
) -> None:
    """When the broker drops the connection half-way, the replay stops with a reason (not a
    traceback), and every dead letter is in the work queue or back in the DLQ."""
    async with own_topology(private_broker.url, names) as (connection, channel, topology):
        name = f"dlq-test-{names['queue']}"
        await seed_many(connection, topology, 60)

        async def run() -> Any:
            async with locked_session(
                private_broker.url, topology.dead_letter_queue, wait=5, name=name, notify=print
            ) as dlq:
                return await replay(dlq, Filter(), ReplayOptions(topology.queue, rate=30), quiet)

        async def depth() -> int:
            declared = await channel.declare_queue(topology.queue, passive=True)
            return declared.declaration_result.message_count or 0

        task = asyncio.create_task(run())
        await wait_until(lambda: depth_is_at_least(depth, 5))
        close_connections_named(private_broker, name)
        summary = await task
        assert summary.aborted is not None
        assert "still in the DLQ" in summary.aborted
        moved = Counter(keys(await drain_queue(channel, topology.queue)))
        left = Counter(keys(await drain_queue(channel, topology.dead_letter_queue)))
        assert set(moved) | set(left) == set(range(60))
        assert sum((moved & left).values()) <= 1  # at most the one in flight, doubled


# ── RabbitMQ 4: dead letters survive any number of looks (issue 10) ────────────────────────

# The look test runs on the broker of the pass (TEST_BROKER_VERSION): scripts/test runs it on
# 3.10 and on 4.0, the one that drops a quorum queue's message after 20 returns.
LOOKS = 100


def counted(messages: list[AbstractIncomingMessage]) -> Counter[str]:
    """The messages as a multiset of their snapshots (what must survive, byte for byte)."""
    return Counter(repr(entry) for entry in snapshot(messages))


async def interrupted_replay(topology: Topology, url: str, rng: random.Random) -> None:
    """A replay that matches nothing (so every dead letter is looked at and kept), stopped at a
    random moment by SIGKILL or SIGINT."""
    process = start_replay(topology, "--installation", "icfg_nobody", url=url)
    await asyncio.sleep(rng.uniform(0.3, 1.5))
    process.send_signal(rng.choice([signal.SIGKILL, signal.SIGINT]))
    process.communicate(timeout=30)


async def test_dead_letters_survive_100_looks(names: dict[str, str]) -> None:
    """`dlq stats`, `dlq list` and replays killed at random points, 100 runs in a row, keep
    every dead letter byte for byte (ours, a broker-made one, one that is not JSON), each
    delivered at most once since its last look: on RabbitMQ 4.0 the default delivery limit of
    20 would otherwise drop them. (A kill between a copy's confirm and its original's ack
    leaves that one twice: at-least-once, never lost.) The DLQ is declared as the earlier
    release did, without a delivery limit, so that the tool alone is what keeps them."""
    url = AMQP_URL
    async with own_topology(url, names, as_earlier_release=True) as (
        connection,
        channel,
        topology,
    ):
        scratch = await channel.declare_queue(exclusive=True)
        await seed(connection, topology, SAMPLES, into=scratch.name)
        expected = counted(await drain_queue(channel, scratch.name))
        await seed(connection, topology, SAMPLES)
        rng = random.Random()
        for run in range(LOOKS):
            if run % 3 == 2:
                await interrupted_replay(topology, url, rng)
                continue
            result = dlq_cli(topology, "stats" if run % 3 == 0 else "list", url=url)
            assert result.returncode == 0, result.stderr
        kept = await drain_queue(channel, topology.dead_letter_queue)
        assert set(counted(kept)) == set(expected)  # every one, byte for byte, none lost
        doubled = len(kept) - len(SAMPLES)  # a kill between a copy's confirm and its ack
        assert doubled <= LOOKS // 3
        assert all((m.headers or {}).get("x-delivery-count", 0) <= 1 for m in kept)
        kept_all = f"{len(SAMPLES)} of {len(SAMPLES)} kept"
        print(f"RabbitMQ {VERSION.value}: {LOOKS} looks, {kept_all}, {doubled} doubled")


# ── memory (issue 11) ────────────────────────────────────────────────────────────────────────

BIG_BODY = 250 * 1024
PEAK_RSS_LIMIT_MB = 100  # the replay Job's limit is 128Mi; the whole DLQ here is 73 MiB


# Runs the command and prints its peak RSS. Measured from a small wrapper, not from pytest:
# Linux starts a forked child's high-water mark at its parent's resident size.
MEASURE = """
import resource, subprocess, sys
result = subprocess.run([sys.executable, "-m", "consumer", "dlq", *sys.argv[1:]],
                        stdout=subprocess.DEVNULL, stderr=sys.stderr)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.exit(result.returncode)
"""


def peak_rss_mb(topology: Topology, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    """Run `python -m consumer dlq ARGS` and measure its peak resident memory (MiB)."""
    env = {
        **os.environ,
        "CONSUMER_AMQP_URL": AMQP_URL,
        "CONSUMER_QUEUE": topology.queue,
        "CONSUMER_EXCHANGE": topology.exchange,
    }
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return int(result.stdout.strip() or 0) / 1024, result


async def test_commands_run_in_bounded_memory(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology, tmp_path: Path
) -> None:
    """300 dead letters of 250 KiB (73 MiB): stats, a full replay dry run, a purge with an
    export and the import back each peak below 100 MiB (they once held the whole DLQ: 131
    MB), and nothing is lost."""
    publisher = await amqp.channel(publisher_confirms=True)
    for key in range(300):
        body = orjson.dumps({"id": f"evt_{key}", "pad": "x" * BIG_BODY})
        await publisher.default_exchange.publish(
            aio_pika.Message(body, message_id=f"evt_{key}", headers={"dead-letter-reason": "x"}),
            routing_key=topology.dead_letter_queue,
        )
    export = tmp_path / "big.jsonl"
    peaks = {}
    for name, args in {
        "stats": ("stats",),
        "replay --dry-run": ("replay", "--dry-run"),
        "purge --export": ("purge", "--yes", "--export", str(export)),
        "import": ("import", str(export)),
    }.items():
        peaks[name], result = peak_rss_mb(topology, *args)
        assert result.returncode == 0, result.stderr
    print(f"peak RSS (MiB): {peaks}")
    assert max(peaks.values()) < PEAK_RSS_LIMIT_MB, peaks
    assert sorted(keys(await drain_queue(channel, topology.dead_letter_queue))) == list(range(300))


async def test_cli_import_of_a_bad_file_publishes_nothing(
    channel: AbstractChannel, topology: Topology, tmp_path: Path
) -> None:
    """A file whose second record has priority 1000, and /dev/zero, each end with exit 2 and
    one sentence, no traceback, and nothing published (a rerun cannot duplicate)."""
    good = orjson.dumps(
        {"format": "vercel-consumer.dlq-export.v1", "body_base64": "e30=", "properties": {}}
    )
    bad = orjson.dumps(
        {
            "format": "vercel-consumer.dlq-export.v1",
            "body_base64": "e30=",
            "properties": {"priority": 1000},
        }
    )
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + b"\n" + bad + b"\n")
    for file, says in ((str(path), "record 2 cannot be published"), ("/dev/zero", "longer than")):
        result = dlq_cli(topology, "import", file)
        assert result.returncode == 2, result.stderr
        assert says in result.stderr
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert await drain_queue(channel, topology.dead_letter_queue) == []


async def test_a_slow_paced_replay_outlives_the_consumer_timeout(
    private_broker: PrivateBroker, names: dict[str, str]
) -> None:
    """With the broker's consumer timeout at 2 s, a replay paced at one message per 4 s finishes
    (it once held every dead letter from its start, and the broker closed its channel): no
    message is in hand while it waits. Both matches move; the rest stay, all of them."""
    private_broker.ctl(
        "eval",
        "application:set_env(rabbit, consumer_timeout, 2000), "
        "application:set_env(rabbit, channel_tick_interval, 500).",
    )
    async with own_topology(private_broker.url, names) as (connection, channel, topology):
        try:
            await seed(connection, topology, SAMPLES[:6])  # evt_0 and evt_5 are no_credentials
            result = dlq_cli(
                topology,
                "replay",
                "--reason",
                "no_credentials",
                "--rate",
                "0.25",
                url=private_broker.url,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            assert "moved 2" in result.stdout
            assert keys(await drain_queue(channel, topology.queue)) == [0, 5]
            assert keys(await drain_queue(channel, topology.dead_letter_queue)) == [1, 2, 3, 4]
        finally:
            private_broker.ctl(
                "eval",
                "application:set_env(rabbit, consumer_timeout, 1800000), "
                "application:set_env(rabbit, channel_tick_interval, 60000).",
            )


async def test_a_dead_letter_the_broker_made_is_listed_and_replayed(
    names: dict[str, str],
) -> None:
    """The work queue dead-letters a message returned past its delivery limit by itself (only
    `x-death`, none of our headers): `dlq list` shows it as delivery_limit with its origin, and
    replay puts it back in the work queue with its body intact and no broker history."""
    url = AMQP_URL
    async with own_topology(url, names) as (_, channel, topology):
        body = orjson.dumps(event(installation_id="icfg_alpha"))
        exchange = await channel.get_exchange(topology.exchange, ensure=False)
        await exchange.publish(aio_pika.Message(body, message_id="evt_b"), "resource.renamed")
        work = await channel.get_queue(topology.queue, ensure=False)
        for _ in range(WORK_QUEUE_DELIVERY_LIMIT + 5):  # past its limit: the broker gives up
            message = await work.get(no_ack=False, fail=False)
            if message is None:
                break
            await message.nack(requeue=True)
        listed = dlq_cli(topology, "list", "--json", url=url)
        assert listed.returncode == 0, listed.stderr
        [row] = json.loads(listed.stdout)
        expected = ("delivery_limit", json.loads(body)["id"], "resource.renamed")
        assert (row["reason"], row["event_id"], row["type"]) == expected
        replayed = dlq_cli(topology, "replay", "--reason", "delivery_limit", url=url)
        assert replayed.returncode == 0, replayed.stdout + replayed.stderr
        [back] = await consume(channel, topology.queue, 1)
        assert back.body == body
        assert not any(name.startswith("x-") for name in back.headers or {})
        assert (back.headers or {})["original-exchange"] == topology.exchange


async def test_an_import_cut_off_half_way_says_where_to_resume(
    private_broker: PrivateBroker, names: dict[str, str], tmp_path: Path
) -> None:
    """When the broker drops the connection during an import, the summary says how far it got;
    a rerun with that --skip completes the DLQ with at most the one record in flight twice."""
    async with own_topology(private_broker.url, names) as (_, channel, topology):
        total = 2000
        export = tmp_path / "many.jsonl"
        export.write_bytes(
            b"".join(
                encode_line(ExportedMessage(b"{}", {"message_id": f"evt_{key}", "headers": {}}))
                for key in range(total)
            )
        )
        name = f"dlq-import-{names['queue']}"

        async def depth() -> int:
            declared = await channel.declare_queue(topology.dead_letter_queue, passive=True)
            return declared.declaration_result.message_count or 0

        task = asyncio.create_task(
            import_export(
                private_broker.url,
                topology.dead_letter_queue,
                export,
                skip=0,
                name=name,
                make_progress=quiet,
            )
        )
        await wait_until(lambda: depth_is_at_least(depth, 50))
        close_connections_named(private_broker, name)
        first = await task
        assert first.error is not None
        assert f"--skip {first.imported}" in describe_import(first, topology.dead_letter_queue)
        rest = await import_export(
            private_broker.url,
            topology.dead_letter_queue,
            export,
            skip=first.imported,
            name=name,
            make_progress=quiet,
        )
        assert rest.error is None
        restored = Counter(keys(await drain_queue(channel, topology.dead_letter_queue)))
        assert set(restored) == set(range(total))  # nothing lost
        assert sum(restored.values()) - total <= 1


async def test_a_limited_purge_keeps_the_rest_in_order(
    amqp: AbstractConnection, channel: AbstractChannel, topology: Topology
) -> None:
    """`purge --limit 1` deletes the first match only; every other dead letter stays, in its
    order."""
    await seed(amqp, topology, SAMPLES)

    async def confirm(infos: list[DeadLetterInfo]) -> bool:
        return True

    async with session(topology) as dlq:
        summary = await purge(
            dlq, Filter(reason="rejected_by_vercel"), limit=1, export=None, confirm=confirm
        )
    assert summary.deleted == 1
    left = keys(await drain_queue(channel, topology.dead_letter_queue))
    assert left == [sample.key for sample in SAMPLES if sample.key != 2]
