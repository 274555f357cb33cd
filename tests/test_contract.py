"""The message contract: what parses, what is refused and why, and the shipped JSON Schema."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

import jsonschema
import orjson
import pytest

from consumer.contract import BillingEvent, ResourceEvent, json_schema, parse_event
from consumer.errors import ContractError, Reason
from tests.helpers import event

LIMIT = 256 * 1024


def parse(body: Any) -> Any:
    return parse_event(body if isinstance(body, bytes) else orjson.dumps(body), max_bytes=LIMIT)


def test_resource_event_parses_with_optional_product() -> None:
    """A resource.* event with product_id parses to a ResourceEvent carrying it."""
    parsed = parse(event("resource.suspended", resource_id="r", product_id="p"))
    assert isinstance(parsed, ResourceEvent)
    assert (parsed.resource_id, parsed.product_id) == ("r", "p")


def test_billing_event_parses() -> None:
    """A billing.* event parses to a BillingEvent; billing_plan_id is optional."""
    parsed = parse(event("billing.plan_changed", billing_plan_id="plan_pro"))
    assert isinstance(parsed, BillingEvent)
    assert parsed.billing_plan_id == "plan_pro"
    assert parse(event("billing.plan_changed")).billing_plan_id is None


def test_unknown_fields_and_data_are_ignored() -> None:
    """Unknown top-level fields and the data object do not affect parsing."""
    parsed = parse(event(data={"name": "db-1"}, schema_version=7, extra={"x": 1}))
    assert isinstance(parsed, ResourceEvent)


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b"not json", "Invalid JSON"),
        (b"\xff\xfe\x00", "Invalid JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"a string"', "JSON object"),
        (b"{}", "type"),
        ({"type": "order.created"}, "type"),
        ({"type": 42}, "type"),
        ({**event(), "id": 12}, "id"),
        ({**event(), "id": ""}, "id"),
        ({**event(), "installation_id": None}, "installation_id"),
        ({**event(), "occurred_at": "2026-01-01T10:00:00"}, "occurred_at"),
        ({**event(), "occurred_at": "yesterday"}, "occurred_at"),
        ({**event(), "resource_id": ["r"]}, "resource_id"),
        ({**event(), "data": "not an object"}, "data"),
        ({**event("billing.x"), "billing_plan_id": 5}, "billing_plan_id"),
        (b'{"a":' * 5000 + b"1" + b"}" * 5000, "JSON"),
    ],
)
def test_invalid_bodies_raise_contract_error_naming_the_problem(body: Any, mentions: str) -> None:
    """Every broken body raises ContractError (invalid_message) whose text says what broke."""
    with pytest.raises(ContractError) as caught:
        parse(body)
    assert caught.value.reason is Reason.INVALID_MESSAGE
    assert mentions in caught.value.detail


def test_resource_event_requires_resource_id() -> None:
    """resource_id is required for resource.* events only."""
    body = event()
    del body["resource_id"]
    with pytest.raises(ContractError, match="resource_id: Field required"):
        parse(body)


def test_body_over_the_limit_is_refused_before_parsing() -> None:
    """A body larger than max_bytes is refused with its size and the limit."""
    with pytest.raises(ContractError, match="2000 bytes, more than the limit of 1000"):
        parse_event(b" " * 2000, max_bytes=1000)


def test_shipped_schema_matches_the_models() -> None:
    """consumer/schemas/event.v1.schema.json is exactly what the models generate."""
    shipped = resources.files("consumer").joinpath("schemas/event.v1.schema.json").read_text()
    assert json.loads(shipped) == json_schema()


@pytest.mark.parametrize(
    "body",
    [
        event(),
        event("billing.plan_changed", billing_plan_id="p"),
        {**event(), "resource_id": None},
        {**event(), "type": "order.created"},
        {k: v for k, v in event().items() if k != "occurred_at"},
        {**event(), "id": 3},
    ],
)
def test_json_schema_and_parser_agree(body: dict[str, Any]) -> None:
    """A body is valid under the published JSON Schema exactly when the consumer accepts it."""
    validator = jsonschema.Draft202012Validator(
        json_schema(), format_checker=jsonschema.FormatChecker()
    )
    try:
        parse(body)
        accepted = True
    except ContractError:
        accepted = False
    assert validator.is_valid(body) == accepted
