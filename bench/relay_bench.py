"""End-to-end throughput of the relay, next to a naive baseline, against the local simulator.

    python bench/relay_bench.py [--messages N] [--latency-ms L] [--concurrency C] [--json FILE]

What is measured: how many messages per second go from a RabbitMQ work queue to the Vercel
simulator's 201, for two contenders in the same run, on the same broker and simulator:

- "relay": our worker (`consumer.cli.build_worker`) running in this process with
  `concurrency=C`, exactly as `vercel-consumer run` wires it (JSON logs at level warning, so
  per-message info lines are off).
- "naive baseline": the simplest relay a person would write: an aio-pika consumer with
  prefetch 1 that, strictly one message at a time, parses and translates the event, POSTs it
  with one shared `httpx.AsyncClient` and acks. It is slow, so it stops after
  min(N, 3000) messages or 30 s, whichever comes first, and its msg/s is from that sample.

How: the simulator runs as a separate process (`python -m consumer sim`) so that it does not
share this event loop or its CPU core. Each contender gets fresh exchange and queue names
(`bench-<uuid>`): the topology is declared, N valid `resource.renamed` events are published
with publisher confirms (500 in flight at a time; that publish rate is reported too), the
simulator's counters are reset, and only then is the contender started and timed. The relay
is done when the simulator has accepted N events and the work queue holds no ready message;
the baseline when it has acked its sample. Both timings include connecting (and the worker's
idempotent re-declare). Queues and exchange are deleted afterwards, and the simulator is
stopped, also on errors and Ctrl-C.

Columns: wall seconds; messages/s; CPU seconds this process spent per 1,000 messages
(`time.process_time()`); peak RSS of this process (`ru_maxrss`, a process-wide high-water
mark: the baseline runs first so that the relay's figure is not the baseline's). Below the
table, per contender: the preload's publish rate, the CPU seconds per 1,000 messages of the
simulator and of the broker (from /proc; the broker's is the whole RabbitMQ VM, whoever else
uses it), and the most requests the simulator had open at once (its `max_in_flight`). A
warning is printed when the simulator saw errors or more requests than messages (a
redelivery after a lost connection, for instance).

Publish-to-delivery latency is not measured: with a preloaded queue it would only measure how
long a message waited behind the others, and the relay's translation drops `id` and `data`,
so the simulator never sees a publish time to compare with.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any

import aio_pika
import httpx
from aio_pika.abc import AbstractConnection, AbstractQueue

from consumer.cli import build_worker
from consumer.contract import example_event, parse_event
from consumer.errors import BrokerError
from consumer.logs import configure_logging, get_logger
from consumer.publisher import EventPublisher
from consumer.retry import RetryPolicy
from consumer.settings import Settings, load_settings
from consumer.topology import Topology, connect, declare, open_channel
from consumer.translate import translate
from consumer.vercel import VercelClient

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
INSTALLATION = "icfg_bench"
TOKEN = "tok_bench"
PUBLISH_BATCH = 500  # publishes in flight at once while preloading
BASELINE_MAX_MESSAGES = 3000
BASELINE_MAX_SECONDS = 30.0
POLL_INTERVAL = 0.05  # seconds between progress checks while the relay runs
STALL_TIMEOUT = 30.0  # seconds without progress before the run is abandoned
# The bench's own connections get their own name in the broker's UI, apart from the worker's.
CONNECTION_NAME = "relay-bench"


# ── the simulator, in its own process ───────────────────────────────────────────────────────


@dataclass(frozen=True)
class Simulator:
    """The simulator process and an HTTP client for its admin endpoints."""

    url: str
    process: subprocess.Popen[bytes]
    log: IO[bytes]  # its stderr
    http: httpx.AsyncClient

    async def stats(self) -> dict[str, Any]:
        response = await self.http.get("/_sim/stats")
        response.raise_for_status()
        return dict(response.json())

    async def reset(self) -> None:
        (await self.http.post("/_sim/reset")).raise_for_status()

    async def wait_ready(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109 - a deadline
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the simulator exited with status {self.process.returncode}: {_tail(self.log)}"
                )
            with contextlib.suppress(httpx.TransportError):
                await self.stats()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulator did not answer on {self.url} in {timeout} s")
            await asyncio.sleep(0.05)


@contextlib.contextmanager
def simulator_process(
    latency_ms: float,
) -> Iterator[tuple[str, subprocess.Popen[bytes], IO[bytes]]]:
    """Start `python -m consumer sim` on a free port; always stop it on the way out.

    Its stderr goes to a temporary file, shown only if it fails to start: aiohttp logs a
    traceback for every request whose client went away, which a disturbed run has plenty of.
    """
    port = _free_port()
    command = [sys.executable, "-m", "consumer", "sim", "--port", str(port)]
    command += ["--token", f"{INSTALLATION}={TOKEN}", "--latency-ms", str(latency_ms)]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
        try:
            yield f"http://127.0.0.1:{port}", process, log
        finally:
            _stop(process)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(stream: IO[bytes], limit: int = 2000) -> str:
    stream.seek(0)
    return stream.read().decode(errors="replace")[-limit:].strip() or "(no output)"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ── measuring ───────────────────────────────────────────────────────────────────────────────


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of another process, from /proc (None where unavailable)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # fields from the 3rd on; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_broker_pid() -> int | None:
    """The local RabbitMQ's Erlang VM (beam.smp), to report the broker's CPU as well."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "beam.smp":
                    return int(entry.name)
    return None


