"""The chaos suite: real faults against real worker processes, then every event accounted for.

Each scenario publishes a few thousand events to the private broker (never the shared one),
runs `python -m consumer run` as child processes against the simulator (which adds latency),
breaks something for real, and ends with the invariant check of `tests/chaos.py`: every
published id was delivered to the simulator at least once or is in the DLQ with a reason.
Each scenario's numbers are printed (`pytest -s`) and summarised at the end of the run.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import defaultdict
from pathlib import Path

from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.brokers import PrivateBroker
from tests.chaos import CHAOS_TOKENS, Scenario, TcpProxy
from tests.helpers import wait_until


async def test_chaos_1_broker_restarted_twice_mid_stream(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """RabbitMQ is shut down and started again twice while 3,000 events flow: the worker
    reconnects each time, re-declares, resumes, and nothing is lost or dead-lettered."""
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.05) as sim,
        Scenario(private_broker.url, sim, tmp_path, concurrency=16) as scenario,
    ):
        await scenario.publish(3000)
        worker = scenario.worker()
        worker.start()
        await worker.wait_consuming()
        for restart in (1, 2):
            await wait_until(lambda n=restart: len(sim.accepted) >= n * 800, timeout=60)
            await asyncio.to_thread(private_broker.restart)
            await worker.wait_consuming(sessions=restart + 1, timeout=90)
        report = await scenario.finish("1: RabbitMQ restarted twice mid-stream")
    assert report.dead_lettered == {}
    assert worker.count("broker unavailable") >= 2


async def test_chaos_2_worker_killed_three_times(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """The worker is `kill -9`ed mid-stream and restarted, three times, while it also publishes
    retries (one installation answers 503 at first) and dead letters (invalid events): whatever
    it had not acked is redelivered, a copy published but not acked is at most a duplicate, and
    nothing is lost."""
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.05) as sim,
        Scenario(private_broker.url, sim, tmp_path, concurrency=32) as scenario,
    ):
        await scenario.publish(2900)
        invalid = await scenario.publish_invalid(100)
        sim.add_fault(Fault(status=503, installation="icfg_beta", times=600))
        worker = scenario.worker()
        worker.start()
        await worker.wait_consuming()
        for kill in (1, 2, 3):
            await wait_until(lambda n=kill: len(sim.accepted) >= n * 600, timeout=60)
            await worker.kill()
            assert worker.returncode == -signal.SIGKILL
            worker.start()
            await worker.wait_consuming()
        report = await scenario.finish("2: worker kill -9'd and restarted three times")
    assert report.dead_lettered == {"invalid_message": len(invalid)}
    assert sim.by_status["503"] == 600


async def test_chaos_3_vercel_down_for_60_seconds_dead_letters_nothing(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """Vercel answers 503 to everyone for 60 s while 3,000 events wait. Each event has three
    attempts 0.2 and 0.5 s apart, so without the circuit breaker all of them would be
    dead-lettered within seconds. The circuit opens, consumption pauses (the events wait in
    the work queue), single probes test Vercel, and once it is back everything is delivered:
    zero dead letters, and Vercel saw only the calls that opened the circuit plus the probes."""
    outage = 60.0
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.05) as sim,
        Scenario(
            private_broker.url,
            sim,
            tmp_path,
            retry_delays="0.2,0.5",
            max_attempts=3,
            breaker_probe_delays="1,2,5",
        ) as scenario,
    ):
        await scenario.publish(3000)
        sim.add_fault(Fault(status=503))
        began = time.monotonic()
        worker = scenario.worker()
        worker.start()
        await worker.wait_for("circuit open; consumption paused")
        await wait_until(lambda: time.monotonic() - began > outage / 2, timeout=outage)
        waiting = await scenario.queued()
        await wait_until(lambda: time.monotonic() - began > outage, timeout=outage)
        failed_calls = sim.by_status["503"]
        sim.clear_faults()
        await worker.wait_for("circuit closed; consumption resumes")
        report = await scenario.finish("3: Vercel 503 for 60 s")
    print(f"chaos 3: {failed_calls} calls failed in {outage:.0f} s; {waiting} events waited")
    assert report.dead_lettered == {}
    assert waiting >= 2900  # paused: the events waited in the queue, not in retry cycles
    assert failed_calls < 150  # the calls that opened it (about one window) and the probes


async def test_chaos_a_message_that_kills_every_worker_is_dead_lettered(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """A message whose processing kills the worker every time (here: its call to Vercel hangs
    and the test `kill -9`s the worker then) is redelivered by the broker after each crash;
    past CONSUMER_MAX_REDELIVERIES (2) the next worker dead-letters it as redelivery_limit
    without calling Vercel again, and the fleet goes on delivering the events behind it."""
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.01) as sim,
        Scenario(private_broker.url, sim, tmp_path, max_redeliveries=2) as scenario,
    ):
        sim.set_token("icfg_poison", "tok_poison")
        (tmp_path / "tokens" / "icfg_poison").write_text("tok_poison")
        sim.add_fault(Fault(latency=3600, installation="icfg_poison"))
        poison = await scenario.publish_for("icfg_poison", 1)
        worker = scenario.worker()
        for crash in (1, 2, 3):
            worker.start()
            await wait_until(lambda n=crash: sim.requests == n)  # its call hangs: crash now
            await worker.kill()
        worker.start()
        await worker.wait_for("dead_lettered")
        await scenario.publish(300)
        report = await scenario.finish("a message that kills every worker")
    assert report.dead_lettered == {"redelivery_limit": 1}
    assert scenario.dead_letters[0][0] == poison[0]
    assert sim.requests == 3 + 300  # the poison was not sent a fourth time


async def test_chaos_4_sigterm_during_slow_deliveries(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """SIGTERM while Vercel takes 500 ms per call and a few calls hang far longer: the worker
    stops taking messages, lets what can finish finish, exits 0 once the shutdown timeout is
    up, and leaves the hanging ones unacked; a second worker delivers the rest: nothing lost."""
    shutdown_timeout = 3.0
    hang = 30.0  # far longer than the timeout: the worker must not wait for these
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.5) as sim,
        Scenario(
            private_broker.url, sim, tmp_path, concurrency=64, shutdown_timeout=shutdown_timeout
        ) as scenario,
    ):
        await scenario.publish(2000)
        first = scenario.worker()
        first.start()
        await first.wait_consuming()
        await wait_until(lambda: len(sim.accepted) >= 300, timeout=60)
        sim.add_fault(Fault(latency=hang, times=5))
        await wait_until(lambda: sim.in_flight >= 64, timeout=20)
        signalled = time.monotonic()
        first.send(signal.SIGTERM)
        assert await first.wait_exit(hang) == 0
        took = time.monotonic() - signalled
        assert took < hang - 5, f"took {took:.1f} s: waited for deliveries past the timeout"
        assert first.count("draining") == 1
        assert first.count("shutdown timeout; leaving deliveries unacked") == 1
        assert first.count("worker stopped") == 1
        print(f"chaos 4: exited {took:.1f} s after SIGTERM (shutdown timeout {shutdown_timeout} s)")
        second = scenario.worker(concurrency=200)
        second.start()
        report = await scenario.finish("4: SIGTERM during 500 ms deliveries")
    assert report.dead_lettered == {}


async def test_chaos_5_429_storms_honour_retry_after(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """Storms of 429 with Retry-After (for everyone, then one installation): everything is
    delivered, nothing is dead-lettered, and no event comes back to Vercel before the
    Retry-After it was given has passed."""
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.02) as sim,
        Scenario(
            private_broker.url, sim, tmp_path, retry_delays="0.3,1,3", max_attempts=12
        ) as scenario,
    ):
        await scenario.publish(3000)
        sim.add_fault(Fault(status=429, retry_after="2", times=500))
        worker = scenario.worker()
        worker.start()
        await worker.wait_consuming()
        await wait_until(lambda: len(sim.accepted) >= 1000, timeout=60)
        sim.add_fault(Fault(status=429, retry_after="1", installation="icfg_beta", times=300))
        await wait_until(lambda: len(sim.accepted) >= 2000, timeout=60)
        sim.add_fault(Fault(status=429, retry_after="3", times=300))
        report = await scenario.finish("5: 429 storms with Retry-After")
    assert report.dead_lettered == {}
    assert report.delivered == report.published
    assert len(sim.refused) == 1100
    earliest = _shortest_wait_after_retry_after(sim)
    print(
        f"chaos 5: {len(sim.refused)} x 429; tightest return after Retry-After: {earliest:+.3f} s"
    )
    assert earliest >= 0


def _shortest_wait_after_retry_after(sim: VercelSimulator) -> float:
    """min over every 429 of (next request for the same event - 429 answer - Retry-After)."""
    arrivals: dict[str, list[float]] = defaultdict(list)
    for accepted in sim.accepted:
        arrivals[str(accepted.event["resourceId"])].append(accepted.arrived_at)
    for refused in sim.refused:
        assert refused.event is not None
        arrivals[str(refused.event["resourceId"])].append(refused.arrived_at)
    slack = []
    for refused in sim.refused:
        assert refused.event is not None
        assert refused.retry_after is not None
        later = [t for t in arrivals[str(refused.event["resourceId"])] if t > refused.arrived_at]
        assert later, f"event {refused.event} never came back after a 429"
        slack.append(min(later) - refused.answered_at - float(refused.retry_after))
    return min(slack)


async def test_chaos_6_three_workers_one_killed(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """Three workers compete for one queue; one is killed mid-stream: the other two take over
    its unacked messages and everything arrives."""
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.05) as sim,
        Scenario(private_broker.url, sim, tmp_path, concurrency=16) as scenario,
    ):
        await scenario.publish(3000)
        workers = [scenario.worker() for _ in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            await worker.wait_consuming()
        await wait_until(lambda: len(sim.accepted) >= 1000, timeout=60)
        await workers[0].kill()
        report = await scenario.finish("6: three workers, one killed")
    assert report.dead_lettered == {}
    assert all(worker.count("delivered") > 0 for worker in workers)


async def test_chaos_connections_reset_while_retrying_and_dead_lettering(
    private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """Through a slow proxy whose connections are reset four times mid-stream, while one
    installation keeps failing (retries published) and some events are invalid (dead letters
    published): publishes cut off mid-flight lose nothing; the invalid ones end in the DLQ."""
    async with (
        VercelSimulator(CHAOS_TOKENS, latency=0.02) as sim,
        Scenario(private_broker.url, sim, tmp_path, retry_delays="0.2,0.4") as scenario,
        TcpProxy.for_url(private_broker.url, latency=0.005) as proxy,
    ):
        await scenario.publish(2500)
        invalid = await scenario.publish_invalid(100)
        sim.add_fault(Fault(status=503, installation="icfg_beta", times=1500))
        worker = scenario.worker(amqp_url=proxy.url(private_broker.url))
        worker.start()
        await worker.wait_consuming()
        for reset in range(1, 5):
            await wait_until(lambda n=reset: len(sim.accepted) >= n * 400, timeout=60)
            proxy.reset()
            await worker.wait_consuming(sessions=reset + 1)
        report = await scenario.finish("connection resets while retrying and dead-lettering")
    assert report.dead_lettered == {"invalid_message": len(invalid)}
    assert sim.by_status["503"] >= 1500
