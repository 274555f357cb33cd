"""W3C traceparent: what is accepted, and that it reaches Vercel and the log lines."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from consumer.tracing import TraceParent, parse_traceparent
from tests.helpers import event, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
VALID = f"00-{TRACE_ID}-{PARENT_ID}-01"
LOWER_HEX = "0123456789abcdef"


def test_a_valid_traceparent_is_accepted_with_its_ids() -> None:
    """Version 00 with lowercase hex ids is accepted, as text or as AMQP bytes."""
    expected = TraceParent(VALID, TRACE_ID, PARENT_ID)
    assert parse_traceparent(VALID) == expected
    assert parse_traceparent(VALID.encode()) == expected
    assert parse_traceparent(f" {VALID}\t") == expected


@given(
    trace_id=st.text(LOWER_HEX, min_size=32, max_size=32).filter(lambda v: set(v) != {"0"}),
    parent_id=st.text(LOWER_HEX, min_size=16, max_size=16).filter(lambda v: set(v) != {"0"}),
    flags=st.text(LOWER_HEX, min_size=2, max_size=2),
)
def test_every_well_formed_version_00_value_is_accepted(
    trace_id: str, parent_id: str, flags: str
) -> None:
    """Any non-zero ids and any flags form a valid traceparent, forwarded as it came."""
    value = f"00-{trace_id}-{parent_id}-{flags}"
    assert parse_traceparent(value) == TraceParent(value, trace_id, parent_id)


@pytest.mark.parametrize(
    "value",
    [
        None,
        42,
        "",
        VALID.upper(),  # hex must be lowercase
        VALID[:-1],  # 54 characters
        VALID + "0",  # 56 characters
        VALID + "-extra",  # version 00 has no more fields
        f"01-{TRACE_ID}-{PARENT_ID}-01",  # a version we do not know
        f"ff-{TRACE_ID}-{PARENT_ID}-01",  # forbidden version
        f"00-{'0' * 32}-{PARENT_ID}-01",  # all-zero trace id
        f"00-{TRACE_ID}-{'0' * 16}-01",  # all-zero parent id
        f"00-{TRACE_ID[:-1]}g-{PARENT_ID}-01",  # not hex
        f"00_{TRACE_ID}_{PARENT_ID}_01",  # wrong separators
        b"\xff" * 55,  # bytes that are not ASCII
    ],
)
def test_a_malformed_traceparent_is_refused(value: object) -> None:
    """Anything but a well-formed version 00 value yields no trace context."""
    assert parse_traceparent(value) is None


def _log_lines(relay: Any, event_name: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in relay.log_text().splitlines()]
    return [line for line in lines if line["event"] == event_name]


async def test_traceparent_reaches_vercel_and_the_log_lines(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """A message's traceparent goes unchanged on the Vercel request, also after a retry, and its
    trace id is on the outcome log lines of both attempts."""
    relay = await start_relay()
    sim.add_fault(Fault(status=503, times=1))
    await publisher.publish(event(), headers={"traceparent": VALID})
    await wait_until(lambda: len(sim.accepted) == 1)
    headers = {key.lower(): value for key, value in sim.accepted[0].headers.items()}
    assert headers["traceparent"] == VALID
    await wait_until(lambda: len(_log_lines(relay, "delivered")) == 1)
    assert _log_lines(relay, "retried")[0]["trace_id"] == TRACE_ID
    assert _log_lines(relay, "delivered")[0]["trace_id"] == TRACE_ID


async def test_invalid_traceparent_is_not_forwarded(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """An invalid traceparent is dropped with a debug line; the event is still delivered."""
    relay = await start_relay()
    await publisher.publish(event(), headers={"traceparent": VALID.upper()})
    await wait_until(lambda: len(sim.accepted) == 1)
    headers = {key.lower() for key in sim.accepted[0].headers}
    assert "traceparent" not in headers
    await wait_until(lambda: len(_log_lines(relay, "delivered")) == 1)
    assert "trace_id" not in _log_lines(relay, "delivered")[0]
    ignored = _log_lines(relay, "ignoring an invalid traceparent header")
    assert len(ignored) == 1
    assert ignored[0]["level"] == "debug"