@dataclass(frozen=True)
class Meter:
    """Wall clock and CPU counters at the start of a measurement."""

    pids: Mapping[str, int]
    wall: float = field(default_factory=time.perf_counter)
    cpu: float = field(default_factory=time.process_time)
    others: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def start(cls, pids: Mapping[str, int]) -> Meter:
        return cls(pids, others={name: process_cpu_seconds(pid) for name, pid in pids.items()})

    def stop(self, contender: str, messages: int) -> Result:
        others = {}
        for name, pid in self.pids.items():
            before, after = self.others.get(name), process_cpu_seconds(pid)
            if before is not None and after is not None:
                others[name] = after - before
        return Result(
            contender=contender,
            messages=messages,
            seconds=time.perf_counter() - self.wall,
            cpu_seconds=time.process_time() - self.cpu,
            peak_rss_kib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            other_cpu_seconds=others,
        )


@dataclass
class Result:
    """One contender's figures."""

    contender: str
    messages: int
    seconds: float
    cpu_seconds: float
    peak_rss_kib: int
    other_cpu_seconds: dict[str, float]
    preloaded: int = 0
    publish_seconds: float = 0.0
    sim_max_in_flight: int | None = None  # the most requests the simulator had open at once

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    def cpu_per_1k(self, seconds: float | None = None) -> float:
        spent = self.cpu_seconds if seconds is None else seconds
        return spent * 1000 / self.messages if self.messages else 0.0

    def as_json(self) -> dict[str, Any]:
        others = {name: self.cpu_per_1k(spent) for name, spent in self.other_cpu_seconds.items()}
        publish_rate = self.preloaded / self.publish_seconds if self.publish_seconds else 0.0
        return {
            **asdict(self),
            "messages_per_second": self.rate,
            "cpu_seconds_per_1k": self.cpu_per_1k(),
            "peak_rss_mb": self.peak_rss_kib / 1024,
            "other_cpu_seconds_per_1k": others,
            "publish_messages_per_second": publish_rate,
        }


class Watchdog:
    """Raises TimeoutError when a progress counter has not moved for `timeout` seconds."""

    def __init__(self, what: str, timeout: float = STALL_TIMEOUT) -> None:
        self._what, self._timeout = what, timeout
        self._last, self._since = -1, time.monotonic()

    def check(self, value: int) -> None:
        now = time.monotonic()
        if value != self._last:
            self._last, self._since = value, now
        elif now - self._since > self._timeout:
            raise TimeoutError(f"{self._what} stuck at {value} for {self._timeout:.0f} s")


# ── topology and preload ────────────────────────────────────────────────────────────────────


def bench_settings(args: argparse.Namespace, sim_url: str) -> Settings:
    """Settings for one contender, with fresh exchange and queue names."""
    name = f"bench-{uuid.uuid4().hex[:12]}"
    return load_settings(
        amqp_url=AMQP_URL,
        vercel_api_url=sim_url,
        vercel_token=TOKEN,
        exchange=name,
        queue=name,
        concurrency=args.concurrency,
        log_level="warning",
    )


def topology_of(settings: Settings) -> Topology:
    """The topology `build_worker` derives from the same settings."""
    policy = RetryPolicy(settings.retry_delays, settings.max_attempts)
    return Topology(settings.exchange, settings.queue, policy.tiers_ms)


@contextlib.asynccontextmanager
async def declared(admin: AbstractConnection, topology: Topology) -> AsyncIterator[None]:
    """Declare the topology; delete its queues and exchange afterwards, whatever happened."""
    try:
        channel = await admin.channel()
        await declare(channel, topology)
        await channel.close()
        yield
    finally:
        await delete_topology(topology)


async def bench_connection() -> AbstractConnection:
    """A connection for the bench's own work (declare, preload, poll, delete)."""
    return await connect(AMQP_URL, name=CONNECTION_NAME)


