"""What tracing costs per delivery: the tracer calls the handler makes for one message (the
`process` span, a rate-limit event, the Vercel call's CLIENT span with its forwarded context,
the outcome), with tracing off (NO_TRACER, what runs when no OTEL_* exporter is configured) and
on (the SDK with a batch processor and an exporter that drops the spans, so that only our side
is measured), sampling every delivery or one in ten.

    python bench/otel_overhead.py [--deliveries N]

Prints microseconds of CPU per delivery for each and the share of the relay's own CPU per
message (bench/README.md: about 220 µs per message at 4,456 msg/s on one core).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from collections.abc import Sequence
from typing import Any

from aio_pika.message import IncomingMessage
from aiormq.abc import DeliveredMessage
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from pamqp.commands import Basic
from pamqp.header import ContentHeader

from consumer.otel import NO_TRACER, Tracer
from consumer.otel_sdk import SpanTracer

RELAY_US_PER_MESSAGE = 220.0
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Dropping(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def a_message() -> IncomingMessage:
    header = ContentHeader(
        properties=Basic.Properties(message_id="evt_1", headers={"traceparent": TRACEPARENT})
    )
    deliver = Basic.Deliver(
        consumer_tag="bench", delivery_tag=1, exchange="domain-events", routing_key="resource.x"
    )
    delivered = DeliveredMessage(delivery=deliver, header=header, body=b"{}", channel=None)  # type: ignore[arg-type]
    return IncomingMessage(delivered, no_ack=True)


async def one_delivery(tracer: Tracer, message: Any) -> None:
    with tracer.delivery(message, 1):
        tracer.trace_id()
        tracer.event("rate_limit.wait", wait_seconds=0.01)
        with tracer.vercel_call("/v1/installations/icfg_a/events") as call:
            call.forward({"traceparent": TRACEPARENT})
            call.answered(201)
        tracer.outcome("delivered")


async def cpu_per_delivery(tracer: Tracer, deliveries: int) -> float:
    message = a_message()
    for _ in range(1000):  # warm up
        await one_delivery(tracer, message)
    started = time.process_time()
    for _ in range(deliveries):
        await one_delivery(tracer, message)
    return (time.process_time() - started) / deliveries * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deliveries", type=int, default=50_000)
    options = parser.parse_args()
    rows = [("off", asyncio.run(cpu_per_delivery(NO_TRACER, options.deliveries)))]
    # The provider reads the sampler from OTEL_TRACES_SAMPLER(_ARG) when it is made.
    for name, sampler, ratio in (
        ("on, all", "always_on", "1"),
        ("on, 10 %", "traceidratio", "0.1"),
    ):
        os.environ["OTEL_TRACES_SAMPLER"], os.environ["OTEL_TRACES_SAMPLER_ARG"] = sampler, ratio
        processor = BatchSpanProcessor(Dropping(), max_queue_size=200_000)
        tracer = SpanTracer(processor, api_url="https://api.vercel.com")
        rows.append((name, asyncio.run(cpu_per_delivery(tracer, options.deliveries))))
        tracer.shutdown()
    print(f"{'tracing':<10} {'µs CPU/delivery':>16} {'share of relay CPU/msg':>24}")
    for name, us in rows:
        print(f"{name:<10} {us:>16.2f} {us / RELAY_US_PER_MESSAGE:>23.1%}")


if __name__ == "__main__":
    main()
