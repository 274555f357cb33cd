"""Replay N dead letters with `vercel-consumer dlq replay`, optionally killed (-9) on the way,
and count what arrived: moved, lost, duplicated.

    python bench/dlq_replay_bench.py [--messages 10000] [--kills K] [--rate R] [--json FILE]

How: a fresh topology (`bench-dlq-<uuid>` exchange, work queue, DLQ) is declared and N dead
letters (valid `no_credentials` events with ids dlq_0 … dlq_<N-1>, headers as the worker writes
them) are published to the DLQ with confirms. Then `dlq stats` and `dlq list --json` are timed
once each (inspection of the full DLQ), and `dlq replay` runs as an operator would run it: a
separate process, all of the DLQ to the work queue. With `--kills K`, the replay is killed with
SIGKILL K times, each time once the work queue has grown by a random amount, and restarted;
the last run goes to the end. Nothing consumes the work queue meanwhile. Afterwards both queues
are read to the last message and every id is counted:

- moved: distinct ids in the work queue;
- lost: ids in neither queue (must be 0);
- duplicated: copies beyond the first in the work queue (at most one per kill by design);
- left in the DLQ: ids still there (0 when the last run completed).

`seconds` is wall time from the first replay process's start to the last one's exit, process
start-up (about half a second of imports) included. Queues and exchange are deleted at the end.
Timing is noisy on a shared machine: say so when quoting it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractConnection

from consumer.topology import Topology, declare

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
PUBLISH_BATCH = 500
READ_IDLE = 2.0  # seconds without a delivery after which a queue counts as read to the end


@dataclass
class Result:
    messages: int
    kills: int
    rate: float | None
    seconds: float
    moved: int
    lost: int
    duplicated: int
    left_in_dlq: int
    stats_seconds: float
    list_seconds: float
    seed_seconds: float


def dead_letter(key: int, topology: Topology) -> aio_pika.Message:
    body = {
        "id": f"dlq_{key}",
        "type": "resource.renamed",
        "occurred_at": "2026-11-26T10:00:00Z",
        "installation_id": f"icfg_{key % 50}",
        "resource_id": f"res_{key}",
    }
    headers: dict[str, Any] = {
        "dead-letter-reason": "no_credentials",
        "dead-letter-detail": f"no access token for installation icfg_{key % 50}",
        "delivery-attempts": 1,
        "first-attempt-at": "2026-11-26T10:00:00.000Z",
        "dead-lettered-at": "2026-11-26T10:00:01.000Z",
        "original-exchange": topology.exchange,
        "original-routing-key": "resource.renamed",
    }
    return aio_pika.Message(
        orjson.dumps(body),
        headers=headers,
        message_id=f"dlq_{key}",
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )


async def seed(channel: AbstractChannel, topology: Topology, count: int) -> float:
    started = time.perf_counter()
    for start in range(0, count, PUBLISH_BATCH):
        await asyncio.gather(
            *(
                channel.default_exchange.publish(
                    dead_letter(key, topology), routing_key=topology.dead_letter_queue
                )
                for key in range(start, min(start + PUBLISH_BATCH, count))
            )
        )
    return time.perf_counter() - started


async def depth(channel: AbstractChannel, queue: str) -> int:
    declared = await channel.declare_queue(queue, passive=True)
    return declared.declaration_result.message_count or 0


async def read_ids(connection: AbstractConnection, queue: str) -> Counter[str]:
    """Every message id in `queue`, taken (acked) with a consumer until it is idle."""
    channel = await connection.channel()
    await channel.set_qos(prefetch_count=1000)
    inbox: asyncio.Queue[str] = asyncio.Queue()
    declared = await channel.get_queue(queue, ensure=False)

    async def take(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        await message.ack()
        await inbox.put(message.message_id or "")

    await declared.consume(take)
    ids: Counter[str] = Counter()
    with contextlib.suppress(TimeoutError):
        while True:
            ids[await asyncio.wait_for(inbox.get(), READ_IDLE)] += 1
    await channel.close()
    return ids


def environment(topology: Topology) -> dict[str, str]:
    return {
        **os.environ,
        "CONSUMER_AMQP_URL": AMQP_URL,
        "CONSUMER_QUEUE": topology.queue,
        "CONSUMER_EXCHANGE": topology.exchange,
    }


async def dlq_command(topology: Topology, *args: str) -> asyncio.subprocess.Process:
    """Start `python -m consumer dlq ARGS` for this topology, its output captured."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "consumer",
        "dlq",
        *args,
        env=environment(topology),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(process: asyncio.subprocess.Process) -> str:
    out, err = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"dlq command failed ({process.returncode}): {out!r} {err!r}")
    return out.decode()


