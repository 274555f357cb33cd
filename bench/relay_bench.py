"""End-to-end throughput, latency, CPU and memory of the relay, next to what else one could run.

    python bench/relay_bench.py [--messages N] [--latency-ms L] [--concurrency C] [--json FILE]
    python bench/relay_bench.py --transports      # the HTTP clients alone, side by side
    python bench/relay_bench.py --rss-check       # the relay's peak RSS over 1,000,000 queued

All contenders run in one invocation, one after the other, against the same broker and the
same simulator process (`python -m consumer sim`), each in processes of its own so that the
CPU seconds (user + system, /proc/<pid>/stat) and peak RSS (VmHWM) are the contender's alone:

- naive baseline (a): `naive_relay.py`, consume → POST → ack strictly one at a time.
- faststream+httpx, faststream+aiohttp (b): `faststream_relay.py`, FastStream's RabbitMQ
  subscriber with prefetch C and one shared HTTP client at its documented best settings.
- relay: the real `vercel-consumer run` with CONSUMER_CONCURRENCY=C; "relay x2" runs two of
  them on the same queue (CPU summed, RSS the larger).
- broker alone, http alone (c): the ceilings, `broker_only.py` (consume + ack, no HTTP) and
  `http_only.py` (the relay's VercelClient posting N events, no broker).

For each: a fresh topology (`bench-<uuid>`), N events preloaded with confirms, the simulator's
counters reset, the contender started; its window opens when it is consuming (its consumer is
registered, or it answered the `go` handshake) and closes when the simulator accepted every
message (or `done`, for the broker alone), or at the sample cap. Then, still running, it gets
a paced stream (a share of its own rate) to measure publish-to-delivery latency without the
queue in front: the preloaded latency only says how long a message waited behind the others.
bench/README.md explains the columns and shows the latest figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aio_pika.abc import AbstractConnection
from harness import (
    AMQP_URL,
    TOKEN,
    Measured,
    Process,
    Simulator,
    Watchdog,
    Window,
    bench_connection,
    declared,
    event_index,
    find_broker_pid,
    percentile,
    preload,
    publish_paced,
    queue_state,
    simulator,
)

from consumer.errors import BrokerError
from consumer.retry import RetryPolicy
from consumer.settings import Settings
from consumer.topology import Topology

BENCH_DIR = Path(__file__).resolve().parent
POLL_INTERVAL = 0.05  # seconds between progress checks
PACED_FIRST_INDEX = 50_000_000  # paced events' indexes start here, apart from preloaded ones


@dataclass(frozen=True)
class Contender:
    """How to run one contender and how to tell its progress."""

    key: str
    label: str
    script: str | None = None  # a bench script with the ready/go handshake; None: the relay
    extra: tuple[str, ...] = ()
    processes: int = 1
    via_simulator: bool = True  # progress = the simulator's accepted count; else a `done` line
    preloaded: bool = True
    latency: bool = True
    sample: int | None = None  # stop after this many messages (slow contenders)
    env: tuple[tuple[str, str], ...] = ()  # the relay's settings that differ from relay_env


CONTENDERS = [
    Contender("naive", "naive baseline", "naive_relay.py", sample=3000),
    Contender("faststream-httpx", "faststream+httpx", "faststream_relay.py", ("--client", "httpx")),
    Contender(
        "faststream-aiohttp", "faststream+aiohttp", "faststream_relay.py", ("--client", "aiohttp")
    ),
    Contender("relay", "relay"),
    Contender("relay-x2", "relay x2 procs", processes=2),
    Contender("broker", "broker alone", "broker_only.py", via_simulator=False, latency=False),
    Contender("http", "http alone", "http_only.py", preloaded=False, latency=False),
]
TRANSPORTS = [
    Contender(
        f"http-{client}",
        f"http: {client}",
        "http_only.py",
        ("--client", client),
        preloaded=False,
        latency=False,
    )
    for client in ("vercel", "httpx", "httpx-limits", "httpx-aiohttp", "aiohttp")
]
# Not in the default run: the relay as deployed by default, one JSON log line per message.
RELAY_INFO_LOGS = Contender("relay-info", "relay, info logs", env=(("CONSUMER_LOG_LEVEL", "info"),))
BY_KEY = {contender.key: contender for contender in [*CONTENDERS, RELAY_INFO_LOGS, *TRANSPORTS]}


@dataclass
class Latency:
    """Publish-to-delivery latency percentiles, in milliseconds."""

    count: int
    p50_ms: float
    p99_ms: float
    rate: float | None = None  # messages/s published, for the paced measurement


@dataclass
class Result:
    """One contender's figures."""

    key: str
    contender: str
    messages: int
    measured: Measured
    preloaded: int = 0
    publish_seconds: float = 0.0
    sim_max_in_flight: int | None = None
    sim_stats: dict[str, Any] = field(default_factory=dict)
    queued_latency: Latency | None = None
    paced_latency: Latency | None = None
    sampled: bool = False  # stopped at the sample cap or --max-seconds, not after all N

    @property
    def rate(self) -> float:
        return self.messages / self.measured.seconds if self.measured.seconds else 0.0

    def cpu_per_1k(self, seconds: float | None = None) -> float:
        spent = self.measured.cpu_seconds if seconds is None else seconds
        return spent * 1000 / self.messages if self.messages else 0.0

    @property
    def peak_rss_mb(self) -> float:
        return self.measured.peak_rss_kib / 1024

    def as_json(self) -> dict[str, Any]:
        others = self.measured.other_cpu_seconds
        return {
            **asdict(self),
            "messages_per_second": self.rate,
            "cpu_seconds_per_1k": self.cpu_per_1k(),
            "peak_rss_mb": self.peak_rss_mb,
            "other_cpu_seconds_per_1k": {k: self.cpu_per_1k(v) for k, v in others.items()},
        }