async def delete_topology(topology: Topology) -> None:
    """Delete work queue, DLQ, retry tiers and exchange, on a connection of its own."""
    retry_queues = [topology.retry_queue(ms) for ms in topology.retry_tiers_ms]
    async with await bench_connection() as connection:
        channel = await connection.channel()
        for queue in [topology.queue, topology.dead_letter_queue, *retry_queues]:
            with contextlib.suppress(Exception):
                await channel.queue_delete(queue)
        with contextlib.suppress(Exception):
            await channel.exchange_delete(topology.exchange)


def bench_event(index: int) -> dict[str, Any]:
    return example_event(
        "resource.renamed",
        id=f"evt_bench_{index:07d}",
        installation_id=INSTALLATION,
        resource_id=f"res_{index}",
    )


async def preload(exchange: str, count: int) -> float:
    """Publish `count` valid events with confirms, PUBLISH_BATCH at a time; return seconds."""
    async with await bench_connection() as connection:
        channel = await open_channel(connection)  # publisher confirms
        publisher = EventPublisher(connection, await channel.get_exchange(exchange))
        started = time.perf_counter()
        for first in range(0, count, PUBLISH_BATCH):
            batch = range(first, min(first + PUBLISH_BATCH, count))
            await asyncio.gather(*(publisher.publish(bench_event(i)) for i in batch))
        return time.perf_counter() - started


# ── the contenders ──────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Run:
    """What a contender needs: its settings and topology, the simulator, an admin connection."""

    settings: Settings
    topology: Topology
    sim: Simulator
    admin: AbstractConnection
    messages: int
    pids: Mapping[str, int]


async def run_relay(run: Run) -> Result:
    """Our worker, in this process, until the simulator accepted every message."""
    settings = run.settings
    vercel = VercelClient(
        settings.vercel_api_url,
        timeout=settings.http_timeout,
        max_connections=settings.concurrency,
    )
    worker = build_worker(settings, vercel, get_logger("bench"))
    if worker.topology != run.topology:
        raise RuntimeError(f"the worker's topology {worker.topology} is not the preloaded one")
    stop = asyncio.Event()
    meter = Meter.start(run.pids)
    task = asyncio.create_task(worker.run(stop))
    try:
        await wait_until_delivered(run, task)
        return meter.stop(f"relay (C={settings.concurrency})", run.messages)
    finally:
        stop.set()
        await task
        await vercel.aclose()


async def wait_until_delivered(run: Run, worker: asyncio.Task[None]) -> None:
    """Poll until the simulator accepted N events and the work queue has no ready message."""
    channel = await run.admin.channel()
    watchdog = Watchdog("the relay's accepted count")
    try:
        while True:
            if worker.done():
                worker.result()  # raises what ended it
                raise RuntimeError("the worker stopped before delivering every message")
            accepted = (await run.sim.stats())["accepted"]
            if accepted >= run.messages and await ready_count(channel, run.topology.queue) == 0:
                return
            watchdog.check(accepted)
            await asyncio.sleep(POLL_INTERVAL)
    finally:
        await channel.close()


async def ready_count(channel: aio_pika.abc.AbstractChannel, queue: str) -> int:
    declared_queue = await channel.declare_queue(queue, passive=True)
    result = declared_queue.declaration_result
    return int(result.message_count or 0)


async def run_baseline(run: Run) -> Result:
    """The naive relay, on a sample of the preloaded messages."""
    limit = min(run.messages, BASELINE_MAX_MESSAGES)
    meter = Meter.start(run.pids)
    connection = await aio_pika.connect(AMQP_URL)
    async with connection, httpx.AsyncClient(base_url=run.sim.url) as http:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=1)
        queue = await channel.get_queue(run.topology.queue)
        deadline = time.perf_counter() + BASELINE_MAX_SECONDS
        done = await naive_relay(queue, http, limit, deadline)
        return meter.stop("naive baseline", done)


