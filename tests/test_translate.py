"""Pure translation of contract events into Create Event requests."""

from __future__ import annotations

import re

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.contract import parse_event
from consumer.errors import ContractError, Reason
from consumer.translate import events_path, translate
from tests.helpers import event


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


HOSTILE_IDS = [".", "..", "../../v2/x?y=1#z", "a/b", "a%2Fb", "%2e%2e", "icfg\n", "ic fg", "ü"]
ONE_SEGMENT = re.compile(r"/v1/installations/[A-Za-z0-9_-]{1,128}/events")


@pytest.mark.parametrize("installation_id", HOSTILE_IDS)
def test_an_id_that_could_leave_its_path_segment_is_invalid(installation_id: str) -> None:
    """Dot segments, slashes, percent signs, whitespace and non-ASCII break the contract's
    installation id pattern: invalid_message, never a request (a `..` survives encoding)."""
    with pytest.raises(ContractError) as caught:
        request_for(installation_id=installation_id)
    assert caught.value.reason is Reason.INVALID_MESSAGE
    with pytest.raises(ContractError):
        events_path(installation_id)


@given(st.text(max_size=140) | st.from_regex(r"[A-Za-z0-9_.%/-]{1,130}", fullmatch=True))
def test_no_request_ever_leaves_the_one_segment_path(installation_id: str) -> None:
    """Whatever the id, the contract and the path builder agree: either it is refused as
    invalid, or the request goes to `/v1/installations/{one plain segment}/events`."""
    body = orjson.dumps(event(installation_id=installation_id))
    try:
        path = translate(parse_event(body, max_bytes=10_000)).path
    except ContractError:
        return
    assert ONE_SEGMENT.fullmatch(path)
    assert path.split("/")[3] not in (".", "..")
