"""The spans, made with the OpenTelemetry SDK (the `otel` extra); imported only when tracing is
configured (consumer/otel.py decides).

Spans of our own rather than opentelemetry-instrumentation-aio-pika/-aiohttp-client: those
wrap every channel callback and every aiohttp request, emit the older attribute names
(`net.peer.name`, `http.url`, `http.status_code`), know nothing of our outcomes, waits or
delivery attempts, and the aiohttp one would put the full URL on every span; ours are the
current conventions, one span per delivery and one per Vercel call, nothing else.

Context: the message's W3C `traceparent` is the producer's context. Each delivery handles one
message, so, as the messaging conventions recommend for single-message processing, it is the
parent of the `process` span and also its link. The Vercel call's own context is what is
forwarded to Vercel. A retried event keeps its `traceparent` header, so each attempt is a
separate `process` span in the producer's trace.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import SplitResult, urlsplit, urlunsplit

from aio_pika.abc import AbstractIncomingMessage
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from consumer._version import __version__
from consumer.errors import VercelError
from consumer.tracing import HEADER, parse_traceparent

SCOPE = "vercel-event-consumer"
URL_TEMPLATE = "/v1/installations/{installation_id}/events"
_PROPAGATOR = TraceContextTextMapPropagator()
# Outcomes that mean this attempt failed; `deferred` only waits, `delivered` succeeded.
_FAILED = {"retried", "dead_lettered", "returned"}


def build(exporter: str, *, api_url: str) -> SpanTracer:
    """A tracer exporting through `exporter` (`otlp` or `console`), configured by OTEL_*."""
    if exporter == "console":
        span_exporter: SpanExporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )

        span_exporter = OTLPSpanExporter()
    return SpanTracer(BatchSpanProcessor(span_exporter), api_url=api_url)


class SpanTracer:
    """consumer.otel.Tracer, with OpenTelemetry spans."""

    def __init__(self, processor: SpanProcessor, *, api_url: str) -> None:
        # Resource.create() reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; the provider
        # reads OTEL_TRACES_SAMPLER(_ARG); the exporter OTEL_EXPORTER_OTLP_*.
        resource = Resource.create({"service.version": __version__})
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": SCOPE}))  # none given: ours
        self._provider = TracerProvider(resource=resource)
        self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer(SCOPE, __version__)
        self._base_url = _without_credentials(api_url.rstrip("/"))
        parts = urlsplit(self._base_url)
        self._server: dict[str, str | int] = {
            "server.address": parts.hostname or "",
            "server.port": _port(parts),
        }

    @contextmanager
    def delivery(self, message: AbstractIncomingMessage, attempt: int) -> Iterator[Span]:
        producer = _producer_context(message.headers.get(HEADER) if message.headers else None)
        links = [Link(trace.get_current_span(producer).get_span_context())] if producer else []
        exchange = message.exchange or ""
        attributes: dict[str, str | int] = {
            "messaging.system": "rabbitmq",
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": exchange,
            "messaging.rabbitmq.destination.routing_key": message.routing_key or "",
            "vercel_consumer.delivery.attempt": attempt,
        }
        if message.message_id:
            attributes["messaging.message.id"] = message.message_id
        if message.delivery_tag is not None:
            attributes["messaging.rabbitmq.message.delivery_tag"] = message.delivery_tag
        with self._tracer.start_as_current_span(
            f"process {exchange}".rstrip(),
            context=producer or Context(),  # a message without one starts a trace of its own
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        ) as span:
            yield span

    @contextmanager
    def vercel_call(self, path: str) -> Iterator[_CallSpan]:
        attributes: dict[str, str | int] = {
            "http.request.method": "POST",
            "url.full": self._base_url + path,
            "url.template": URL_TEMPLATE,
            **self._server,
        }
        with self._tracer.start_as_current_span(
            "POST", kind=SpanKind.CLIENT, attributes=attributes, record_exception=False
        ) as span:
            call = _CallSpan(span)
            try:
                yield call
            except VercelError as error:
                call.failed(error)
                raise

    def event(self, name: str, **attributes: float | str) -> None:
        trace.get_current_span().add_event(name, attributes)

    def outcome(self, outcome: str, reason: str = "", detail: str | None = None) -> None:
        span = trace.get_current_span()
        span.set_attribute("vercel_consumer.outcome", outcome)
        if reason:
            span.set_attribute("vercel_consumer.reason", reason)
        if detail:
            span.set_attribute("vercel_consumer.detail", detail[:500])
        if outcome in _FAILED:
            span.set_attribute("error.type", reason or outcome)
            span.set_status(Status(StatusCode.ERROR, f"{outcome}: {reason or detail or ''}"))
        elif outcome == "delivered":
            span.set_status(Status(StatusCode.OK))

    def trace_id(self) -> str | None:
        context = trace.get_current_span().get_span_context()
        return f"{context.trace_id:032x}" if context.is_valid else None

    def shutdown(self) -> None:
        self._provider.shutdown()


class _CallSpan:
    def __init__(self, span: Span) -> None:
        self._span = span

    def forward(self, headers: dict[str, str] | None) -> dict[str, str]:
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, trace.set_span_in_context(self._span))
        return carrier if HEADER in carrier else dict(headers or {})

    def answered(self, status: int) -> None:
        self._span.set_attribute("http.response.status_code", status)

    def failed(self, error: VercelError) -> None:
        """HTTP conventions: a 4xx/5xx answer or no answer at all is an error of this call."""
        if error.status is not None:
            self._span.set_attribute("http.response.status_code", error.status)
        error_type = str(error.status) if error.status is not None else type(error).__name__
        self._span.set_attribute("error.type", error_type)
        self._span.set_status(Status(StatusCode.ERROR, str(error)[:200]))


def _producer_context(raw: object) -> Context | None:
    """The producer's context from a `traceparent` value, None when absent or invalid."""
    parsed = parse_traceparent(raw)
    if parsed is None:
        return None
    context = _PROPAGATOR.extract({HEADER: parsed.value})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def _without_credentials(url: str) -> str:
    """`url` with any user:password@ removed: a span attribute is not a place for secrets."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def _port(parts: SplitResult) -> int:
    if parts.port is not None:
        return parts.port
    return 443 if parts.scheme == "https" else 80
