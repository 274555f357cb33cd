"""W3C Trace Context: accept a message's `traceparent` header value, or refuse it.

Pure. Version 00 is the only version there is: `00-<trace-id>-<parent-id>-<trace-flags>`,
55 characters, lowercase hex, neither id all zeros
(https://www.w3.org/TR/trace-context/#traceparent-header). Without tracing (consumer/otel.py)
the relay puts the trace id in its log lines and forwards the header unchanged on the call to
Vercel, as the specification allows a participant that does not trace; with tracing on, the
header is the parent of its spans and the Vercel call's own context is forwarded. A value that
is anything else is refused and not forwarded; a malformed header would only break the trace.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEADER = "traceparent"
_VERSION_00 = re.compile(r"00-(?P<trace_id>[0-9a-f]{32})-(?P<parent_id>[0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE_ID = "0" * 32
_ZERO_PARENT_ID = "0" * 16


@dataclass(frozen=True, slots=True)
class TraceParent:
    """A valid `traceparent`: `value` is what to forward, the ids are for log lines."""

    value: str
    trace_id: str
    parent_id: str


def parse_traceparent(raw: object) -> TraceParent | None:
    """The trace context in an AMQP header value (str or bytes), or None when absent or invalid."""
    if isinstance(raw, bytes | bytearray):
        try:
            raw = bytes(raw).decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(raw, str):
        return None
    value = raw.strip(" \t")  # optional white space around a header value, as in HTTP
    match = _VERSION_00.fullmatch(value)
    if match is None:
        return None
    trace_id, parent_id = match["trace_id"], match["parent_id"]
    if trace_id == _ZERO_TRACE_ID or parent_id == _ZERO_PARENT_ID:
        return None
    return TraceParent(value, trace_id, parent_id)
