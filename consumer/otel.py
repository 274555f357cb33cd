"""Tracing as the handler sees it: a `Tracer` that opens one span per delivery and one per call
to Vercel, and notes waits and the outcome on them.

Tracing is on only when an exporter is configured with the standard OpenTelemetry variables
(`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or
`OTEL_TRACES_EXPORTER=otlp|console`) and the `otel` extra is installed. Otherwise the handler
gets `NO_TRACER`, whose methods do nothing, and nothing of OpenTelemetry is ever imported: the
spans cost nothing when off. consumer/otel_sdk.py makes the spans when on; docs/operations.md
("Tracing") lists what they hold.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Protocol

from aio_pika.abc import AbstractIncomingMessage

from consumer.errors import ConfigError

EXPORTERS = ("otlp", "console", "none")
PROTOCOLS = ("http/protobuf",)  # the exporter the extra ships; grpc would need another package


class CallSpan(Protocol):
    """The span of one call to Vercel."""

    def forward(self, headers: dict[str, str] | None) -> dict[str, str] | None:
        """The trace headers to send: this call's own context when tracing, else `headers`."""

    def answered(self, status: int) -> None:
        """Vercel's HTTP status (a failure's status is read from the error it raises)."""


class Tracer(Protocol):
    def delivery(
        self, message: AbstractIncomingMessage, attempt: int
    ) -> AbstractContextManager[object]:
        """The `process` span of one delivery; current while the delivery is handled."""

    def vercel_call(self, path: str) -> AbstractContextManager[CallSpan]:
        """A CLIENT span for one Create Event call to `path` (a child of the delivery's)."""

    def event(self, name: str, **attributes: float | str) -> None:
        """Note a moment on the current delivery's span (a rate-limit wait, an open circuit)."""

    def outcome(self, outcome: str, reason: str = "", detail: str | None = None) -> None:
        """The delivery's outcome, as the span's status and attributes."""

    def trace_id(self) -> str | None:
        """The current delivery's trace id (32 hex digits) when it is traced, for log lines."""

    def shutdown(self) -> None:
        """Export what is buffered; called once when the worker stops."""


class _Nothing:
    """The no-op tracer, its spans and its context managers: one object that does nothing."""

    def delivery(self, message: AbstractIncomingMessage, attempt: int) -> _Nothing:
        return self

    def vercel_call(self, path: str) -> _Nothing:
        return self

    def event(self, name: str, **attributes: float | str) -> None:
        pass

    def outcome(self, outcome: str, reason: str = "", detail: str | None = None) -> None:
        pass

    def trace_id(self) -> None:
        return None

    def shutdown(self) -> None:
        pass

    def forward(self, headers: dict[str, str] | None) -> dict[str, str] | None:
        return headers

    def answered(self, status: int) -> None:
        pass

    def __enter__(self) -> _Nothing:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None


NO_TRACER: Tracer = _Nothing()


def exporter_from_environ(environ: Mapping[str, str]) -> str:
    """Which exporter the OTEL_* variables ask for: `otlp`, `console`, or `none` (tracing off).
    Raises ConfigError for a value this relay cannot honour."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter not in ("", *EXPORTERS):
        raise ConfigError(
            f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: use otlp, console or none"
        )
    protocol = environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "")
    ).strip()
    if protocol and protocol not in PROTOCOLS:
        raise ConfigError(f"OTLP protocol {protocol!r} is not supported: use http/protobuf")
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    if exporter:
        return exporter
    return "otlp" if endpoint else "none"


def tracer_from_environ(environ: Mapping[str, str], *, api_url: str) -> tuple[Tracer, str]:
    """The tracer the OTEL_* variables ask for, and a sentence saying what tracing does (for
    the start-up log line). NO_TRACER when off or when the `otel` extra is not installed."""
    exporter = exporter_from_environ(environ)
    if exporter == "none":
        return NO_TRACER, "off: no OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_TRACES_EXPORTER"
    try:
        from consumer import otel_sdk  # here: imported only when tracing is on
    except ImportError:
        return NO_TRACER, "off: OTEL_* is set but the otel extra is not installed"
    return otel_sdk.build(exporter, api_url=api_url), f"on: {exporter} exporter"
