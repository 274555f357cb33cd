"""The worker's HTTP endpoint for Kubernetes and Prometheus, served by aiohttp.

- `GET /livez`: 200 `{"alive": true}` while the event loop turns on time; 503 with a reason
  when it has been stalling (see `LoopMonitor`).
- `GET /readyz`: 200 `{"ready": true}` when connected to the broker and consuming; otherwise
  503 `{"ready": false, "reason": …}` (starting, disconnected, shutting_down, circuit_open,
  broker_blocked).
- `GET /metrics`: the `Metrics` registry (or the outbox relay's), in Prometheus' text format
  or OpenMetrics as the scraper asks (prometheus_client's own aiohttp handler).

It runs in the worker's event loop and logs no request: probes come every few seconds.

It is hardened against idle or slow clients (slowloris) on the pod network: a connection that
has not sent a whole request within `idle_timeout` (5 s) is closed, and beyond
`max_connections` (64) open connections the oldest are closed first, so a flood can neither
exhaust the worker's file descriptors (its token files need them) nor crowd out a fresh probe,
which sends its request at once. When the process does run out of descriptors, asyncio's
accept error is logged once a minute without its traceback, not hundreds of times a second.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.aiohttp import make_aiohttp_handler

from consumer.logs import get_logger

Readiness = Callable[[], tuple[bool, dict[str, Any]]]
IDLE_TIMEOUT = 5.0  # seconds a connection may sit without a complete request (probes: ms)
MAX_CONNECTIONS = 64  # open at once; beyond, the oldest are closed
ACCEPT_ERROR_EVERY = 60.0  # seconds between two log lines about failing accepts
_PUBLIC_READINESS = frozenset({"status", "reason", "cause", "circuit"})


class Served(Protocol):
    """What the endpoint serves: the worker's `Metrics`, or the outbox relay's."""

    registry: CollectorRegistry
    event_loop_lag: Gauge


class LoopMonitor:
    """Whether the event loop runs on time, judged by a heartbeat task.

    A liveness check served *by* the event loop it checks cannot report a loop that is wedged
    for good (a blocking call, a busy loop): it cannot answer at all. That case is the
    kubelet's probe timeout: no answer within `timeoutSeconds` counts as a failure. What the
    heartbeat catches is the loop that still answers now and then but stalls for seconds at a
    time: every `interval` seconds it notes how late it woke up (also exported as
    `vercel_consumer_event_loop_lag_seconds`). /livez fails while a beat in the last `window`
    seconds came more than `max_lag` late, or when beats stopped altogether (the task died).
    One stall fails the probes of one `window` only, fewer than a failureThreshold of 3;
    stalls that keep coming fail every probe and get the pod restarted.
    """

    def __init__(
        self,
        *,
        interval: float = 1.0,
        max_lag: float = 5.0,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_lag = max_lag
        self.window = window
        self._clock = clock
        self._last_beat = clock()
        self._last_stall: tuple[float, float] | None = None  # (when, how late)

    def beat(self, lag: float) -> None:
        """Record a heartbeat that came `lag` seconds later than it was due."""
        now = self._clock()
        self._last_beat = now
        if lag > self.max_lag:
            self._last_stall = (now, lag)

    def check(self) -> tuple[bool, dict[str, Any]]:
        """(alive, details): details say why not."""
        now = self._clock()
        silent = now - self._last_beat
        if silent > self.interval + self.max_lag:
            return False, {"reason": "heartbeat_stopped", "seconds_since_beat": round(silent, 3)}
        if self._last_stall is not None and now - self._last_stall[0] <= self.window:
            return False, {
                "reason": "event_loop_stalled",
                "lag_seconds": round(self._last_stall[1], 3),
            }
        return True, {}

    async def run(self, on_lag: Callable[[float], None]) -> None:
        """Beat every `interval` seconds until cancelled, passing each lag to `on_lag`."""
        loop = asyncio.get_running_loop()
        self._last_beat = self._clock()
        while True:
            due = loop.time() + self.interval
            await asyncio.sleep(self.interval)
            lag = max(0.0, loop.time() - due)
            self.beat(lag)
            on_lag(lag)


class HealthServer:
    """Serves /livez, /readyz and /metrics; `start()` it, and `stop()` it after the worker."""

    def __init__(
        self,
        readiness: Readiness,
        metrics: Served,
        monitor: LoopMonitor | None = None,
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._idle_timeout = idle_timeout
        self._max_connections = max_connections
        self._readiness = readiness
        self._metrics = metrics
        self.monitor = monitor or LoopMonitor()
        self._runner: web.AppRunner | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self.url: str | None = None

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", make_aiohttp_handler(self._metrics.registry))
        return app

    async def start(self, host: str, port: int) -> str:
        """Listen on host:port (0: a free port); return the base URL. OSError if it cannot."""
        runner = web.AppRunner(
            self._app(),
            access_log=None,
            shutdown_timeout=1.0,
            # aiohttp arms this timer when a connection opens and again after each answer: it
            # is also the limit for receiving a request's headers.
            keepalive_timeout=self._idle_timeout,
        )
        await runner.setup()
        assert runner.server is not None
        _shed_oldest_beyond(runner.server, self._max_connections)
        _quiet_accept_errors(asyncio.get_running_loop())
        try:
            site = web.TCPSite(runner, host, port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        bound = runner.addresses[0]
        self.url = f"http://{_host_in_url(bound[0])}:{bound[1]}"
        self._heartbeat = asyncio.create_task(self.monitor.run(self._metrics.event_loop_lag.set))
        return self.url

    @property
    def open_connections(self) -> int:
        """Connections open to the endpoint right now."""
        server = self._runner.server if self._runner is not None else None
        return sum(1 for h in server.connections if h.transport is not None) if server else 0

    async def stop(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.wait({self._heartbeat})
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _livez(self, request: web.Request) -> web.Response:
        alive, details = self.monitor.check()
        return web.json_response({"alive": alive, **details}, status=200 if alive else 503)

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, details = self._readiness()
        # Reason codes only: the broker's error (its host, an auth failure) is in the log, not
        # for anyone on the pod network to read.
        public = {key: value for key, value in details.items() if key in _PUBLIC_READINESS}
        return web.json_response({"ready": ready, **public}, status=200 if ready else 503)


def _shed_oldest_beyond(server: web.Server, limit: int) -> None:
    """Close the oldest connections whenever more than `limit` are open."""
    track = server.connection_made

    def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        track(handler, transport)
        open_handlers = [h for h in server.connections if h.transport is not None]
        for oldest in open_handlers[: max(0, len(open_handlers) - limit)]:
            oldest.force_close()

    server.connection_made = connection_made  # type: ignore[method-assign]


def _quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Log asyncio's 'accept() out of system resource' (EMFILE) once a minute, without the
    traceback it carries each time; every other loop error goes where it went before."""
    previous = loop.get_exception_handler()
    last_logged = -ACCEPT_ERROR_EVERY

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        nonlocal last_logged
        if not str(context.get("message", "")).startswith("socket.accept() out of system"):
            if previous is None:
                loop.default_exception_handler(context)
            else:
                previous(loop, context)
            return
        now = time.monotonic()
        if now - last_logged >= ACCEPT_ERROR_EVERY:
            last_logged = now
            error = context.get("exception")
            log = get_logger("consumer.health")
            log.warning("cannot accept connections", error=str(error), every_s=ACCEPT_ERROR_EVERY)

    loop.set_exception_handler(handler)


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