async def timed_command(topology: Topology, *args: str) -> float:
    started = time.perf_counter()
    await finish(await dlq_command(topology, *args))
    return time.perf_counter() - started


async def replay_with_kills(
    channel: AbstractChannel, topology: Topology, total: int, kills: int, rate: float | None
) -> float:
    """Run the replay, SIGKILL it `kills` times at random progress, then let it finish."""
    rng = random.Random()
    extra = ["--rate", str(rate)] if rate else []
    started = time.perf_counter()
    for _ in range(kills):
        done = await depth(channel, topology.queue)
        target = done + rng.randint(1, max(1, (total - done) // (kills + 1)))
        process = await dlq_command(topology, "replay", *extra)
        while process.returncode is None:
            if await depth(channel, topology.queue) >= target:
                break
            await asyncio.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        await process.communicate()
        print(f"  killed at work-queue depth {await depth(channel, topology.queue)}")
    summary = await finish(await dlq_command(topology, "replay", *extra))
    seconds = time.perf_counter() - started
    print(f"  last run: {summary.strip().splitlines()[0]}")
    return seconds


@contextlib.asynccontextmanager
async def bench_topology(connection: AbstractConnection) -> AsyncIterator[Topology]:
    name = f"bench-dlq-{uuid.uuid4().hex[:8]}"
    topology = Topology(name, name, ())
    channel = await connection.channel()
    await declare(channel, topology)
    try:
        yield topology
    finally:
        channel = await connection.channel()
        for queue in (topology.queue, topology.dead_letter_queue):
            await channel.queue_delete(queue)
        await channel.exchange_delete(topology.exchange)


async def run(messages: int, kills: int, rate: float | None) -> Result:
    connection = await aio_pika.connect(AMQP_URL, client_properties={"connection_name": "bench"})
    async with connection, bench_topology(connection) as topology:
        channel = await connection.channel(publisher_confirms=True)
        seed_seconds = await seed(channel, topology, messages)
        stats_seconds = await timed_command(topology, "stats")
        list_seconds = await timed_command(topology, "list", "--json")
        seconds = await replay_with_kills(channel, topology, messages, kills, rate)
        arrived = await read_ids(connection, topology.queue)
        left = await read_ids(connection, topology.dead_letter_queue)
    expected = {f"dlq_{key}" for key in range(messages)}
    return Result(
        messages=messages,
        kills=kills,
        rate=rate,
        seconds=round(seconds, 2),
        moved=len(set(arrived) & expected),
        lost=len(expected - set(arrived) - set(left)),
        duplicated=sum(arrived.values()) - len(arrived),
        left_in_dlq=len(left),
        stats_seconds=round(stats_seconds, 2),
        list_seconds=round(list_seconds, 2),
        seed_seconds=round(seed_seconds, 2),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--kills", type=int, default=0, help="SIGKILL the replay K times")
    parser.add_argument("--rate", type=float, help="--rate for the replay (default: none)")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    result = asyncio.run(run(args.messages, args.kills, args.rate))
    per_second = result.moved / result.seconds if result.seconds else 0.0
    print(
        f"replayed {result.messages} dead letters with {result.kills} kill -9: "
        f"{result.seconds} s ({per_second:.0f} msg/s), moved {result.moved}, "
        f"lost {result.lost}, duplicated {result.duplicated}, left in DLQ {result.left_in_dlq}"
    )
    print(
        f"dlq stats over the full DLQ: {result.stats_seconds} s; dlq list --json: "
        f"{result.list_seconds} s; seeding: {result.seed_seconds} s"
    )
    if args.json:
        info = {"when": datetime.now(UTC).isoformat(), "nproc": os.cpu_count()}
        args.json.write_text(json.dumps({**asdict(result), **info}, indent=2))
    sys.exit(1 if result.lost else 0)


if __name__ == "__main__":
    main()
