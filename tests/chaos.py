"""Chaos harness: break things for real, then account for every event that was published.

Reusable pieces (each works alone; `tests/test_chaos.py` shows them together):

- `account(...)` → `ChaosReport`: the invariant checker. Given the published event ids, the ids
  the simulator accepted (one entry per accepted request, repeats included) and the DLQ's
  (id, reason) pairs, it reports published, delivered, dead-lettered (by reason), duplicated
  and lost. An id is accounted for when Vercel accepted it at least once, or when it sits in
  the DLQ with a reason. `report.check()` asserts lost == 0, prints the scenario's line and
  records it for the end-of-run summary (conftest.py prints `REPORTS`).
- `WorkerProcess`: `python -m consumer run` as a real child process (so `kill -9`, SIGTERM and a
  second signal are real), its JSON log in a file; waits for `consuming` lines, counts events.
- `TcpProxy`: an asyncio TCP proxy to put between a worker and a broker: added latency, resets
  of every connection (RST), a blackhole (bytes held in both directions, like an iptables DROP
  while TCP retransmits) and refusing new connections (like REJECT). The kernel here has no
  netem, and a proxy needs no root.
- `Scenario`: one run's world on a broker: unique names, the declared topology, a tokens
  directory, N published events, workers, waiting until everything is accounted for, and
  clean-up. Events carry their id as `resource_id`, so the simulator's accepted requests (which
  carry the translated `resourceId`, not the event id) name the event they delivered.

```python
async with Scenario(private_broker.url, sim, tmp_path, retry_delays="0.2,0.5") as scenario:
    await scenario.publish(3000)
    worker = scenario.worker()
    worker.start()
    await worker.wait_consuming()
    ...  # break something: private_broker.restart(), worker.kill(), sim.add_fault(...)
    report = await scenario.finish("3: Vercel 503 for 60 s")  # asserts lost == 0
    assert report.dead_lettered == {}
```

Blocking calls (a broker restart, rabbitmqctl) must run in a thread (`asyncio.to_thread`): the
simulator serves from the test's event loop, and a blocked loop looks like a Vercel outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Self
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import orjson

from consumer.contract import example_event
from consumer.retry import RetryPolicy
from consumer.testing.vercel_sim import VercelSimulator
from consumer.topology import Topology, declare, open_channel

REPO = Path(__file__).resolve().parent.parent
CHAOS_TOKENS = {"icfg_alpha": "tok_alpha_s3cr3t", "icfg_beta": "tok_beta_s3cr3t"}


class Reported(Protocol):
    def line(self) -> str: ...


REPORTS: list[Reported] = []  # every checked report of this run, for the summary


# ── the invariant checker ────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ChaosReport:
    """What became of the events of one scenario."""

    scenario: str
    published: int
    delivered: int  # distinct published ids Vercel accepted at least once
    dead_lettered: dict[str, int]  # distinct published ids in the DLQ, by reason
    duplicated: int  # ids Vercel accepted more than once
    extra_deliveries: int  # accepted requests beyond the first per id
    delivered_and_dead: int  # ids both accepted by Vercel and in the DLQ
    lost: int  # published ids neither delivered nor dead-lettered with a reason
    lost_sample: tuple[str, ...]
    unexpected: int  # accepted or dead-lettered ids that were never published
    seconds: float

    def line(self) -> str:
        dead = sum(self.dead_lettered.values())
        reasons = ", ".join(f"{r}={n}" for r, n in sorted(self.dead_lettered.items()))
        return (
            f"chaos {self.scenario}: published={self.published} delivered={self.delivered}"
            f" dead_lettered={dead}{f' ({reasons})' if reasons else ''}"
            f" duplicated={self.duplicated} (+{self.extra_deliveries} extra requests)"
            f" lost={self.lost} in {self.seconds:.1f} s"
        )

    def check(self) -> ChaosReport:
        """Print and record the line; fail when anything was lost or came from nowhere."""
        print(self.line(), flush=True)
        REPORTS.append(self)
        assert self.lost == 0, f"{self.lost} events lost, e.g. {list(self.lost_sample)}"
        assert self.unexpected == 0, f"{self.unexpected} ids were never published"
        return self


def account(
    scenario: str,
    published: Iterable[str],
    delivered: Iterable[str],
    dead_letters: Iterable[tuple[str | None, str | None]],
    seconds: float = 0.0,
) -> ChaosReport:
    """The invariant checker: every published id delivered at least once or dead-lettered with
    a reason. `delivered` has one id per accepted request; `dead_letters` (id, reason) pairs
    where a reason of None (a DLQ message without one) does not count as accounted for."""
    wanted = set(published)
    accepted = Counter(delivered)
    reasons: dict[str, str] = {}
    for event_id, reason in dead_letters:
        if event_id is not None and reason is not None:
            reasons.setdefault(event_id, reason)
    lost = sorted(wanted - set(accepted) - set(reasons))
    return ChaosReport(
        scenario=scenario,
        published=len(wanted),
        delivered=len(wanted & set(accepted)),
        dead_lettered=dict(Counter(r for i, r in reasons.items() if i in wanted)),
        duplicated=sum(1 for i, n in accepted.items() if n > 1 and i in wanted),
        extra_deliveries=sum(n - 1 for i, n in accepted.items() if i in wanted),
        delivered_and_dead=len(set(accepted) & set(reasons)),
        lost=len(lost),
        lost_sample=tuple(lost[:5]),
        unexpected=len((set(accepted) | set(reasons)) - wanted),
        seconds=seconds,
    )


def delivered_ids(sim: VercelSimulator) -> list[str]:
    """One event id per request the simulator accepted (events carry their id as resource id)."""
    return [str(a.event.get("resourceId")) for a in sim.accepted]


def dead_letter_reason(headers: Mapping[str, Any] | None) -> str | None:
    """Our `dead-letter-reason`, else `broker:<x-first-death-reason>` (the broker gave up)."""
    headers = headers or {}
    reason = headers.get("dead-letter-reason")
    if reason is not None:
        return str(reason)
    broker = headers.get("x-first-death-reason")
    return f"broker:{broker}" if broker is not None else None


# ── the worker as a process ──────────────────────────────────────────────────────────────────


def worker_env(**settings: Any) -> dict[str, str]:
    """This environment without CONSUMER_* variables, plus `settings` as CONSUMER_<NAME>
    (health server off, JSON logs at info unless given)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSUMER_")}
    values = {"health_port": 0, "log_format": "json", "log_level": "info", **settings}
    env.update({f"CONSUMER_{k.upper()}": str(v) for k, v in values.items() if v is not None})
    return env