# ── one contender ───────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Run:
    """Everything one contender's run needs."""

    contender: Contender
    options: argparse.Namespace
    topology: Topology
    sim: Simulator
    admin: AbstractConnection
    others: dict[str, int]  # pids of the simulator and the broker, for their CPU

    @property
    def messages(self) -> int:
        return min(self.options.messages, self.contender.sample or self.options.messages)


def fresh_topology() -> Topology:
    name = f"bench-{uuid.uuid4().hex[:12]}"
    defaults = Settings.model_construct()  # what the relay uses: relay_env sets neither
    policy = RetryPolicy(defaults.retry_delays, defaults.max_attempts)
    return Topology(name, name, policy.tiers_ms)


async def bench(
    contender: Contender, options: argparse.Namespace, sim: Simulator, admin: AbstractConnection
) -> Result:
    """Declare, preload, reset the simulator, run the contender; delete its topology."""
    others = {"simulator": sim.process.pid}
    if broker_pid := find_broker_pid(urlsplit(AMQP_URL).port or 5672):
        others["broker"] = broker_pid
    run = Run(contender, options, fresh_topology(), sim, admin, others)
    sent_at: dict[int, float] = {}
    async with declared(admin, run.topology):
        preloaded, seconds = 0, 0.0
        if contender.preloaded:
            preloaded = run.messages
            seconds = await preload(run.topology.exchange, range(preloaded), sent_at)
        await sim.reset()
        result = await run_contender(run, sent_at)
    result.preloaded, result.publish_seconds = preloaded, seconds
    return result


async def run_contender(run: Run, sent_at: dict[int, float]) -> Result:
    """Start the contender's processes, measure its window, then its paced latency."""
    async with contextlib.AsyncExitStack() as stack:
        processes = [
            await stack.enter_async_context(start_process(run, number))
            for number in range(run.contender.processes)
        ]
        window, accepted_before = await open_window(run, processes)
        messages = await until_done(run, processes, accepted_before)
        result = Result(run.contender.key, label(run), messages, window.close())
        # Cut short by --max-seconds, or a contender too slow to be given all N.
        result.sampled = messages < run.messages - accepted_before
        result.sampled |= run.messages < run.options.messages
        if run.contender.latency and not run.options.no_latency:
            result.queued_latency = await queued_latency(run.sim, sent_at)
            result.paced_latency = await paced_latency(run, result.rate)
        result.sim_stats = await run.sim.stats()
        result.sim_max_in_flight = int(result.sim_stats["max_in_flight"])
        return result


