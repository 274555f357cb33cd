"""The `dlq purge --export` file format: JSON lines, one dead letter per line, exact.

```json
{"format": "vercel-consumer.dlq-export.v1", "body_base64": "eyJpZCI6…",
 "properties": {"message_id": "evt_1", "content_type": "application/json",
                "timestamp": "2026-11-26T10:15:00Z", "headers": {"dead-letter-reason": "…"}}}
```

The body is base64 of the exact bytes. AMQP header values that JSON has no type for are tagged
objects: `{"$bytes": base64}`, `{"$datetime": iso}`, `{"$decimal": "1.5"}`; a header table that
itself has one key starting with `$` is wrapped as `{"$table": {...}}` so it cannot be taken for
a tag. Decoding gives back the values aio-pika decoded on export. No I/O here: consumer/dlq/ops.py
writes and reads the file.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from typing import Any

import orjson

from consumer.errors import ConfigError

FORMAT = "vercel-consumer.dlq-export.v1"
# Basic properties kept, in AMQP's order; `headers` is encoded apart.
PROPERTIES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)


@dataclass(frozen=True, slots=True)
class ExportedMessage:
    """A dead letter as exported: its exact body and its properties (headers among them)."""

    body: bytes
    properties: dict[str, Any]

    @property
    def headers(self) -> dict[str, Any]:
        headers = self.properties.get("headers")
        return dict(headers) if isinstance(headers, Mapping) else {}


def encode_line(message: ExportedMessage) -> bytes:
    """One line (with its newline) of the export file."""
    properties: dict[str, Any] = {}
    for name in PROPERTIES:
        value = message.properties.get(name)
        if value is not None:
            properties[name] = value.isoformat() if isinstance(value, datetime) else value
    properties["headers"] = {key: _encode(value) for key, value in message.headers.items()}
    line = {
        "format": FORMAT,
        "body_base64": base64.b64encode(message.body).decode("ascii"),
        "properties": properties,
    }
    return orjson.dumps(line) + b"\n"


def decode_line(line: bytes, *, number: int) -> ExportedMessage:
    """Parse line `number` of an export; ConfigError naming the line when it is not one."""
    try:
        data = orjson.loads(line)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} record")
        body = base64.b64decode(data["body_base64"], validate=True)
        raw = data.get("properties") or {}
        properties = {name: raw[name] for name in PROPERTIES if raw.get(name) is not None}
        if "timestamp" in properties:
            properties["timestamp"] = datetime.fromisoformat(properties["timestamp"])
        headers = raw.get("headers") or {}
        properties["headers"] = {key: _decode(value) for key, value in headers.items()}
    except (ValueError, KeyError, TypeError, binascii.Error, InvalidOperation) as exc:
        raise ConfigError(f"line {number} is not a dead-letter export record: {exc}") from None
    return ExportedMessage(body, properties)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, list | tuple):
        return [_encode(item) for item in value]
    if isinstance(value, Mapping):
        table = {str(key): _encode(item) for key, item in value.items()}
        return {"$table": table} if _looks_tagged(table) else table
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(item) for item in value]
    if not isinstance(value, dict):
        return value
    if _looks_tagged(value):
        [(tag, content)] = value.items()
        return _untag(tag, content)
    return {key: _decode(item) for key, item in value.items()}


def _looks_tagged(table: Mapping[str, Any]) -> bool:
    return len(table) == 1 and next(iter(table)).startswith("$")


def _untag(tag: str, content: Any) -> Any:
    if tag == "$bytes":
        # bytearray, not bytes: it is what pamqp encodes as an AMQP byte array.
        return bytearray(base64.b64decode(content, validate=True))
    if tag == "$datetime":
        return datetime.fromisoformat(content)
    if tag == "$decimal":
        return Decimal(content)
    if tag == "$table":
        return {key: _decode(item) for key, item in content.items()}
    raise ValueError(f"unknown tag {tag}")
