"""OpenTelemetry tracing: the spans a delivery makes (in memory and through a real OTLP/HTTP
exporter into a local receiver), the context they carry and forward, and that tracing is off,
importing nothing, unless OTEL_* asks for it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span as OtlpSpan
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from consumer.errors import ConfigError
from consumer.otel import NO_TRACER, exporter_from_environ, tracer_from_environ
from consumer.otel_sdk import SpanTracer, _producer_context, _without_credentials
from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.helpers import event, wait_for_dead_letters, wait_until

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PRODUCER_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{TRACE_ID}-{PRODUCER_SPAN}-01"


@pytest.fixture
def exported() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


def spans_of(exporter: InMemorySpanExporter, kind: SpanKind) -> list[ReadableSpan]:
    return [span for span in exporter.get_finished_spans() if span.kind == kind]


def test_tracing_is_off_unless_an_exporter_is_configured() -> None:
    """No OTEL_* exporter (or `none`, or the SDK disabled): off. An endpoint alone: OTLP."""
    assert exporter_from_environ({}) == "none"
    assert exporter_from_environ({"OTEL_SERVICE_NAME": "relay"}) == "none"
    assert exporter_from_environ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}) == "otlp"
    assert exporter_from_environ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c"}) == "otlp"
    assert exporter_from_environ({"OTEL_TRACES_EXPORTER": "console"}) == "console"
    endpoint_but_none = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_TRACES_EXPORTER": "none"}
    assert exporter_from_environ(endpoint_but_none) == "none"
    disabled = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c", "OTEL_SDK_DISABLED": "true"}
    assert exporter_from_environ(disabled) == "none"
    tracer, why = tracer_from_environ({}, api_url="https://api.vercel.com")
    assert tracer is NO_TRACER
    assert why.startswith("off")


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "zipkin"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
    ],
)
def test_an_exporter_the_relay_cannot_honour_is_a_config_error(environ: dict[str, str]) -> None:
    """A value we cannot honour stops the start with one sentence (exit 2), not silence."""
    with pytest.raises(ConfigError, match="not supported"):
        exporter_from_environ(environ)


def test_with_tracing_off_nothing_of_opentelemetry_is_imported() -> None:
    """The worker's modules and an unconfigured tracer import no opentelemetry module, so
    tracing costs nothing when it is off (bench/otel_overhead.py measures the rest)."""
    code = (
        "import sys, consumer.app, consumer.handler\n"
        "from consumer.otel import tracer_from_environ\n"
        "tracer_from_environ({}, api_url='https://api.vercel.com')\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert result.stdout.strip() == "[]"


@given(
    st.one_of(
        st.text(max_size=80),
        st.binary(max_size=80),
        st.integers(),
        st.none(),
        st.from_regex(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}", fullmatch=True),
    )
)
def test_any_header_value_gives_a_valid_producer_context_or_none(raw: object) -> None:
    """Whatever a publisher puts in `traceparent`, the span's parent is a valid remote
    context with the header's ids, or there is none; nothing raises."""
    context = _producer_context(raw)
    if context is None:
        return
    span_context = trace.get_current_span(context).get_span_context()
    assert span_context.is_valid
    assert span_context.is_remote
    assert isinstance(raw, str | bytes)
    text = raw.decode() if isinstance(raw, bytes) else raw
    assert f"{span_context.trace_id:032x}" in text


def test_url_credentials_never_reach_a_span() -> None:
    """url.full is the API URL without user:password@, whatever else it has."""
    assert _without_credentials("https://u:p@api.example:8443/x") == "https://api.example:8443/x"
    assert _without_credentials("https://tok@[::1]/v") == "https://[::1]/v"
    assert _without_credentials("https://api.vercel.com") == "https://api.vercel.com"


