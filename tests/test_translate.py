"""Pure translation of contract events into Create Event requests."""

from __future__ import annotations

import io
import re
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from consumer.contract import INSTALLATION_ID_PATTERN, parse_event
from consumer.errors import ContractError, Reason
from consumer.logs import configure_logging, get_logger
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


# ── hostile identities: event, resource, product and billing plan ids ──────────────────────

# Any text (every Unicode category but lone surrogates, which no UTF-8 JSON body can carry:
# the contract refuses their escapes), path and URL delimiters, control characters (C0, DEL,
# C1, line and paragraph separators, bidi overrides) and lengths around every limit (256
# characters; 255 bytes for the event id, which is the AMQP message_id).
HOSTILE_TEXT = st.one_of(
    st.text(st.characters(exclude_categories=["Cs"]), max_size=40),
    st.text(
        st.sampled_from("./%?#\\ \x00\n\r\t\x1b\x7f\x85\x9b\u2028\u202e\ufeffaé中"), max_size=12
    ),
    st.sampled_from([".", "..", "%2e%2e", "../../v2/x?y=1#z", "a/b", "%", "\x1b[2J", "\u202eevil"]),
    st.integers(250, 260).map(lambda n: "a" * n),
    st.integers(126, 130).map(lambda n: "é" * n),  # 2 bytes each: 127 → 254, 128 → 256
    st.integers(84, 87).map(lambda n: "中" * n),  # 3 bytes each: 85 → 255, 86 → 258
)
OPTIONAL = st.none() | HOSTILE_TEXT
INSTALLATIONS = st.sampled_from(["icfg_alpha", "I" * 128]) | HOSTILE_TEXT


def fits(value: str | None, *, max_bytes: int | None = None) -> bool:
    """What the contract promises to accept for an id: 1 to 256 characters (and for the event
    id, at most 255 bytes in UTF-8); None for an optional one."""
    if value is None:
        return True
    if max_bytes is not None and len(value.encode()) > max_bytes:
        return False
    return 1 <= len(value) <= 256


@example(
    family="resource",
    event_id="a" * 256,  # 256 characters were valid, and no AMQP message_id can hold them
    installation_id="icfg_alpha",
    resource_id="x" * 256,
    product_id="\x00",
)
@example(
    family="resource",
    event_id="中" * 86,  # 86 characters, 258 bytes
    installation_id="icfg_alpha",
    resource_id="../../v2/x?y=1#z",
    product_id="%2e%2e",
)
@example(
    family="billing",
    event_id="\x1b[2J\n",
    installation_id="icfg_alpha",
    resource_id="unused",
    product_id="\u2028\u202e",
)
@given(
    family=st.sampled_from(["resource", "billing"]),
    event_id=HOSTILE_TEXT,
    installation_id=INSTALLATIONS,
    resource_id=HOSTILE_TEXT,
    product_id=OPTIONAL,  # the billing plan id for a billing event
)
def test_hostile_ids_are_refused_or_carried_exactly_on_the_one_segment_path(
    family: str, event_id: str, installation_id: str, resource_id: str, product_id: str | None
) -> None:
    """Whatever the event, resource, product and billing plan ids hold (dots, slashes, percent
    signs, Unicode, control characters, any length): the event is refused as invalid_message
    exactly when an id breaks its documented limit, with a detail that quotes none of them
    (printable ASCII); otherwise the request goes to `/v1/installations/{the id}/events` and its
    JSON body carries exactly the given ids, no more (round trip through JSON)."""
    fields: dict[str, Any] = {"id": event_id, "installation_id": installation_id}
    if family == "resource":
        fields |= {"resource_id": resource_id, "product_id": product_id}
        wanted: dict[str, Any] = {"type": "resource.updated", "resourceId": resource_id}
        if product_id is not None:
            wanted["productId"] = product_id
        valid = fits(resource_id) and fits(product_id)
    else:
        fields["billing_plan_id"] = product_id
        wanted = {"type": "installation.updated"}
        if product_id is not None:
            wanted["billingPlanId"] = product_id
        valid = fits(product_id)
    valid = valid and fits(event_id, max_bytes=255)
    valid = valid and re.fullmatch(INSTALLATION_ID_PATTERN, installation_id, re.ASCII) is not None
    body = orjson.dumps(event(f"{family}.changed", **fields))
    if not valid:
        with pytest.raises(ContractError) as refused:
            translate(parse_event(body, max_bytes=len(body)))
        assert refused.value.reason is Reason.INVALID_MESSAGE
        assert refused.value.detail.isascii()  # quotes none of the ids: the dead letter's
        assert refused.value.detail.isprintable()  # detail and log line stay plain
        return
    parsed = parse_event(body, max_bytes=len(body))
    request = translate(parsed)
    assert parsed.id == event_id
    assert ONE_SEGMENT.fullmatch(request.path)
    assert request.path.split("/")[3] == installation_id
    assert orjson.loads(request.body) == {"event": wanted}


@given(event_id=HOSTILE_TEXT, installation_id=HOSTILE_TEXT)
def test_log_lines_carry_hostile_ids_escaped_one_line_each(
    event_id: str, installation_id: str
) -> None:
    """The worker logs event and installation ids as they came (message_id, body): in JSON
    each record stays one line with every C0 control escaped, and reads back as the same ids;
    in the console format every value is quoted with its non-printable characters escaped.
    (orjson leaves DEL, C1 controls and U+2028 raw but valid inside a JSON string: the
    guarantee is one record per line, as a JSON parser and `split(b"\\n")` read it.)"""
    stream = io.BytesIO()
    configure_logging("json", "info", stream=stream)
    get_logger("consumer.test").info(
        "delivered", event_id=event_id, installation_id=installation_id
    )
    line = stream.getvalue()
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert not any(byte < 0x20 for byte in line[:-1])
    record = orjson.loads(line)
    assert (record["event_id"], record["installation_id"]) == (event_id, installation_id)
    text = io.StringIO()
    configure_logging("console", "info", stream=text)
    get_logger("consumer.test").info("delivered", event_id=event_id)
    console = text.getvalue()
    assert console.endswith("\n")
    assert console[:-1].isprintable(), repr(console)