def label(run: Run) -> str:
    contender = run.contender
    if contender.key.startswith(("relay", "faststream", "broker", "http")):
        return f"{contender.label} (C={run.options.concurrency})"
    return contender.label


def start_process(run: Run, number: int) -> contextlib.AbstractAsyncContextManager[Process]:
    contender, options = run.contender, run.options
    name = f"{contender.label} #{number + 1}"
    if contender.script is None:
        return Process.started(name, relay_command(), env=relay_env(run))
    command = [sys.executable, str(BENCH_DIR / contender.script), *contender.extra]
    command += ["--amqp-url", AMQP_URL, "--queue", run.topology.queue, "--sim-url", run.sim.url]
    command += ["--messages", str(run.messages), "--concurrency", str(options.concurrency)]
    command += ["--uvloop"] if options.uvloop else []
    return Process.started(name, command, handshake=True)


def relay_command() -> list[str]:
    """`vercel-consumer run`: the console script next to this Python, else `-m consumer run`."""
    script = Path(sys.executable).parent / "vercel-consumer"
    return [str(script), "run"] if script.exists() else [sys.executable, "-m", "consumer", "run"]


def relay_env(run: Run) -> dict[str, str]:
    """The relay's environment: the bench's settings, none inherited from this shell."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("CONSUMER_")}
    return {
        **inherited,
        "CONSUMER_AMQP_URL": AMQP_URL,
        "CONSUMER_VERCEL_API_URL": run.sim.url,
        "CONSUMER_VERCEL_TOKEN": TOKEN,
        "CONSUMER_EXCHANGE": run.topology.exchange,
        "CONSUMER_QUEUE": run.topology.queue,
        "CONSUMER_CONCURRENCY": str(run.options.concurrency),
        "CONSUMER_LOG_LEVEL": "warning",  # per-message info lines off, as a busy deployment
        "CONSUMER_HEALTH_PORT": "0",  # two relays on one host must not fight over a port
        **dict(run.contender.env),
    }


async def open_window(run: Run, processes: Sequence[Process]) -> tuple[Window, int]:
    """Wait until the contender is ready to work; open its window. Returns the window and the
    count the simulator had accepted by then (the relay may have started already)."""
    if run.contender.script is not None:
        for process in processes:
            await process.expect("ready")
        window = Window.open(processes, run.others)
        for process in processes:
            await process.go()
        return window, 0
    await wait_for_consumers(run, processes)
    window = Window.open(processes, run.others)
    return window, await run.sim.accepted()


async def wait_for_consumers(run: Run, processes: Sequence[Process]) -> None:
    channel = await run.admin.channel()
    deadline = time.monotonic() + 60
    try:
        while (await queue_state(channel, run.topology.queue))[1] < len(processes):
            for process in processes:
                process.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{run.contender.label} did not start consuming in 60 s")
            await asyncio.sleep(0.01)
    finally:
        await channel.close()


async def until_done(run: Run, processes: Sequence[Process], accepted_before: int) -> int:
    """Wait for the contender to finish (or its sample cap); return the messages it did."""
    if not run.contender.via_simulator:
        await processes[0].expect("done", timeout=max(60.0, run.messages / 500))
        return run.messages
    watchdog = Watchdog(f"{run.contender.label}: the simulator's accepted count")
    deadline = time.monotonic() + run.options.max_seconds
    while True:
        for process in processes:
            process.check_alive()
        done = await run.sim.accepted() - accepted_before
        if done >= run.messages - accepted_before or time.monotonic() >= deadline:
            return done
        watchdog.check(done)
        await asyncio.sleep(POLL_INTERVAL)


# ── latency ─────────────────────────────────────────────────────────────────────────────────


async def queued_latency(sim: Simulator, sent_at: dict[int, float]) -> Latency:
    """Latency of the preloaded messages delivered so far: mostly time spent queued."""
    return latency_of(await sim.arrivals(), sent_at)


async def paced_latency(run: Run, rate: float) -> Latency:
    """Empty the queue, publish a paced stream at a share of `rate`, measure its latency."""
    channel = await run.admin.channel()
    await (await channel.get_queue(run.topology.queue)).purge()  # what a sample left behind
    await channel.close()
    await finished_in_flight(run)
    paced_rate = max(1.0, rate * run.options.paced_share)
    count = max(10, int(paced_rate * run.options.paced_seconds))
    indexes = range(PACED_FIRST_INDEX, PACED_FIRST_INDEX + count)
    mark, sent_at = await run.sim.accepted(), {}
    await publish_paced(run.topology.exchange, indexes, paced_rate, sent_at)
    watchdog = Watchdog(f"{run.contender.label}: paced deliveries")
    while True:
        arrivals = [a for a in await run.sim.arrivals(mark) if event_index(a[0]) in sent_at]
        if len(arrivals) >= count:
            return replace(latency_of(arrivals, sent_at), rate=paced_rate)
        watchdog.check(len(arrivals))
        await asyncio.sleep(0.2)


async def finished_in_flight(run: Run) -> None:
    """Wait until the contender has done the deliveries it still held (a sample's window closes
    with up to C in flight: at C = 1000 and 200 ms, seconds of work the paced stream would
    otherwise queue behind): until the simulator's count stops moving for a while."""
    quiet = max(0.5, 3 * run.options.latency_ms / 1000)
    last = -1
    while (count := await run.sim.accepted()) != last:
        last = count
        await asyncio.sleep(quiet)


