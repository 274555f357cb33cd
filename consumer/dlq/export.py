"""The `dlq purge --export` file format: JSON lines, one dead letter per line, exact.

```json
{"format": "vercel-consumer.dlq-export.v1", "body_base64": "eyJpZCI6…",
 "properties": {"message_id": "evt_1", "content_type": "application/json",
                "timestamp": "2026-11-26T10:15:00Z", "headers": {"dead-letter-reason": "…"}}}
```

The body is base64 of the exact bytes. AMQP header values that JSON has no type for are tagged
objects: `{"$bytes": base64}`, `{"$datetime": iso}`, `{"$decimal": "1.5"}`, and
`{"$amqp": base64}` for a table or array nested too deep to unpack (consumer/nesting.py: its
exact AMQP encoding, type byte first); a header table that itself has one key starting with `$`
is wrapped as `{"$table": {...}}` so it cannot be taken for a tag. Decoding gives back the
values aio-pika decoded on export.

`ExportFile` writes a file the way purge needs it: never over an existing file (it may be the
only copy of an earlier purge), durable (the file and its directory fsynced) before anything
it holds is deleted, and removed again if nothing was. `records` reads one back a line at a
time, each line bounded, so that neither a huge export nor `/dev/zero` fills memory.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import orjson

from consumer.errors import ConfigError
from consumer.headers import PROPERTIES
from consumer.nesting import DeepValue

FORMAT = "vercel-consumer.dlq-export.v1"
# The longest line read back: a 16 MiB body (RabbitMQ 4's default max_message_size) in base64,
# with room for its headers. Longer is not an export of ours.
MAX_LINE_BYTES = 32 * 1024 * 1024


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
    except (
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        binascii.Error,
        InvalidOperation,
    ) as exc:
        raise ConfigError(f"line {number} is not a dead-letter export record: {exc}") from None
    return ExportedMessage(body, properties)


def _encode(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, datetime):
        return {"$datetime": value.isoformat()}
    if isinstance(value, Decimal):
        return {"$decimal": str(value)}
    if isinstance(value, DeepValue):
        return {"$amqp": base64.b64encode(value.raw).decode("ascii")}
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
    if tag == "$amqp":
        return DeepValue.parse(base64.b64decode(content, validate=True))
    if tag == "$table":
        return {key: _decode(item) for key, item in content.items()}
    raise ValueError(f"unknown tag {tag}")


class ExportFile:
    """An export being written: appended to record by record, made durable by `commit`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._committed = 0  # bytes made durable
        try:
            self._file = path.open("xb")
        except FileExistsError:
            raise ConfigError(f"{path} exists; give --export a new file name") from None
        except OSError as exc:
            raise ConfigError(f"cannot write {path}: {exc.strerror}; nothing was deleted") from None

    def append(self, record: ExportedMessage) -> None:
        self._write(encode_line(record))

    def commit(self) -> None:
        """Make everything appended so far durable: the file's data, and its directory entry
        (without which a crash could lose a file whose data was synced)."""
        try:
            self._file.flush()
            os.fsync(self._file.fileno())
            _fsync_directory(self.path.parent)
            self._committed = self._file.tell()
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc.strerror}") from None

    def close(self) -> None:
        """Close, keeping what was committed: records appended since (their messages were not
        deleted) are cut off, so the file holds exactly the deleted dead letters."""
        try:
            if self._file.tell() != self._committed:
                self._file.truncate(self._committed)
                self.commit()
        finally:
            self._file.close()

    def discard(self) -> None:
        """Close and remove the file (nothing it holds was deleted), so the name is free."""
        self._file.close()
        self.path.unlink(missing_ok=True)

    def _write(self, line: bytes) -> None:
        try:
            self._file.write(line)
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc.strerror}") from None


def _fsync_directory(directory: Path) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def records(path: Path) -> Iterator[ExportedMessage]:
    """The records of an export file, one at a time; ConfigError naming the line where one
    is not a record (blank lines are skipped)."""
    try:
        with path.open("rb") as file:
            for number, line in enumerate(_lines(file, path), start=1):
                if line.strip():
                    yield decode_line(line, number=number)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _lines(file: Any, path: Path) -> Iterator[bytes]:
    number = 0
    while line := file.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES:
            raise ConfigError(
                f"{path}: line {number} is longer than {MAX_LINE_BYTES // 2**20} MiB; "
                "it is not a dead-letter export"
            )
        yield line
