"""The inbound message contract (v1): bytes from RabbitMQ → a validated `Event`.

Publishers send one JSON object per message; `docs/contract.md` is its prose and
`consumer/schemas/event.v1.schema.json` its JSON Schema, generated from the models below
(`python -m consumer.contract > consumer/schemas/event.v1.schema.json`; a test keeps the
shipped file in step). Anything that does not fit raises `ContractError` with a short,
human-readable reason that ends up as the dead letter's detail. Pure: no I/O.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
)

from consumer.errors import ContractError

SCHEMA_ID = "https://vercel-event-consumer.local/schemas/event.v1.schema.json"

# A verb is one or more dot-separated words: resource.renamed, resource.status.changed.
_VERB = r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*"
_Id = Annotated[str, Field(min_length=1, max_length=256)]
# The event id travels as the AMQP message_id, a short string of at most 255 bytes: a longer one
# (256 ASCII characters, or 86 CJK ones) cannot be published at all, and the client library
# raised TypeError from inside a publish (found by the hostile-identity property test).
MESSAGE_ID_MAX_BYTES = 255


def _fits_message_id(value: str) -> str:
    if len(value.encode("utf-8", "surrogatepass")) > MESSAGE_ID_MAX_BYTES:
        raise ValueError(
            f"must be at most {MESSAGE_ID_MAX_BYTES} bytes in UTF-8 (it is the AMQP message_id)"
        )
    return value


_EventId = Annotated[
    str, Field(min_length=1, max_length=MESSAGE_ID_MAX_BYTES), AfterValidator(_fits_message_id)
]
# Vercel's installation ids look like `icfg_…`; the id becomes one URL path segment and a token
# file's name, so only characters that are the same in both, and never `.` or `..`, are allowed.
INSTALLATION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
_InstallationId = Annotated[str, Field(pattern=INSTALLATION_ID_PATTERN)]


class _EventBase(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)

    id: _EventId = Field(
        description="Unique per event; also the AMQP message_id, so at most 255 bytes in UTF-8."
    )
    occurred_at: AwareDatetime = Field(description="RFC 3339 timestamp with an offset.")
    installation_id: _InstallationId = Field(
        description="Vercel's integrationConfigurationId, such as icfg_3kX9a: ASCII letters,"
        " digits, '_' and '-', at most 128."
    )
    data: dict[str, Any] | None = Field(None, description="Free-form; ignored by the relay.")


class ResourceEvent(_EventBase):
    """A resource linked to Vercel changed: → Vercel `resource.updated`."""

    type: str = Field(pattern=rf"^resource\.{_VERB}$", max_length=255)
    resource_id: _Id
    product_id: _Id | None = None


class BillingEvent(_EventBase):
    """An installation's billing plan changed at the partner: → Vercel `installation.updated`."""

    type: str = Field(pattern=rf"^billing\.{_VERB}$", max_length=255)
    billing_plan_id: _Id | None = None


Event = ResourceEvent | BillingEvent
FAMILIES = ("resource", "billing")  # a type's first word; the verb after it is free-form


def _type_family(value: Any) -> str | None:
    event_type = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if isinstance(event_type, str):
        family = event_type.partition(".")[0]
        if family in FAMILIES:
            return family
    return None


_EVENT = TypeAdapter[Event](
    Annotated[
        Annotated[ResourceEvent, Tag("resource")] | Annotated[BillingEvent, Tag("billing")],
        Discriminator(
            _type_family,
            custom_error_type="unknown_type_family",
            custom_error_message=(
                "body must be a JSON object whose 'type' is 'resource.<verb>' or 'billing.<verb>'"
            ),
        ),
    ]
)


def parse_event(body: bytes, *, max_bytes: int) -> Event:
    """Validate one message body; raise ContractError saying why it can never be delivered."""
    if len(body) > max_bytes:
        raise ContractError(f"body is {len(body)} bytes, more than the limit of {max_bytes}")
    try:
        return _EVENT.validate_json(body)
    except ValidationError as exc:
        raise ContractError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """`resource_id: Field required; occurred_at: Input should have timezone info`."""
    problems = []
    for error in exc.errors(include_input=False, include_url=False, include_context=False):
        # Drop the union tag ("resource"/"billing") pydantic puts first in the location.
        loc = [str(part) for part in error["loc"] if part not in ("resource", "billing")]
        problems.append(f"{'.'.join(loc) or 'body'}: {error['msg']}")
    return "; ".join(problems)


def json_schema() -> dict[str, Any]:
    """The contract as a JSON Schema document (draft 2020-12)."""
    schema = _EVENT.json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "Domain event (v1) relayed to Vercel Create Event",
        **schema,
    }


def example_event(event_type: str = "resource.renamed", **fields: Any) -> dict[str, Any]:
    """A valid event as a dict, for docs, the publish command and tests to start from."""
    body: dict[str, Any] = {
        "id": "evt_0001",
        "type": event_type,
        "occurred_at": datetime.now().astimezone().isoformat(timespec="seconds"),
        "installation_id": "icfg_demo",
    }
    if event_type.startswith("resource."):
        body["resource_id"] = "res_demo"
    body.update(fields)
    return body


if __name__ == "__main__":
    print(json.dumps(json_schema(), indent=2))