class WorkerProcess:
    """`python -m consumer run` as a child process; every (re)start appends to one log file."""

    def __init__(
        self, env: Mapping[str, str], log_path: Path, command: tuple[str, ...] = ("run",)
    ) -> None:
        self.env = dict(env)
        self.command = command
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start the worker (again, after it exited)."""
        assert not self.running, "the worker is already running"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "consumer", *self.command],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def send(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def kill(self) -> None:
        """`kill -9`, and wait until the process is gone."""
        if self.running:
            self.send(signal.SIGKILL)
        await self.wait_exit(10)

    async def stop(self, timeout: float = 40) -> int:  # noqa: ASYNC109 - a deadline
        """SIGTERM and wait for the exit status (killed at the deadline)."""
        if self.running:
            self.send(signal.SIGTERM)
        try:
            return await self.wait_exit(timeout)
        finally:
            if self.running:
                self.send(signal.SIGKILL)

    async def wait_exit(self, timeout: float) -> int:  # noqa: ASYNC109 - a polling deadline
        """The exit status, once the process has ended; AssertionError after `timeout`."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while (code := self.process.poll()) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"the worker did not exit within {timeout} s")
            await asyncio.sleep(0.05)
        return code

    async def wait_consuming(self, sessions: int | None = None, timeout: float = 60) -> None:  # noqa: ASYNC109
        """Wait for the `sessions`-th `consuming` line in the log (default: one per start so far;
        pass more after breaking the broker, which makes a running worker consume again)."""
        wanted = sessions if sessions is not None else self.starts
        await self.wait_for("consuming", wanted, timeout)

    async def wait_for(self, event: str, count: int = 1, timeout: float = 60) -> None:  # noqa: ASYNC109
        """Wait until the log holds `count` lines of `event`; fail early if the worker exits."""
        deadline = time.monotonic() + timeout
        while self.count(event) < count:
            if not self.running and self.count(event) < count:
                tail = "\n".join(self.log_lines()[-20:])
                raise AssertionError(f"worker exited ({self.returncode}) before {event}:\n{tail}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{count} x {event!r} not logged within {timeout} s")
            await asyncio.sleep(0.05)

    def log_lines(self) -> list[str]:
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """Parsed JSON log lines (those with `event` == name, when given)."""
        parsed = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                entry = orjson.loads(line)
                if isinstance(entry, dict) and (name is None or entry.get("event") == name):
                    parsed.append(entry)
        return parsed

    def count(self, name: str) -> int:
        return len(self.events(name))

    def foreign_lines(self) -> list[str]:
        """Log lines that are not JSON objects (the log promises one object per line)."""
        foreign = []
        for line in self.log_lines():
            try:
                parsed = orjson.loads(line)
            except ValueError:
                parsed = None
            if not isinstance(parsed, dict):
                foreign.append(line)
        return foreign