async def test_a_delivery_is_a_process_span_with_a_client_span_for_vercel(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    exported: InMemorySpanExporter,
    names: dict[str, str],
) -> None:
    """One CONSUMER `process` span per delivery, child and link of the producer's context,
    with the messaging attributes; one CLIENT span for the call, child of it, with the HTTP
    attributes; and the client span's context is the traceparent Vercel receives."""
    tracer = SpanTracer(SimpleSpanProcessor(exported), api_url=sim.url)
    await start_relay(tracer=tracer)
    body = event()
    await publisher.publish(body, headers={"traceparent": TRACEPARENT})
    await wait_until(lambda: len(sim.accepted) == 1)
    await wait_until(lambda: len(spans_of(exported, SpanKind.CONSUMER)) == 1)
    (process,) = spans_of(exported, SpanKind.CONSUMER)
    (call,) = spans_of(exported, SpanKind.CLIENT)

    assert process.name == f"process {names['exchange']}"
    assert process.context.trace_id == int(TRACE_ID, 16)
    assert process.parent is not None
    assert process.parent.span_id == int(PRODUCER_SPAN, 16)
    assert [link.context.span_id for link in process.links] == [int(PRODUCER_SPAN, 16)]
    attributes = dict(process.attributes or {})
    assert attributes["messaging.system"] == "rabbitmq"
    assert attributes["messaging.operation.type"] == "process"
    assert attributes["messaging.destination.name"] == names["exchange"]
    assert attributes["messaging.rabbitmq.destination.routing_key"] == body["type"]
    assert attributes["messaging.message.id"] == body["id"]
    assert attributes["vercel_consumer.delivery.attempt"] == 1
    assert attributes["vercel_consumer.outcome"] == "delivered"
    assert process.status.status_code == StatusCode.OK

    assert call.name == "POST"
    assert call.parent is not None
    assert call.parent.span_id == process.context.span_id
    call_attributes = dict(call.attributes or {})
    assert call_attributes["http.request.method"] == "POST"
    assert call_attributes["url.full"] == f"{sim.url}/v1/installations/icfg_alpha/events"
    assert call_attributes["http.response.status_code"] == 201
    assert call_attributes["server.address"] == "127.0.0.1"

    forwarded = {k.lower(): v for k, v in sim.accepted[0].headers.items()}["traceparent"]
    assert forwarded == f"00-{TRACE_ID}-{call.context.span_id:016x}-01"


async def test_a_retried_events_attempts_are_separate_spans_in_one_trace(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    exported: InMemorySpanExporter,
) -> None:
    """Vercel's 503 then 201: two `process` spans, attempts 1 and 2, both in the producer's
    trace; the first says `retried` (an error, with the reason) and its call the 503."""
    tracer = SpanTracer(SimpleSpanProcessor(exported), api_url=sim.url)
    await start_relay(tracer=tracer)
    sim.add_fault(Fault(status=503, times=1))
    await publisher.publish(event(), headers={"traceparent": TRACEPARENT})
    await wait_until(lambda: len(sim.accepted) == 1)
    await wait_until(lambda: len(spans_of(exported, SpanKind.CONSUMER)) == 2)
    first, second = sorted(
        spans_of(exported, SpanKind.CONSUMER),
        key=lambda s: (s.attributes or {})["vercel_consumer.delivery.attempt"],
    )
    assert {first.context.trace_id, second.context.trace_id} == {int(TRACE_ID, 16)}
    assert first.context.span_id != second.context.span_id
    assert (first.attributes or {})["vercel_consumer.outcome"] == "retried"
    assert (first.attributes or {})["vercel_consumer.reason"] == "vercel_unavailable"
    assert first.status.status_code == StatusCode.ERROR
    assert (second.attributes or {})["vercel_consumer.outcome"] == "delivered"
    failed_call = next(
        span
        for span in spans_of(exported, SpanKind.CLIENT)
        if span.parent is not None and span.parent.span_id == first.context.span_id
    )
    assert (failed_call.attributes or {})["http.response.status_code"] == 503
    assert (failed_call.attributes or {})["error.type"] == "503"
    assert failed_call.status.status_code == StatusCode.ERROR