def latency_of(arrivals: Sequence[tuple[str | None, float]], sent_at: dict[int, float]) -> Latency:
    delays = sorted(
        arrived - sent_at[index]
        for resource_id, arrived in arrivals
        if (index := event_index(resource_id)) in sent_at
    )
    return Latency(len(delays), percentile(delays, 0.5) * 1000, percentile(delays, 0.99) * 1000)


# ── targets ─────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class Target:
    """One of issues 6's and 14's targets, as this run measured it."""

    name: str
    goal: float
    actual: float
    met: bool
    unit: str = "msg/s"


def targets(results: Sequence[Result], options: argparse.Namespace) -> list[Target]:
    """The targets this run's rows allow checking (a row that did not run skips its target)."""
    rows = {result.key: result for result in results}
    relay = rows.get("relay")
    found: list[Target] = []
    if relay is not None and options.latency_ms == 0:
        found += zero_latency_targets(relay, rows)
    if relay is not None and options.latency_ms > 0:
        concurrency_bound = options.concurrency / (options.latency_ms / 1000)
        cpu_bound = 1000 / relay.cpu_per_1k() if relay.cpu_per_1k() else float("inf")
        goal = 0.9 * min(concurrency_bound, cpu_bound)
        name = f"90% of min(C/latency = {concurrency_bound:.0f}, CPU ceiling = {cpu_bound:.0f})"
        if http := rows.get("http"):  # what the simulator allowed the HTTP client alone
            name += f" (http alone did {http.rate:.0f})"
        found.append(Target(name, goal, relay.rate, relay.rate >= goal))
    if relay is not None and relay.paced_latency is not None:
        # Issue 14's target is the relay's own share: the simulator's latency is added to every
        # delivery, so the goal moves by it (at 0 ms it is the plain 10 ms).
        goal = 10.0 + options.latency_ms
        p99 = relay.paced_latency.p99_ms
        name = f"paced p99 at {options.paced_share:.0%} of the relay's rate <= {goal:g} ms"
        if options.latency_ms:
            name += f" (10 ms + the simulator's {options.latency_ms:g} ms)"
        found.append(Target(name, goal, p99, p99 <= goal, "ms"))
    for result in results:
        if result.key.startswith("relay"):
            rss = result.peak_rss_mb
            name = f"{result.contender}: peak RSS < 200 MB ({options.messages} queued)"
            found.append(Target(name, 200.0, rss, rss < 200.0, "MB"))
    return found