# ── a TCP proxy with faults ──────────────────────────────────────────────────────────────────


class TcpProxy:
    """Listens on 127.0.0.1 and forwards each connection to `target`, with faults on demand.

    `latency` (seconds) delays every chunk in each direction, keeping order and pipelining;
    `reset()` aborts every open connection with a TCP RST; `blackhole(True)` holds all bytes in
    both directions (nothing arrives, the connections stay open: a silent partition) until
    `blackhole(False)` lets them flow again; `refuse = True` resets new connections at once.
    """

    def __init__(self, target_host: str, target_port: int, *, latency: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.latency = latency
        self.refuse = False
        self.port = 0
        self.accepted = 0
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    def for_url(cls, amqp_url: str, **kwargs: Any) -> TcpProxy:
        """A proxy to the broker of `amqp_url` (not started)."""
        parts = urlsplit(amqp_url)
        return cls(parts.hostname or "127.0.0.1", parts.port or 5672, **kwargs)

    def url(self, amqp_url: str) -> str:
        """`amqp_url` pointed at this proxy instead of the broker."""
        parts = urlsplit(amqp_url)
        netloc = parts.netloc.rsplit(":", 1)[0] if parts.port else parts.netloc
        return urlunsplit(parts._replace(netloc=f"{netloc}:{self.port}"))

    async def start(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.reset()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def reset(self) -> None:
        """Abort every open connection, both sides, with RST."""
        for pair in list(self._pairs):
            for writer in pair:
                _abort(writer)
        self._pairs.clear()

    def blackhole(self, on: bool) -> None:
        if on:
            self._flowing.clear()
        else:
            self._flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.refuse:
            _abort(writer)
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _abort(writer)
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(source, sink, pair))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(
        self,
        source: asyncio.StreamReader,
        sink: asyncio.StreamWriter,
        pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        forward = asyncio.create_task(self._forward(chunks, sink))
        loop = asyncio.get_running_loop()
        try:
            while data := await source.read(65536):
                chunks.put_nowait((loop.time() + self.latency, data))
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            chunks.put_nowait((0.0, b""))  # end of stream: close the other side once flushed
            with contextlib.suppress(Exception):
                await forward
            self._pairs.discard(pair)

    async def _forward(self, chunks: asyncio.Queue[tuple[float, bytes]], sink: Any) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, data = await chunks.get()
            if not data:
                sink.close()
                return
            await asyncio.sleep(max(0.0, due - loop.time()))
            await self._flowing.wait()
            sink.write(data)
            await sink.drain()


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: what a crashed peer or a REJECT rule looks like."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# ── a scenario's world ───────────────────────────────────────────────────────────────────────


class Scenario:
    """Names, topology, tokens, published ids and workers of one chaos run on one broker.

    `settings` are the workers' CONSUMER_* settings (lower-case names, e.g. retry_delays="0.2,1",
    concurrency=32); the topology is declared with the same retry tiers the workers will use.
    """

    def __init__(self, amqp_url: str, sim: VercelSimulator, workdir: Path, **settings: Any) -> None:
        suffix = uuid.uuid4().hex[:10]
        defaults = {
            "exchange": f"chaos-events-{suffix}",
            "queue": f"chaos-q-{suffix}",
            "retry_delays": "0.2,0.5,1",
            "max_attempts": 8,
            "concurrency": 32,
            "http_timeout": 5,
            "shutdown_timeout": 10,
        }
        self.amqp_url = amqp_url
        self.sim = sim
        self.workdir = workdir
        self.settings: dict[str, Any] = {**defaults, **settings}
        self.published: list[str] = []
        self.dead_letters: list[tuple[str | None, str | None]] = []
        self.workers: list[WorkerProcess] = []
        self.started = time.monotonic()

    @property
    def queue(self) -> str:
        return str(self.settings["queue"])

    @property
    def topology(self) -> Topology:
        delays = [float(d) for d in str(self.settings["retry_delays"]).split(",")]
        tiers = RetryPolicy(delays, int(self.settings["max_attempts"])).tiers_ms
        return Topology(str(self.settings["exchange"]), self.queue, tiers)

    async def __aenter__(self) -> Self:
        tokens = self.workdir / "tokens"
        tokens.mkdir(exist_ok=True)
        for installation_id, token in CHAOS_TOKENS.items():
            (tokens / installation_id).write_text(token)
        self.settings.setdefault("vercel_tokens_dir", tokens)
        async with await aio_pika.connect(self.amqp_url) as connection:
            await declare(await open_channel(connection), self.topology)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for worker in self.workers:
            await worker.kill()
        with contextlib.suppress(Exception):
            await self._delete_topology()

    async def _delete_topology(self) -> None:
        topology = self.topology
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            queues = [topology.queue, topology.dead_letter_queue]
            queues += [topology.retry_queue(ms) for ms in topology.retry_tiers_ms]
            for queue in queues:
                await channel.queue_delete(queue)
            await channel.exchange_delete(topology.exchange)

    def worker(self, amqp_url: str | None = None, **overrides: Any) -> WorkerProcess:
        """A worker process (not started) with this scenario's settings and the simulator."""
        settings = {
            **self.settings,
            "amqp_url": amqp_url or self.amqp_url,
            "vercel_api_url": self.sim.url,
            **overrides,
        }
        log = self.workdir / f"worker-{len(self.workers) + 1}.log"
        worker = WorkerProcess(worker_env(**settings), log)
        self.workers.append(worker)
        return worker

    async def publish(self, count: int) -> list[str]:
        """Publish `count` valid events (alternating installations) with confirms; their ids."""
        return await self._publish(count, valid=True)

    async def publish_for(self, installation_id: str, count: int) -> list[str]:
        """Publish `count` valid events of one installation (its token is the caller's job)."""
        return await self._publish(count, valid=True, installations=[installation_id])

    async def publish_invalid(self, count: int) -> list[str]:
        """Publish `count` events without `occurred_at`: each must end as invalid_message."""
        return await self._publish(count, valid=False)

    async def _publish(
        self,
        count: int,
        *,
        valid: bool,
        batch: int = 500,
        installations: list[str] | None = None,
    ) -> list[str]:
        ids = [f"evt_{uuid.uuid4().hex}" for _ in range(count)]
        installations = installations or sorted(CHAOS_TOKENS)
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await open_channel(connection)
            exchange = await channel.get_exchange(str(self.settings["exchange"]))
            for start in range(0, count, batch):
                await asyncio.gather(
                    *(
                        exchange.publish(
                            _event_message(
                                event_id, installations[n % len(installations)], valid=valid
                            ),
                            routing_key="resource.renamed",
                            mandatory=True,
                        )
                        for n, event_id in enumerate(ids[start : start + batch], start)
                    )
                )
        self.published += ids
        return ids

    def delivered(self) -> set[str]:
        return set(delivered_ids(self.sim))

    def unaccounted(self) -> set[str]:
        dead = {event_id for event_id, reason in self.dead_letters if reason is not None}
        return set(self.published) - self.delivered() - dead

    async def collect_dead_letters(self) -> None:
        """Move what is in the DLQ into `dead_letters` (taken off the queue)."""
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            queue = await channel.get_queue(self.topology.dead_letter_queue, ensure=False)
            while (message := await queue.get(fail=False, no_ack=True)) is not None:
                self.dead_letters.append((message.message_id, dead_letter_reason(message.headers)))

    async def queued(self) -> int:
        """Messages ready in the work queue and the retry tiers."""
        topology = self.topology
        names = [topology.queue] + [topology.retry_queue(ms) for ms in topology.retry_tiers_ms]
        total = 0
        async with await aio_pika.connect(self.amqp_url) as connection:
            channel = await connection.channel()
            for name in names:
                declared = await channel.declare_queue(name, passive=True)
                total += declared.declaration_result.message_count or 0
        return total

    async def wait_accounted(self, timeout: float = 120) -> None:  # noqa: ASYNC109 - a deadline
        """Poll until every published id is delivered or dead-lettered, and nothing is queued."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                await self.collect_dead_letters()
                if not self.unaccounted() and await self.queued() == 0:
                    return
            except Exception:  # the broker may be down right now: poll again
                pass
            await asyncio.sleep(0.25)

    async def finish(self, name: str, timeout: float = 120) -> ChaosReport:  # noqa: ASYNC109
        """Wait until everything is accounted for, stop the workers (SIGTERM, exit 0), count,
        print, record and check (lost == 0, and every log line of every worker is JSON)."""
        await self.wait_accounted(timeout)
        seconds = time.monotonic() - self.started
        for worker in self.workers:
            if worker.running:
                assert await worker.stop() == 0, f"worker exit status {worker.returncode}"
        await self.collect_dead_letters()
        for worker in self.workers:
            assert worker.foreign_lines() == [], f"not JSON in {worker.log_path}"
        report = account(name, self.published, delivered_ids(self.sim), self.dead_letters, seconds)
        return report.check()


def _event_message(event_id: str, installation_id: str, *, valid: bool) -> aio_pika.Message:
    """A persistent JSON event whose resource id is its id (so Vercel's side names it)."""
    body = example_event(
        "resource.renamed", id=event_id, installation_id=installation_id, resource_id=event_id
    )
    if not valid:
        del body["occurred_at"]
    return aio_pika.Message(
        json.dumps(body).encode(),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        message_id=event_id,
    )