async def naive_relay(
    queue: AbstractQueue, http: httpx.AsyncClient, limit: int, deadline: float
) -> int:
    """One message at a time: parse, translate, POST, ack. Returns how many it relayed."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    done = 0
    async with queue.iterator(timeout=STALL_TIMEOUT) as messages:
        async for message in messages:
            request = translate(parse_event(message.body, max_bytes=256 * 1024))
            response = await http.post(request.path, content=request.body, headers=headers)
            response.raise_for_status()
            await message.ack()
            done += 1
            if done >= limit or time.perf_counter() >= deadline:
                break
    return done


Contender = Callable[[Run], Awaitable[Result]]


async def bench(
    contender: Contender, args: argparse.Namespace, sim: Simulator, admin: AbstractConnection
) -> Result:
    """Declare, preload, reset the simulator, run one contender; clean up its topology."""
    settings = bench_settings(args, sim.url)
    topology = topology_of(settings)
    pids = {"simulator": sim.process.pid}
    if broker_pid := find_broker_pid():
        pids["broker"] = broker_pid
    async with declared(admin, topology):
        publish_seconds = await preload(topology.exchange, args.messages)
        await sim.reset()
        result = await contender(Run(settings, topology, sim, admin, args.messages, pids))
        result.sim_max_in_flight = await check_simulator(sim, result)
    result.preloaded, result.publish_seconds = args.messages, publish_seconds
    return result


async def check_simulator(sim: Simulator, result: Result) -> int:
    """Warn when the simulator saw errors or duplicates; return its max_in_flight."""
    stats = await sim.stats()
    if stats["requests"] != stats["accepted"] or stats["accepted"] != result.messages:
        print(
            f"warning: {result.contender}: the simulator saw {stats} for {result.messages}"
            " messages: errors or redeliveries disturbed this run",
            file=sys.stderr,
        )
    return int(stats["max_in_flight"])


# ── report ──────────────────────────────────────────────────────────────────────────────────


def table(results: list[Result]) -> str:
    lines = [
        f"{'contender':<16} {'messages':>8} {'seconds':>8} {'msg/s':>8}"
        f" {'cpu s/1k msgs':>14} {'peak RSS MB':>12}"
    ]
    for r in results:
        lines.append(
            f"{r.contender:<16} {r.messages:>8} {r.seconds:>8.2f} {r.rate:>8.1f}"
            f" {r.cpu_per_1k():>14.3f} {r.peak_rss_kib / 1024:>12.1f}"
        )
    return "\n".join(lines)


def notes(relay: Result, baseline: Result) -> list[str]:
    ratio = relay.rate / baseline.rate if baseline.rate else float("inf")
    lines = [f"ratio relay/baseline: {ratio:.1f}x"]
    if baseline.messages < baseline.preloaded:
        lines.append(
            f"naive baseline: a sample of {baseline.messages} of {baseline.preloaded} messages"
            f" (it stops at {BASELINE_MAX_MESSAGES} messages or {BASELINE_MAX_SECONDS:.0f} s)"
        )
    for r in (relay, baseline):
        others = ", ".join(
            f"{name} {r.cpu_per_1k(spent):.3f}" for name, spent in r.other_cpu_seconds.items()
        )
        lines += [
            f"{r.contender}:",
            f"  preload: {r.preloaded} msgs published in {r.publish_seconds:.2f} s"
            f" ({r.preloaded / r.publish_seconds:.0f} msg/s; confirms, {PUBLISH_BATCH} in flight)",
            f"  cpu s/1k msgs of the other processes: {others or 'n/a'}",
            f"  most requests the simulator had open at once: {r.sim_max_in_flight}",
        ]
    return lines


def machine_info() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "aio_pika": version("aio-pika"),
        "httpx": version("httpx"),
        "aiohttp": version("aiohttp"),
    }


def write_json(path: Path, args: argparse.Namespace, results: list[Result]) -> None:
    relay, baseline = results
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": machine_info(),
        "results": [r.as_json() for r in results],
        "ratio_relay_to_baseline": relay.rate / baseline.rate if baseline.rate else None,
    }
    path.write_text(json.dumps(report, indent=2) + "\n")


# ── main ────────────────────────────────────────────────────────────────────────────────────


async def run_all(args: argparse.Namespace) -> list[Result]:
    """Both contenders, baseline first (see peak RSS), against one simulator process."""
    with simulator_process(args.latency_ms) as (url, process, log):
        async with httpx.AsyncClient(base_url=url) as http:
            sim = Simulator(url, process, log, http)
            await sim.wait_ready()
            admin = await bench_connection()
            async with admin:
                baseline = await bench(run_baseline, args, sim, admin)
                relay = await bench(run_relay, args, sim, admin)
    return [relay, baseline]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000, help="N events per contender")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="simulator latency")
    parser.add_argument("--concurrency", type=int, default=64, help="the relay's concurrency")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.latency_ms < 0:
        parser.error("--messages must be at least 1 and --latency-ms not negative")
    return args


def main() -> None:
    args = parse_args()
    configure_logging("json", "warning")
    print(
        f"relay bench: {args.messages} messages, simulator latency {args.latency_ms:g} ms,"
        f" relay concurrency {args.concurrency}, {os.cpu_count()} cores",
        flush=True,
    )
    try:
        results = asyncio.run(run_all(args))
    except BrokerError as exc:
        sys.exit(f"relay_bench: {exc} (is RabbitMQ running? see scripts/rabbitmq)")
    except KeyboardInterrupt:
        sys.exit(130)
    print(table(results))
    print("\n".join(notes(*results)))
    if args.json:
        write_json(args.json, args, results)


if __name__ == "__main__":
    main()
