"""The worker's HTTP endpoint for Kubernetes and Prometheus, served by aiohttp.

- `GET /livez`: 200 `{"alive": true}` while the event loop turns on time; 503 with a reason
  when it has been stalling (see `LoopMonitor`).
- `GET /readyz`: 200 `{"ready": true}` when connected to the broker and consuming; otherwise
  503 `{"ready": false, "reason": …}` (starting, disconnected, shutting_down, circuit_open,
  broker_blocked).
- `GET /metrics`: the `Metrics` registry, in Prometheus' text format or OpenMetrics as the
  scraper asks (prometheus_client's own aiohttp handler).

It runs in the worker's event loop and logs no request: probes come every few seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client.aiohttp import make_aiohttp_handler

from consumer.metrics import Metrics

Readiness = Callable[[], tuple[bool, dict[str, Any]]]


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
        self, readiness: Readiness, metrics: Metrics, monitor: LoopMonitor | None = None
    ) -> None:
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
        runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=1.0)
        await runner.setup()
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
        return web.json_response({"ready": ready, **details}, status=200 if ready else 503)


def _host_in_url(host: str) -> str:
    return f"[{host}]" if ":" in host else host