def zero_latency_targets(relay: Result, rows: dict[str, Result]) -> list[Target]:
    found = []
    broker, http = rows.get("broker"), rows.get("http")
    if broker and http and broker.rate and http.rate:
        combined = 1 / (1 / broker.rate + 1 / http.rate)
        name = f"90% of 1/(1/B + 1/H) = {combined:.0f} (B {broker.rate:.0f}, H {http.rate:.0f})"
        found.append(Target(name, 0.9 * combined, relay.rate, relay.rate >= 0.9 * combined))
    cpu_ms = relay.cpu_per_1k()  # CPU seconds per 1,000 messages = ms per message
    name = "relay CPU per message <= 0.15 ms"
    found.append(Target(name, 0.15, cpu_ms, cpu_ms <= 0.15, "ms"))
    if naive := rows.get("naive"):
        goal = 5 * naive.rate
        found.append(Target("5x the naive baseline", goal, relay.rate, relay.rate >= goal))
    faststream = [row for key, row in rows.items() if key.startswith("faststream")]
    if faststream:
        best = max(faststream, key=lambda row: row.rate)
        goal = 1.5 * best.rate
        name = f"1.5x the best FastStream row ({best.contender})"
        found.append(Target(name, goal, relay.rate, relay.rate >= goal))
    return found


# ── report ──────────────────────────────────────────────────────────────────────────────────


def table(results: Sequence[Result]) -> str:
    lines = [
        f"{'contender':<27} {'messages':>8} {'seconds':>8} {'msg/s':>8}"
        f" {'p50 ms':>7} {'p99 ms':>7} {'cpu s/1k':>9} {'RSS MB':>7}"
    ]
    for r in results:
        paced = r.paced_latency
        p50, p99 = (f"{paced.p50_ms:7.1f}", f"{paced.p99_ms:7.1f}") if paced else ("-", "-")
        lines.append(
            f"{r.contender:<27} {r.messages:>8} {r.measured.seconds:>8.2f} {r.rate:>8.0f}"
            f" {p50:>7} {p99:>7} {r.cpu_per_1k():>9.3f} {r.peak_rss_mb:>7.1f}"
        )
    return "\n".join(lines)


def notes(results: Sequence[Result]) -> list[str]:
    lines = []
    for r in results:
        others = ", ".join(
            f"{name} {r.cpu_per_1k(spent):.3f}"
            for name, spent in r.measured.other_cpu_seconds.items()
        )
        line = f"{r.contender}: other processes' cpu s/1k: {others or 'n/a'}"
        if r.sim_max_in_flight is not None and r.key != "broker":
            line += f"; most requests open at once: {r.sim_max_in_flight}"
        if r.preloaded:
            line += f"; preload {r.preloaded / r.publish_seconds:.0f} msg/s"
        if r.sampled:
            line += f"; a sample (stopped at {r.messages} messages or --max-seconds)"
        if r.paced_latency and r.queued_latency:
            q, p = r.queued_latency, r.paced_latency
            line += (
                f"; latency paced at {p.rate:.0f} msg/s (p50/p99 above), preloaded"
                f" p50 {q.p50_ms / 1000:.1f} s p99 {q.p99_ms / 1000:.1f} s"
            )
        lines.append(line)
    return lines


def warnings(results: Sequence[Result]) -> list[str]:
    """Runs in which the simulator answered other than 201, or saw more requests than it
    accepted (redeliveries; a sample cut short may leave a few requests in flight)."""
    found = []
    for r in results:
        stats = r.sim_stats
        if r.key == "broker" or not stats:
            continue
        errors = set(stats["by_status"]) - {"201"}
        duplicates = stats["requests"] != stats["accepted"] and not r.sampled
        if errors or duplicates:
            found.append(f"warning: {r.contender}: the simulator saw {stats}")
    return found


def target_lines(found: Sequence[Target]) -> list[str]:
    return [
        f"{'met    ' if t.met else 'NOT MET'} {t.name}: {_figure(t.actual)} {t.unit}"
        f" (goal {UPPER_BOUNDS.get(t.unit, '>=')} {_figure(t.goal)})"
        for t in found
    ]


