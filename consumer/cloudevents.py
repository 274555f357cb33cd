"""CloudEvents 1.0 in: a message in either content mode → our contract's `Event`.

- **Structured mode:** `content_type: application/cloudevents+json`; the body is the whole
  event (attributes and `data`) as one JSON object.
- **Binary mode:** the attributes are message headers and the body is `data`. A message is in
  binary mode when a `specversion` attribute is among its headers under one of the prefixes
  real producers use: `cloudEvents_` and `cloudEvents:` (the AMQP binding's application
  properties, which RabbitMQ hands to AMQP 0-9-1 consumers as headers), `ce-` and `ce_`
  (Knative eventing-rabbitmq, the SDK's RabbitMQ binding), or none at all. Without a prefix
  only the spec's own attribute names count, so that `traceparent` and friends stay headers.
  Prefixes match in any case; attribute names are lowercased, as the spec requires them.

Mapping (docs/contract.md, "CloudEvents"): `id` → `id`; `time` → `occurred_at` (required
here); `type` → `type`, either our own (`resource.renamed`) or reverse-DNS namespaced
(`com.partner.resource.renamed`): its segments before the first `resource` or `billing`
segment are the producer's namespace and dropped; `data` (a JSON object) → the body's other
fields (`installation_id`, `resource_id`, `product_id`, `billing_plan_id`, ...). `source`,
`subject` and every other attribute come back as `ce_<name>` log fields. Anything else is a
`ContractError` saying exactly what is wrong (the dead letter's detail). Pure: no I/O.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from consumer.contract import FAMILIES, Event, parse_event
from consumer.errors import ContractError

STRUCTURED_CONTENT_TYPE = "application/cloudevents+json"
SPECVERSION = "1.0"
BINARY_PREFIXES = ("cloudevents_", "cloudevents:", "ce-", "ce_")  # compared lowercased
# The spec's context attributes: the only names taken from unprefixed headers.
SPEC_ATTRIBUTES = frozenset(
    {"id", "source", "specversion", "type", "datacontenttype", "dataschema", "subject", "time"}
)
REQUIRED = ("specversion", "id", "source", "type")
_NAME = re.compile(r"^[a-z0-9]{1,20}$")  # the spec's rule for attribute names
LOG_VALUE_CHARS = 200  # an attribute's value is cut to this in log lines
LOG_ATTRIBUTES = 16  # at most this many extension attributes are logged


def parse_message(
    headers: Mapping[str, Any] | None, content_type: str | None, body: bytes, *, max_bytes: int
) -> tuple[Event, dict[str, str]]:
    """Validate one message, our own body or a CloudEvent in either mode: the event and the
    CloudEvent's attributes as log fields (empty for our own body)."""
    if len(body) > max_bytes:
        raise ContractError(f"body is {len(body)} bytes, more than the limit of {max_bytes}")
    if _media_type(content_type) == STRUCTURED_CONTENT_TYPE:
        mode, attributes, data = "structured", *_structured(body)
    elif (binary := binary_attributes(headers or {})) is not None:
        mode, attributes = "binary", binary
        data = _binary_data(attributes.get("datacontenttype") or content_type, body)
    else:
        return parse_event(body, max_bytes=max_bytes), {}
    try:
        contract_body = _contract_body(attributes, data)
        event = parse_event(contract_body, max_bytes=len(contract_body))
    except ContractError as error:
        raise ContractError(f"CloudEvent ({mode} mode): {error.detail}") from None
    return event, log_fields(attributes)


def binary_attributes(headers: Mapping[str, Any]) -> dict[str, Any] | None:
    """The CloudEvent attributes among `headers`, or None when they hold no `specversion`
    (then nothing about them is an error: the message is our own body with its headers)."""
    attributes: dict[str, Any] = {}
    problems: list[str] = []
    for key, raw in headers.items():
        name = _attribute_name(str(key))
        if name is None:
            continue
        value = _header_value(raw)
        if value is None:
            problems.append(f"header {key!r} is not UTF-8")
        elif name in attributes and attributes[name] != value:
            problems.append(
                f"attribute {name!r} is given twice with different values (header {key!r})"
            )
        else:
            attributes[name] = value
    if "specversion" not in attributes:
        return None
    if problems:
        raise ContractError(f"CloudEvent (binary mode): {problems[0]}")
    return attributes


