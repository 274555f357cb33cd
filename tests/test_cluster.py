"""Failover on a three-node RabbitMQ cluster: two workers, the work queue's leader node stopped
and brought back, then the node a worker is connected to; nothing is lost.

The cluster (tests/brokers.py `BrokerCluster`, ports TEST_CLUSTER_BROKER_PORT..+2, default
5691-5693) is made of nodes of the selected version (TEST_BROKER_VERSION: 3.10, or 4.0 in the
chroot); it is started once per session, and left running if it already was. The `cluster`
fixture marks the test `broker`, so scripts/test runs it on both versions.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from consumer.testing.vercel_sim import VercelSimulator
from tests.brokers import VERSION, BrokerCluster, PrivateBroker
from tests.chaos import CHAOS_TOKENS, Scenario, WorkerProcess
from tests.helpers import wait_until

CLUSTER_PORT = int(os.environ.get("TEST_CLUSTER_BROKER_PORT", "5691"))
OUTAGE = 10.0  # seconds a stopped node stays down


@pytest.fixture(scope="module")
def cluster() -> Iterator[BrokerCluster]:
    made = BrokerCluster(CLUSTER_PORT, version=VERSION)
    was_running = all(node.is_ready() for node in made.nodes)
    made.start()
    yield made
    if not was_running:
        made.stop()


async def test_two_workers_survive_losing_the_leader_and_their_own_node(
    cluster: BrokerCluster, tmp_path: Path
) -> None:
    """3,000 events, two workers given the node list in different orders (so one starts on
    node 1, the other on node 2). Mid-stream the node leading the work queue stops for 10 s,
    then the node worker A is connected to: each worker that lost its node consumes again
    through another node while that node is still down, and every event is delivered."""
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.3) as sim,
        Scenario(cluster.url(0), sim, tmp_path, concurrency=16) as scenario,
    ):
        await scenario.publish(3000)
        workers = {"A": scenario.worker(cluster.urls(0)), "B": scenario.worker(cluster.urls(1))}
        for worker in workers.values():
            worker.start()
            await worker.wait_consuming()
        await wait_until(lambda: len(sim.accepted) >= 500, timeout=120)
        leader = await asyncio.to_thread(cluster.queue_leader, scenario.queue)
        await _outage(leader, workers)
        await wait_until(lambda: len(sim.accepted) >= 1500, timeout=120)
        own = cluster.node_of(_broker(workers["A"]))
        await _outage(own, workers)
        report = await scenario.finish("cluster: leader node, then a worker's node, 10 s each")
    print(
        f"\n{'worker':<8}{'delivered':>10}{'dead':>6}{'ack lost':>9}{'skipped':>9}"
        f"{'not consuming (s)':>19}"
    )
    for name, worker in workers.items():
        gaps = _not_consuming(worker)
        print(
            f"{name:<8}{worker.count('delivered'):>10}{worker.count('dead_lettered'):>6}"
            f"{worker.count('ack failed; message will be redelivered'):>9}"
            f"{worker.count('redelivery_skipped'):>9}"
            f"{' + '.join(f'{g:.1f}' for g in gaps) or '0':>19}"
        )
    print(
        f"published={report.published} lost={report.lost}"
        f" extra Vercel requests={report.extra_deliveries}"
    )
    assert report.dead_lettered == {}
    assert report.delivered == report.published
    assert all(worker.count("delivered") > 0 for worker in workers.values())


async def _outage(node: PrivateBroker, workers: dict[str, WorkerProcess]) -> None:
    """Stop `node` for OUTAGE s. Each worker it served must consume again, through another
    node, before `node` is back."""
    served = [w for w in workers.values() if _broker(w).endswith(f":{node.port}")]
    sessions = {id(w): w.count("consuming") for w in served}
    await asyncio.to_thread(node.stop)
    print(f"\nstopped {node.node}; it served {len(served)} worker(s)")
    for worker in served:
        await worker.wait_consuming(sessions=sessions[id(worker)] + 1, timeout=OUTAGE)
        assert not _broker(worker).endswith(f":{node.port}")
    await asyncio.sleep(max(0.0, OUTAGE - 1))
    await asyncio.to_thread(node.start)


def _broker(worker: WorkerProcess) -> str:
    """`host:port` of the node the worker consumed through last."""
    return str(worker.events("consuming")[-1].get("broker", ""))


def _not_consuming(worker: WorkerProcess) -> list[float]:
    """Seconds from each `broker unavailable` to the next `consuming`, from the log."""
    gaps, since = [], None
    for entry in worker.events():
        moment = datetime.fromisoformat(str(entry.get("timestamp")))
        if entry.get("event") == "broker unavailable" and since is None:
            since = moment
        elif entry.get("event") == "consuming" and since is not None:
            gaps.append((moment - since).total_seconds())
            since = None
    return gaps
