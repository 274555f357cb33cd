"""Pure translation of contract events into Create Event requests."""

from __future__ import annotations

import orjson

from consumer.contract import parse_event
from consumer.translate import translate
from tests.conftest import event


def request_for(
    event_type: str = "resource.renamed", **fields: object
) -> tuple[str, dict[str, object]]:
    body = orjson.dumps(event(event_type, **fields))
    request = translate(parse_event(body, max_bytes=10_000))
    return request.path, orjson.loads(request.body)


def test_resource_event_becomes_resource_updated() -> None:
    """resource.* → resource.updated with resourceId and productId."""
    path, body = request_for(resource_id="res_1", product_id="prod_1")
    assert path == "/v1/installations/icfg_alpha/events"
    assert body == {
        "event": {"type": "resource.updated", "resourceId": "res_1", "productId": "prod_1"}
    }


def test_absent_product_id_is_omitted_not_null() -> None:
    """Without product_id the request has no productId key at all."""
    _, body = request_for(resource_id="res_1")
    assert body == {"event": {"type": "resource.updated", "resourceId": "res_1"}}


def test_billing_event_becomes_installation_updated() -> None:
    """billing.* → installation.updated with billingPlanId when present, omitted when not."""
    _, body = request_for(event_type="billing.plan_changed", billing_plan_id="plan_pro")
    assert body == {"event": {"type": "installation.updated", "billingPlanId": "plan_pro"}}
    _, body = request_for(event_type="billing.plan_changed")
    assert body == {"event": {"type": "installation.updated"}}


def test_installation_id_is_one_encoded_path_segment() -> None:
    """An id with '/', '?' or '..' cannot leave its path segment."""
    path, _ = request_for(installation_id="../../v2/x?y=1#z")
    assert path == "/v1/installations/..%2F..%2Fv2%2Fx%3Fy%3D1%23z/events"