def _attribute_name(key: str) -> str | None:
    lowered = key.lower()
    for prefix in BINARY_PREFIXES:
        if lowered.startswith(prefix):
            name = lowered[len(prefix) :]
            return name if _NAME.match(name) else None
    return lowered if lowered in SPEC_ATTRIBUTES else None


def _header_value(value: Any) -> Any:
    """A header's value, bytes decoded; None for bytes that are not UTF-8."""
    if isinstance(value, bytes | bytearray):
        try:
            return bytes(value).decode()
        except UnicodeDecodeError:
            return None
    return value


def _structured(body: bytes) -> tuple[dict[str, Any], Any]:
    """A structured-mode body's attributes and data."""
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContractError(f"CloudEvent (structured mode): body is not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise ContractError("CloudEvent (structured mode): body must be a JSON object")
    if "data_base64" in document:
        raise ContractError(
            "CloudEvent (structured mode): data_base64 is not accepted; data must be a JSON object"
        )
    data = document.pop("data", None)
    if not _is_json(document.get("datacontenttype")):
        raise ContractError(
            f"CloudEvent (structured mode): datacontenttype"
            f" {document['datacontenttype']!r} is not JSON"
        )
    return document, data


def _binary_data(content_type: Any, body: bytes) -> Any:
    if not _is_json(content_type):
        raise ContractError(
            f"CloudEvent (binary mode): data must be JSON, content type is {content_type!r}"
        )
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContractError(f"CloudEvent (binary mode): data is not JSON: {exc}") from None


def _is_json(content_type: Any) -> bool:
    """Absent (JSON by default), `application/json` or any `+json` type."""
    if content_type is None:
        return True
    media = _media_type(str(content_type))
    return media == "application/json" or media.endswith("+json")


def _media_type(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


def _contract_body(attributes: Mapping[str, Any], data: Any) -> bytes:
    """Our contract's body: `data`'s fields, then id, type and occurred_at from attributes."""
    for name in REQUIRED:
        value = attributes.get(name)
        if not isinstance(value, str) or not value:
            raise ContractError(f"required attribute {name!r} is missing or not a string")
    if attributes["specversion"] != SPECVERSION:
        raise ContractError(
            f"specversion {attributes['specversion']!r} is not supported (only {SPECVERSION})"
        )
    if not isinstance(data, dict):
        raise ContractError(f"data must be a JSON object, got {_json_kind(data)}")
    return json.dumps(
        {
            **data,
            "id": attributes["id"],
            "type": contract_type(attributes["type"]),
            "occurred_at": occurred_at(attributes.get("time")),
        }
    ).encode()


def contract_type(ce_type: str) -> str:
    """`resource.renamed` as it is; `com.partner.resource.renamed` → `resource.renamed`."""
    segments = ce_type.split(".")
    for index, segment in enumerate(segments[:-1]):
        if segment in FAMILIES:
            return ".".join(segments[index:])
    raise ContractError(
        f"type {ce_type!r} names no event family: it must be 'resource.<verb>' or"
        " 'billing.<verb>', optionally after a reverse-DNS namespace"
        " ('com.partner.resource.renamed')"
    )


def occurred_at(time: Any) -> str:
    """`time` as an RFC 3339 string: a string as it is (the contract checks it), an AMQP
    timestamp (milliseconds since the epoch, or a datetime) converted."""
    if time is None:
        raise ContractError("attribute 'time' is required here: it becomes occurred_at")
    if isinstance(time, datetime):
        return (time if time.tzinfo else time.replace(tzinfo=UTC)).isoformat()
    if isinstance(time, int) and not isinstance(time, bool):
        return datetime.fromtimestamp(time / 1000, UTC).isoformat()
    if isinstance(time, str):
        return time
    raise ContractError(f"attribute 'time' must be an RFC 3339 string, got {_json_kind(time)}")


def log_fields(attributes: Mapping[str, Any]) -> dict[str, str]:
    """Every attribute but data's as a `ce_<name>` log field, values cut short, extensions
    capped in number (a hostile producer cannot flood a log line)."""
    fields: dict[str, str] = {}
    extensions = 0
    for name, value in attributes.items():
        if not isinstance(name, str) or not _NAME.match(name):
            continue
        if name not in SPEC_ATTRIBUTES:
            extensions += 1
            if extensions > LOG_ATTRIBUTES:
                continue
        fields[f"ce_{name}"] = str(value)[:LOG_VALUE_CHARS]
    return fields


def _json_kind(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean"}
    if value is None:
        return "null"
    return names.get(type(value), "a number" if isinstance(value, int | float) else "a value")