async def test_a_dead_letter_says_why_on_its_span(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    exported: InMemorySpanExporter,
    channel: Any,
    names: dict[str, str],
) -> None:
    """A message without a traceparent starts a trace of its own, whose id the log line
    carries; Vercel's 400 dead-letters it, and the span says `dead_lettered` with the reason,
    as an error."""
    tracer = SpanTracer(SimpleSpanProcessor(exported), api_url=sim.url)
    relay = await start_relay(tracer=tracer)
    sim.add_fault(Fault(status=400, times=1))
    await publisher.publish(event())
    await wait_for_dead_letters(channel, names["queue"], 1)
    await wait_until(lambda: len(spans_of(exported, SpanKind.CONSUMER)) == 1)
    (process,) = spans_of(exported, SpanKind.CONSUMER)
    assert process.parent is None
    assert list(process.links) == []
    dead = next(
        json.loads(line) for line in relay.log_text().splitlines() if "dead_lettered" in line
    )
    assert dead["trace_id"] == f"{process.context.trace_id:032x}"  # logs lead to the trace
    assert (process.attributes or {})["vercel_consumer.outcome"] == "dead_lettered"
    assert (process.attributes or {})["vercel_consumer.reason"] == "rejected_by_vercel"
    assert process.status.status_code == StatusCode.ERROR


@pytest.fixture
async def otlp_receiver() -> AsyncIterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """A local OTLP/HTTP endpoint that decodes each protobuf export request it is sent."""
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", received
    await runner.cleanup()


async def test_spans_reach_a_collector_over_otlp_http(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    otlp_receiver: tuple[str, list[ExportTraceServiceRequest]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Configured only by the standard variables, the real OTLP/HTTP exporter delivers the
    spans, in protobuf, with the service name given: a process and a client span per event."""
    endpoint, received = otlp_receiver
    monkeypatch.setenv("OTEL_SERVICE_NAME", "relay-under-test")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)  # read by the exporter too
    tracer, why = tracer_from_environ(os.environ, api_url=sim.url)
    assert why == "on: otlp exporter"
    relay = await start_relay(tracer=tracer)
    await publisher.publish(event(), headers={"traceparent": TRACEPARENT})
    await wait_until(lambda: len(sim.accepted) == 1)
    await relay.shutdown()
    await asyncio.to_thread(tracer.shutdown)  # flushes the batch (a blocking HTTP POST)

    spans = [
        (resource.resource, span)
        for request in received
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    by_kind = {span.kind: span for _, span in spans}
    assert sorted(by_kind) == [OtlpSpan.SPAN_KIND_CLIENT, OtlpSpan.SPAN_KIND_CONSUMER]
    process, call = by_kind[OtlpSpan.SPAN_KIND_CONSUMER], by_kind[OtlpSpan.SPAN_KIND_CLIENT]
    assert process.trace_id.hex() == TRACE_ID == call.trace_id.hex()
    assert process.parent_span_id.hex() == PRODUCER_SPAN
    assert call.parent_span_id == process.span_id
    attributes = {a.key: a.value for a in process.attributes}
    assert attributes["messaging.system"].string_value == "rabbitmq"
    services = {
        a.value.string_value
        for resource, _ in spans
        for a in resource.attributes
        if a.key == "service.name"
    }
    assert services == {"relay-under-test"}


async def test_rate_limit_waits_are_events_on_the_delivery_span(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    exported: InMemorySpanExporter,
) -> None:
    """With CONSUMER_MAX_RPS=4, four events at once: the later ones wait their turn, and each
    wait is a `rate_limit.global_wait` event with its seconds on that delivery's span."""
    tracer = SpanTracer(SimpleSpanProcessor(exported), api_url=sim.url)
    await start_relay(tracer=tracer, max_rps=4)
    for _ in range(4):
        await publisher.publish(event())
    await wait_until(lambda: len(spans_of(exported, SpanKind.CONSUMER)) == 4)
    waits = [
        float((e.attributes or {})["wait_seconds"])
        for span in spans_of(exported, SpanKind.CONSUMER)
        for e in span.events
        if e.name == "rate_limit.global_wait"
    ]
    assert len(waits) >= 3
    assert all(0 < wait <= 1.0 for wait in waits)
