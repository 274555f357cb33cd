"""Memory stays bounded by design: the broker refuses what is too big to hold (its
`max_message_size`), and what it lets through costs a worker at most CONSUMER_CONCURRENCY
bodies, plus one copy at a time of an oversized one. Measured on a worker process (its peak
resident set, VmHWM) on the private node, whose `max_message_size` this test sets."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import aio_pika
import aiormq
import pytest

from consumer.retry import RetryPolicy
from consumer.settings import Settings
from consumer.testing.vercel_sim import VercelSimulator
from consumer.topology import Topology
from tests.brokers import PrivateBroker
from tests.chaos import WorkerProcess, worker_env
from tests.helpers import wait_until

MIB = 1024 * 1024
MAX_MESSAGE_SIZE = MIB  # what docs/operations.md tells operators to set
CHART_MEMORY_LIMIT = 256 * MIB  # deploy/helm: resources.limits.memory
BROKER_DEFAULT = 128 * MIB  # RabbitMQ 3.8+'s own max_message_size


@pytest.fixture
def capped_broker(private_broker: PrivateBroker) -> Iterator[PrivateBroker]:
    """The private node with `max_message_size` = 1 MiB (for channels opened from now on)."""
    private_broker.ctl("eval", f"application:set_env(rabbit, max_message_size, {MIB}).")
    yield private_broker
    private_broker.ctl("eval", f"application:set_env(rabbit, max_message_size, {BROKER_DEFAULT}).")


def peak_rss(pid: int) -> int:
    """The process's peak resident set size in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc status")


async def test_big_messages_are_refused_and_the_rest_fit_the_charts_memory_limit(
    capped_broker: PrivateBroker, sim: VercelSimulator, tokens_dir: Path, tmp_path: Path
) -> None:
    """With `max_message_size` at 1 MiB a 100 MB message never enters the broker (the
    publisher's channel is closed with PRECONDITION_FAILED), so it cannot crash-loop the
    workers as it did (559 MB peak against the chart's 256Mi). 64 messages of almost 1 MiB,
    oversized for the worker's 256 KiB limit and all prefetched at once, are dead-lettered
    byte for byte while the worker's peak stays under the chart's limit, and grows by the 64
    bodies and not much more: their dead-letter copies are made one at a time (64 at once took
    the worker from 55 to 184 MiB; now about 120)."""
    suffix = uuid.uuid4().hex[:10]
    exchange, queue = f"mem-events-{suffix}", f"mem-q-{suffix}"
    env = worker_env(
        amqp_url=capped_broker.url,
        vercel_api_url=sim.url,
        vercel_tokens_dir=tokens_dir,
        exchange=exchange,
        queue=queue,
        concurrency=64,
        max_body_bytes=256 * 1024,
    )
    worker = WorkerProcess(env, tmp_path / "worker.log")
    worker.start()
    connection = await aio_pika.connect(capped_broker.url)
    try:
        await worker.wait_consuming()
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
            await target.publish(aio_pika.Message(b"x" * (100 * MIB)), routing_key="resource.big")
        channel = await connection.channel(publisher_confirms=True)
        target = await channel.get_exchange(exchange)
        body = b"x" * (MAX_MESSAGE_SIZE - 4096)
        assert worker.process is not None
        idle = peak_rss(worker.process.pid)
        await worker.stop()  # it declared the topology; now all 64 wait for its next start
        for _ in range(64):
            await target.publish(aio_pika.Message(body), routing_key="resource.big")
        worker.start()
        dlq = await channel.declare_queue(f"{queue}.dlq", passive=True)

        async def all_dead_lettered() -> bool:
            declared = await channel.declare_queue(dlq.name, passive=True)
            return declared.declaration_result.message_count == 64

        await wait_until(all_dead_lettered, timeout=120, interval=0.5)
        peak = peak_rss(worker.process.pid)
        print(f"worker peak RSS {peak / MIB:.0f} MiB ({idle / MIB:.0f} MiB idle) for 64 x 1 MiB")
        assert peak < CHART_MEMORY_LIMIT
        # The 64 bodies, and copies of them one at a time: 64 copies at once made it 2x.
        assert peak - idle < 1.5 * 64 * MAX_MESSAGE_SIZE
        letter = await dlq.get(no_ack=True)
        assert letter.body == body
        assert (letter.headers or {})["dead-letter-reason"] == "invalid_message"
    finally:
        await worker.stop()
        cleanup = await connection.channel()
        topology = Topology(exchange, queue, RetryPolicy(Settings().retry_delays, 1).tiers_ms)
        for name in (queue, topology.dead_letter_queue):
            await cleanup.queue_delete(name)
        for delay_ms in topology.retry_tiers_ms:
            await cleanup.queue_delete(topology.retry_queue(delay_ms))
        await cleanup.exchange_delete(exchange)
        await connection.close()
