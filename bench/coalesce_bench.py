"""Coalescing on and off over the same burst: Vercel calls made, msg/s, CPU per message.

    python bench/coalesce_bench.py [--messages N] [--repeat R] [--latency-ms L] [--concurrency C]

N events (default 20,000) are preloaded in bursts of R (default 10) consecutive updates to the
same resource, so 1 - 1/R of them (90 %) repeat a key that is waiting already. Then the real
`vercel-consumer run` consumes them, once with `CONSUMER_COALESCE=true` and once with `false`,
each on a fresh topology, against the simulator answering after L ms (default 50: Vercel's real
latencies are 50-300 ms). A run ends when the worker's /metrics count every message as
delivered. It prints one row per mode and asserts nothing about time.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

import httpx
from harness import (
    AMQP_URL,
    INSTALLATION,
    TOKEN,
    Process,
    Window,
    bench_connection,
    declared,
    event_publisher,
    free_port,
    simulator,
)
from relay_bench import fresh_topology, relay_command

from consumer.contract import example_event

DELIVERED = (
    'vercel_consumer_deliveries_total{event_family="resource",outcome="delivered",reason=""}'
)


def burst_event(index: int, repeat: int) -> dict[str, Any]:
    """Event `index`: one of `repeat` consecutive updates to resource `res_<index // repeat>`."""
    return example_event(
        "resource.renamed",
        id=f"evt_coalesce_{index:08d}",
        installation_id=INSTALLATION,
        resource_id=f"res_{index // repeat}",
        product_id=f"prod_{index}",
    )


async def preload(exchange: str, messages: int, repeat: int) -> None:
    async with event_publisher(exchange) as publisher:
        for first in range(0, messages, 1000):
            batch = range(first, min(first + 1000, messages))
            await asyncio.gather(
                *(publisher.publish(burst_event(i, repeat), validate=False) for i in batch)
            )


async def delivered(http: httpx.AsyncClient, url: str) -> tuple[float, float]:
    """(messages delivered, calls saved) from the worker's /metrics; 0s until it answers."""
    try:
        text = (await http.get(url)).text
    except httpx.HTTPError:
        return 0.0, 0.0
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    return float(values.get(DELIVERED, 0)), float(values.get("vercel_consumer_coalesced_total", 0))


async def run_mode(options: argparse.Namespace, coalesce: bool) -> dict[str, Any]:
    topology = fresh_topology()
    port = free_port()
    async with (
        simulator(options.latency_ms) as sim,
        await bench_connection() as admin,
        declared(admin, topology),
        httpx.AsyncClient() as http,
    ):
        await preload(topology.exchange, options.messages, options.repeat)
        await sim.reset()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CONSUMER_")},
            "CONSUMER_AMQP_URL": AMQP_URL,
            "CONSUMER_VERCEL_API_URL": sim.url,
            "CONSUMER_VERCEL_TOKEN": TOKEN,
            "CONSUMER_EXCHANGE": topology.exchange,
            "CONSUMER_QUEUE": topology.queue,
            "CONSUMER_CONCURRENCY": str(options.concurrency),
            "CONSUMER_LOG_LEVEL": "warning",
            "CONSUMER_HEALTH_HOST": "127.0.0.1",
            "CONSUMER_HEALTH_PORT": str(port),
            "CONSUMER_COALESCE": "true" if coalesce else "false",
        }
        metrics_url = f"http://127.0.0.1:{port}/metrics"
        async with Process.started("relay", relay_command(), env=env) as process:
            while (await delivered(http, metrics_url))[0] == 0:
                process.check_alive()
                await asyncio.sleep(0.01)
            window = Window.open([process], {"simulator": sim.process.pid})
            deadline = time.monotonic() + options.max_seconds
            while (done := await delivered(http, metrics_url))[0] < options.messages:
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            measured = window.close()
            calls = await sim.accepted()
    return {
        "mode": "on" if coalesce else "off",
        "messages": int(done[0]),
        "calls": calls,
        "saved": int(done[1]),
        "seconds": measured.seconds,
        "cpu_ms": measured.cpu_seconds / max(done[0], 1) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    options = parser.parse_args()
    print(
        f"coalesce bench: {options.messages} messages in bursts of {options.repeat},"
        f" simulator latency {options.latency_ms:g} ms, concurrency {options.concurrency},"
        f" load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    print("coalescing  messages  calls  saved  seconds   msg/s  cpu ms/msg")
    for coalesce in (True, False):
        row = asyncio.run(run_mode(options, coalesce))
        rate = row["messages"] / row["seconds"]
        print(
            f"{row['mode']:<10}  {row['messages']:>8}  {row['calls']:>5}  {row['saved']:>5}"
            f"  {row['seconds']:>7.2f}  {rate:>6.0f}  {row['cpu_ms']:>10.3f}",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