UPPER_BOUNDS = {"MB": "<", "ms": "<="}  # targets in these units are ceilings, the rest floors


def _figure(value: float) -> str:
    return f"{value:.3f}" if abs(value) < 1 else f"{value:.0f}"


def machine_info() -> dict[str, Any]:
    packages = ("aio-pika", "httpx", "httpx-aiohttp", "aiohttp", "faststream", "uvloop")
    installed = {}
    for package in packages:
        with contextlib.suppress(Exception):
            installed[package] = version(package)
    return {
        "nproc": os.cpu_count(),
        "load_average": os.getloadavg(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "packages": installed,
    }


def write_json(path: Path, options: argparse.Namespace, results: Sequence[Result]) -> None:
    report = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "options": {k: v for k, v in vars(options).items() if k != "json"},
        "machine": machine_info(),
        "results": [r.as_json() for r in results],
        "targets": [asdict(t) for t in targets(results, options)],
    }
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


# ── main ────────────────────────────────────────────────────────────────────────────────────


async def run_all(options: argparse.Namespace) -> list[Result]:
    """Every chosen contender in turn, against one simulator process."""
    results = []
    async with simulator(options.latency_ms) as sim, await bench_connection() as admin:
        for key in options.contenders:
            print(f"… {BY_KEY[key].label}", file=sys.stderr, flush=True)
            results.append(await bench(BY_KEY[key], options, sim, admin))
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--messages", type=int, default=100_000, help="N events per contender")
    add("--latency-ms", type=float, default=0.0, help="latency the simulator adds")
    add("--concurrency", type=int, default=64, help="C, the contenders' concurrency")
    add(
        "--contenders",
        type=_keys,
        default=[c.key for c in CONTENDERS],
        help=f"comma-separated, of: {', '.join(BY_KEY)}",
    )
    add("--max-seconds", type=float, default=60.0, help="sample cap for each contender's run")
    add("--paced-share", type=float, default=0.3, help="paced rate, as a share of the run's")
    add("--paced-seconds", type=float, default=5.0, help="how long the paced stream lasts")
    add("--no-latency", action="store_true", help="skip the latency measurements")
    add("--uvloop", action="store_true", help="the bench's own contender scripts on uvloop")
    add("--transports", action="store_true", help="only the HTTP clients, each alone")
    add(
        "--rss-check",
        action="store_true",
        help="only the relay, over 1,000,000 queued messages (unless --messages), no latency",
    )
    add("--json", type=Path, help="also write the figures to this file")
    options = parser.parse_args(argv)
    if options.transports:
        options.contenders = [c.key for c in TRANSPORTS]
    if options.rss_check:
        options.contenders, options.no_latency = ["relay"], True
        if "--messages" not in (argv if argv is not None else sys.argv):
            options.messages = 1_000_000
    if options.messages < 1 or options.latency_ms < 0 or options.concurrency < 1:
        parser.error("--messages and --concurrency must be at least 1, --latency-ms not negative")
    return options


def _keys(value: str) -> list[str]:
    keys = [key.strip() for key in value.split(",") if key.strip()]
    unknown = [key for key in keys if key not in BY_KEY]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown contender(s): {', '.join(unknown)}")
    return keys


def main() -> None:
    options = parse_args()
    print(
        f"relay bench: {options.messages} messages, simulator latency {options.latency_ms:g} ms,"
        f" concurrency {options.concurrency}, {os.cpu_count()} cores,"
        f" load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    try:
        results = asyncio.run(run_all(options))
    except BrokerError as exc:
        sys.exit(f"relay_bench: {exc} (is RabbitMQ running? see scripts/rabbitmq)")
    except KeyboardInterrupt:
        sys.exit(130)
    print(table(results))
    print("\n".join(notes(results) + warnings(results)))
    print("\n".join(target_lines(targets(results, options))))
    if options.json:
        write_json(options.json, options, results)


if __name__ == "__main__":
    main()
