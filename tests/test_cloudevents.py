"""CloudEvents in: messages made by the official `cloudevents` SDK (structured mode, the
RabbitMQ binding's `ce-` headers, the AMQP binding's `cloudEvents_` properties) and the other
prefixes real producers use, parsed into our contract; hostile ones refused with a precise
detail; and the same messages through the real broker, a real worker and the simulator."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel
from cloudevents.core.bindings import amqp as ce_amqp
from cloudevents.core.bindings import rabbitmq as ce_rabbitmq
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from hypothesis import given
from hypothesis import strategies as st

from consumer.cloudevents import parse_message
from consumer.contract import ResourceEvent
from consumer.errors import ContractError
from consumer.testing.vercel_sim import VercelSimulator
from tests.helpers import wait_for_dead_letters, wait_until

LIMIT = 262144
DATA = {"installation_id": "icfg_alpha", "resource_id": "db_42", "product_id": "prod_pg"}


def sdk_event(ce_type: str = "resource.renamed", **attributes: Any) -> CloudEvent:
    values: dict[str, Any] = {
        "id": f"evt_{uuid.uuid4().hex[:12]}",
        "source": "/partner/orders-service",
        "type": ce_type,
        "time": datetime(2026, 11, 26, 10, 15, tzinfo=UTC),
        "datacontenttype": "application/json",
        "subject": "db_42",
        **attributes,
    }
    return CloudEvent(attributes=values, data=dict(DATA))


Wire = tuple[dict[str, Any], str | None, bytes]  # headers, content_type, body


def structured(event: CloudEvent) -> Wire:
    message = ce_rabbitmq.to_structured(event, JSONFormat())
    return dict(message.headers), message.content_type, message.body


def rabbitmq_binary(event: CloudEvent, prefix: str = "ce-") -> Wire:
    message = ce_rabbitmq.to_binary(event, JSONFormat())
    headers = {prefix + key.removeprefix("ce-"): value for key, value in message.headers.items()}
    return headers, message.content_type, message.body


def amqp_binary(event: CloudEvent, prefix: str = "cloudEvents_") -> Wire:
    message = ce_amqp.to_binary(event, JSONFormat())
    headers = {
        prefix + key.removeprefix("cloudEvents_"): value
        for key, value in message.application_properties.items()
    }
    return headers, message.properties.get("content-type"), message.application_data


WIRES: dict[str, Callable[[CloudEvent], Wire]] = {
    "structured": structured,
    "binary ce-": rabbitmq_binary,
    "binary ce_": lambda e: rabbitmq_binary(e, "ce_"),
    "binary unprefixed": lambda e: rabbitmq_binary(e, ""),
    "binary cloudEvents_": amqp_binary,
    "binary cloudEvents:": lambda e: amqp_binary(e, "cloudEvents:"),
}


@pytest.mark.parametrize("mode", sorted(WIRES))
def test_sdk_messages_in_every_mode_map_onto_the_contract(mode: str) -> None:
    """id → id, type → type, time → occurred_at, data → the other fields; source, subject
    and specversion come back as ce_* log fields."""
    made = sdk_event()
    event, fields = parse_message(*WIRES[mode](made), max_bytes=LIMIT)
    assert isinstance(event, ResourceEvent)
    assert event.id == made.get_id()
    assert event.type == "resource.renamed"
    assert event.occurred_at == datetime(2026, 11, 26, 10, 15, tzinfo=UTC)
    assert (event.installation_id, event.resource_id, event.product_id) == (
        "icfg_alpha",
        "db_42",
        "prod_pg",
    )
    assert fields["ce_source"] == "/partner/orders-service"
    assert fields["ce_subject"] == "db_42"
    assert fields["ce_specversion"] == "1.0"


def test_a_reverse_dns_type_drops_its_namespace() -> None:
    """`com.partner.resource.renamed` is our `resource.renamed`; the log keeps the original."""
    event, fields = parse_message(
        *structured(sdk_event("com.partner.resource.renamed")), max_bytes=LIMIT
    )
    assert event.type == "resource.renamed"
    assert fields["ce_type"] == "com.partner.resource.renamed"


def test_our_own_body_is_not_taken_for_a_cloudevent() -> None:
    """A plain contract body with a traceparent header parses as before, with no ce_ fields."""
    body = json.dumps(
        {"id": "e", "type": "billing.plan_changed", "occurred_at": TIME, "installation_id": "i"}
    ).encode()
    event, fields = parse_message(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        "application/json",
        body,
        max_bytes=LIMIT,
    )
    assert event.type == "billing.plan_changed"
    assert fields == {}


TIME = "2026-01-01T00:00:00Z"


def ce_json(**fields: Any) -> bytes:
    """A structured-mode body: valid attributes, then `fields`."""
    attributes = {"specversion": "1.0", "id": "e", "source": "/s", "type": "resource.x"}
    return json.dumps({**attributes, "time": TIME, "data": {}, **fields}).encode()


def test_headers_that_look_like_attributes_do_not_spoil_our_own_body() -> None:
    """Without a specversion header the message is our own body: attribute-like headers that
    disagree or are not UTF-8 are not errors (they would be on a CloudEvent)."""
    body = json.dumps(
        {"id": "e", "type": "billing.plan_changed", "occurred_at": TIME, "installation_id": "i"}
    ).encode()
    headers = {"ce-id": "a", "id": "b", "type": b"\xff\xfe"}
    event, fields = parse_message(headers, "application/json", body, max_bytes=LIMIT)
    assert (event.id, fields) == ("e", {})


INVALID: dict[str, tuple[Wire, str]] = {
    "no time": (
        (
            {"ce-specversion": "1.0", "ce-id": "e", "ce-source": "/s", "ce-type": "resource.x"},
            "application/json",
            b'{"installation_id": "i", "resource_id": "r"}',
        ),
        "CloudEvent (binary mode): attribute 'time' is required here: it becomes occurred_at",
    ),
    "no source": (
        (
            {
                "ce-specversion": "1.0",
                "ce-id": "e",
                "ce-type": "resource.x",
                "ce-time": "2026-01-01T00:00:00Z",
            },
            None,
            b"{}",
        ),
        "CloudEvent (binary mode): required attribute 'source' is missing or not a string",
    ),
    "old specversion": (
        (
            {},
            "application/cloudevents+json",
            b'{"specversion": "0.3", "id": "e", "source": "/s", "type": "resource.x"}',
        ),
        "CloudEvent (structured mode): specversion '0.3' is not supported (only 1.0)",
    ),
    "text data": (
        ({"ce-specversion": "1.0"}, "text/plain", b"hello"),
        "CloudEvent (binary mode): data must be JSON, content type is 'text/plain'",
    ),
    "array data": (
        (
            {},
            "application/cloudevents+json",
            ce_json(data=[1]),
        ),
        "CloudEvent (structured mode): data must be a JSON object, got an array",
    ),
    "foreign type": (
        (
            {},
            "application/cloudevents+json",
            ce_json(type="com.x.order.created"),
        ),
        "CloudEvent (structured mode): type 'com.x.order.created' names no event family",
    ),
    "missing installation": (
        (
            {},
            "application/cloudevents+json",
            ce_json(data={"resource_id": "r"}),
        ),
        "CloudEvent (structured mode): installation_id: Field required",
    ),
    "two prefixes disagree": (
        ({"ce-specversion": "1.0", "cloudEvents_id": "a", "ce_id": "b"}, None, b"{}"),
        "CloudEvent (binary mode): attribute 'id' is given twice with different values",
    ),
    "header not UTF-8": (
        ({"ce-specversion": "1.0", "ce-source": b"\xff"}, None, b"{}"),
        "CloudEvent (binary mode): header 'ce-source' is not UTF-8",
    ),
    "base64 data": (
        ({}, "application/cloudevents+json", b'{"specversion": "1.0", "data_base64": "e30="}'),
        "CloudEvent (structured mode): data_base64 is not accepted",
    ),
}


@pytest.mark.parametrize("case", sorted(INVALID))
def test_an_invalid_cloudevent_is_refused_saying_exactly_why(case: str) -> None:
    """Each broken CloudEvent raises ContractError whose detail names the mode and the fault."""
    (headers, content_type, body), detail = INVALID[case]
    with pytest.raises(ContractError) as caught:
        parse_message(headers, content_type, body, max_bytes=LIMIT)
    assert caught.value.detail.startswith(detail), caught.value.detail


HEADER_VALUES = st.one_of(
    st.text(max_size=40), st.binary(max_size=40), st.integers(), st.booleans(), st.none()
)
HEADER_KEYS = st.one_of(
    st.sampled_from(["ce-specversion", "ce_id", "cloudEvents:time", "type", "ce-type", "id"]),
    st.text(max_size=30),
)


@given(
    headers=st.dictionaries(HEADER_KEYS, HEADER_VALUES, max_size=12),
    content_type=st.one_of(
        st.none(),
        st.sampled_from(["application/cloudevents+json", "application/json", "text/plain"]),
        st.text(max_size=20),
    ),
    body=st.one_of(
        st.binary(max_size=200), st.sampled_from([b"{}", b"[]", b'{"data": 1}', b"null"])
    ),
)
def test_hostile_messages_raise_only_contract_errors(
    headers: dict[str, Any], content_type: str | None, body: bytes
) -> None:
    """Whatever the headers, content type and body, parsing returns or raises ContractError,
    and the log fields are bounded."""
    try:
        _, fields = parse_message(headers, content_type, body, max_bytes=LIMIT)
    except ContractError as error:
        detail = error.detail
    else:
        detail = "parsed"
        assert all(len(value) <= 200 for value in fields.values())
    assert detail


# ── through the broker, a worker and the simulator ───────────────────────────────────────────


async def test_sdk_cloudevents_reach_vercel_through_a_real_worker(
    start_relay: Any, sim: VercelSimulator, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """One SDK-made CloudEvent per mode and prefix, routed by our type, each reaches Vercel as
    resource.updated; an invalid one is dead-lettered as invalid_message with the detail.
    (Coalescing, which would merge these updates of one resource into fewer calls, is off.)"""
    relay = await start_relay(coalesce=False)
    exchange = await channel.get_exchange(names["exchange"])
    sent = {}
    for mode, wire in WIRES.items():
        made = sdk_event("com.partner.resource.renamed")
        headers, content_type, body = wire(made)
        sent[made.get_id()] = mode
        await exchange.publish(
            aio_pika.Message(
                body, headers=headers, content_type=content_type, message_id=made.get_id()
            ),
            routing_key="resource.renamed",
        )
    (headers, content_type, body), detail = INVALID["missing installation"]
    await exchange.publish(
        aio_pika.Message(body, headers=headers, content_type=content_type, message_id="e"),
        routing_key="resource.renamed",
    )
    await wait_until(lambda: len(sim.accepted) == len(WIRES))
    for accepted in sim.accepted:
        assert accepted.installation_id == "icfg_alpha"
        assert accepted.event == {
            "type": "resource.updated",
            "resourceId": "db_42",
            "productId": "prod_pg",
        }
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.headers["dead-letter-reason"] == "invalid_message"
    assert str(dead.headers["dead-letter-detail"]).startswith(detail)
    delivered = [
        line
        for line in map(json.loads, relay.log_text().splitlines())
        if line.get("event") == "delivered"
    ]
    assert {line["event_id"] for line in delivered} == set(sent)
    assert all(line["ce_source"] == "/partner/orders-service" for line in delivered)
    assert all(line["ce_type"] == "com.partner.resource.renamed" for line in delivered)
