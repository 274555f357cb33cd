"""The bench's machinery: child processes and their /proc meters, the simulator, the broker.

`relay_bench.py` composes these into runs; nothing here knows which contender is which.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
from aio_pika.abc import AbstractChannel, AbstractConnection

from consumer.contract import example_event
from consumer.publish.publisher import EventPublisher
from consumer.topology import Topology, connect, declare

AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
INSTALLATION = "icfg_bench"
TOKEN = "tok_bench"
CONNECTION_NAME = "relay-bench"  # the bench's own connections, apart from the contenders'
STALL_TIMEOUT = 30.0  # seconds without progress before a run is abandoned
PUBLISH_BATCH = 1000  # publishes in flight at once while preloading


# ── child processes ─────────────────────────────────────────────────────────────────────────


class Process:
    """A child process the bench measures: CPU seconds and peak RSS from /proc.

    With `handshake`, its stdout is a pipe the bench reads (`ready`, `done`) and its stdin one
    the bench writes `go` to; otherwise both go to a temporary log with its stderr, shown when
    it dies.
    """

    def __init__(self, name: str, process: asyncio.subprocess.Process, log: IO[bytes]) -> None:
        self.name = name
        self.process = process
        self._log = log

    @classmethod
    @contextlib.asynccontextmanager
    async def started(
        cls,
        name: str,
        command: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        handshake: bool = False,
    ) -> AsyncIterator[Process]:
        """Start `command` (in `env`, else this process's environment); terminate it
        (SIGTERM, then SIGKILL) on the way out."""
        pipe = asyncio.subprocess.PIPE
        with tempfile.TemporaryFile() as log:
            child = await asyncio.create_subprocess_exec(
                *command,
                stdin=pipe if handshake else asyncio.subprocess.DEVNULL,
                stdout=pipe if handshake else log,
                stderr=log,
                env=env,
            )
            process = cls(name, child, log)
            try:
                yield process
            finally:
                await process.stop()

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        seconds = process_cpu_seconds(self.pid)
        if seconds is None:
            self.check_alive()
            raise RuntimeError(f"cannot read the CPU time of {self.name} from /proc")
        return seconds

    def peak_rss_kib(self) -> int:
        """VmHWM: the most resident memory the process ever had."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmHWM for {self.name}")

    def check_alive(self) -> None:
        if self.process.returncode is not None:
            raise RuntimeError(
                f"{self.name} exited with status {self.process.returncode}: {self.tail()}"
            )

    def tail(self, limit: int = 3000) -> str:
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-limit:].strip() or "(no output)"

    async def expect(self, word: str, timeout: float = STALL_TIMEOUT) -> None:  # noqa: ASYNC109
        """Wait for the line `word` on the child's stdout."""
        assert self.process.stdout is not None
        async with asyncio.timeout(timeout):
            while line := await self.process.stdout.readline():
                if line.strip() == word.encode():
                    return
        await self.process.wait()
        self.check_alive()

    async def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(b"go\n")
        await self.process.stdin.drain()

    async def stop(self) -> None:
        if self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process, from /proc (None when it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # fields from the 3rd on; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def find_broker_pid(port: int) -> int | None:
    """The Erlang VM (beam.smp) listening on the broker's AMQP port, to report its CPU too.

    By the listening socket, not the name alone: the tests may run a second node next to it.
    """
    inodes = _listening_inodes(port)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() != "beam.smp":
                continue
            sockets = {os.readlink(fd) for fd in (entry / "fd").iterdir()}
            if any(f"socket:[{inode}]" in sockets for inode in inodes):
                return int(entry.name)
    return None


def _listening_inodes(port: int) -> set[str]:
    """Inodes of the TCP sockets listening on `port` (state 0A in /proc/net/tcp, tcp6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if int(fields[1].rpartition(":")[2], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    return inodes


@dataclass
class Window:
    """A measurement window over the contender's processes and the other processes' CPU."""

    processes: Sequence[Process]
    others: Mapping[str, int]  # name → pid: the simulator and the broker
    wall: float = field(default_factory=time.perf_counter)
    cpu: float = 0.0
    others_cpu: dict[str, float | None] = field(default_factory=dict)

    @classmethod
    def open(cls, processes: Sequence[Process], others: Mapping[str, int]) -> Window:
        window = cls(processes, others)
        window.cpu = sum(process.cpu_seconds() for process in processes)
        window.others_cpu = {name: process_cpu_seconds(pid) for name, pid in others.items()}
        return window

    def close(self) -> Measured:
        others = {}
        for name, pid in self.others.items():
            before, after = self.others_cpu.get(name), process_cpu_seconds(pid)
            if before is not None and after is not None:
                others[name] = after - before
        return Measured(
            seconds=time.perf_counter() - self.wall,
            cpu_seconds=sum(process.cpu_seconds() for process in self.processes) - self.cpu,
            peak_rss_kib=max(process.peak_rss_kib() for process in self.processes),
            other_cpu_seconds=others,
        )


@dataclass(frozen=True)
class Measured:
    seconds: float
    cpu_seconds: float  # of all the contender's processes together
    peak_rss_kib: int  # the largest of its processes' VmHWM
    other_cpu_seconds: dict[str, float]


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


# ── the simulator, in its own process ───────────────────────────────────────────────────────


@dataclass(frozen=True)
class Simulator:
    """The simulator's process and an HTTP client for its admin endpoints."""

    url: str
    process: Process
    http: httpx.AsyncClient

    async def stats(self) -> dict[str, Any]:
        response = await self.http.get("/_sim/stats")
        response.raise_for_status()
        return dict(response.json())

    async def accepted(self) -> int:
        return int((await self.stats())["accepted"])

    async def arrivals(self, since: int = 0) -> list[tuple[str | None, float]]:
        """(resourceId, arrival time) of each accepted event from index `since` on."""
        response = await self.http.get("/_sim/arrivals", params={"since": since}, timeout=120)
        response.raise_for_status()
        return [(entry[0], entry[1]) for entry in response.json()["arrivals"]]

    async def reset(self) -> None:
        (await self.http.post("/_sim/reset")).raise_for_status()

    async def wait_ready(self, timeout: float = 15.0) -> None:  # noqa: ASYNC109 - a deadline
        deadline = time.monotonic() + timeout
        while True:
            self.process.check_alive()
            with contextlib.suppress(httpx.TransportError):
                await self.stats()
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the simulator did not answer on {self.url} in {timeout} s")
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def simulator(latency_ms: float) -> AsyncIterator[Simulator]:
    """`python -m consumer sim` on a free port, in its own process; stopped on the way out."""
    port = free_port()
    command = [sys.executable, "-m", "consumer", "sim", "--port", str(port)]
    command += ["--token", f"{INSTALLATION}={TOKEN}", "--latency-ms", str(latency_ms)]
    url = f"http://127.0.0.1:{port}"
    async with (
        Process.started("the simulator", command) as process,
        httpx.AsyncClient(base_url=url) as http,
    ):
        sim = Simulator(url, process, http)
        await sim.wait_ready()
        yield sim


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ── the broker: topology, queue state, publishing ───────────────────────────────────────────


async def bench_connection() -> AbstractConnection:
    """A connection for the bench's own work (declare, preload, poll, delete)."""
    return await connect(AMQP_URL, name=CONNECTION_NAME)


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


async def queue_state(channel: AbstractChannel, queue: str) -> tuple[int, int]:
    """(ready messages, consumers) of a queue."""
    result = (await channel.declare_queue(queue, passive=True)).declaration_result
    return int(result.message_count or 0), int(result.consumer_count or 0)


def bench_event(index: int) -> dict[str, Any]:
    """Event number `index`; its resourceId (`res_<index>`) is how the simulator reports it."""
    return example_event(
        "resource.renamed",
        id=f"evt_bench_{index:08d}",
        installation_id=INSTALLATION,
        resource_id=f"res_{index}",
    )


def event_index(resource_id: str | None) -> int:
    return int(resource_id.rpartition("_")[2]) if resource_id else -1


@contextlib.asynccontextmanager
async def event_publisher(exchange: str) -> AsyncIterator[EventPublisher]:
    async with await EventPublisher.connect(
        AMQP_URL, exchange=exchange, name=CONNECTION_NAME
    ) as publisher:
        yield publisher


async def preload(exchange: str, indexes: range, sent_at: dict[int, float]) -> float:
    """Publish events `indexes` with confirms, PUBLISH_BATCH at a time, noting when each was
    sent in `sent_at`; return the seconds it took."""
    async with event_publisher(exchange) as publisher:
        started = time.perf_counter()
        for first in range(indexes.start, indexes.stop, PUBLISH_BATCH):
            batch = range(first, min(first + PUBLISH_BATCH, indexes.stop))
            now = time.time()
            sent_at.update((index, now) for index in batch)
            await asyncio.gather(
                *(publisher.publish(bench_event(i), validate=False) for i in batch)
            )
        return time.perf_counter() - started


async def publish_paced(
    exchange: str, indexes: range, rate: float, sent_at: dict[int, float]
) -> None:
    """Publish events `indexes` at `rate` per second (not waiting for confirms to send the
    next), noting when each was sent in `sent_at`."""
    async with event_publisher(exchange) as publisher:
        pending: set[asyncio.Task[None]] = set()
        started = time.perf_counter()
        for number, index in enumerate(indexes):
            delay = started + number / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at[index] = time.time()
            task = asyncio.create_task(publisher.publish(bench_event(index), validate=False))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)


def percentile(ordered: Sequence[float], share: float) -> float:
    """The `share` (0..1) percentile of sorted values, nearest rank."""
    if not ordered:
        return math.nan
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]
