"""End to end: real RabbitMQ, the worker in this event loop, the simulator over real HTTP."""

from __future__ import annotations

import time
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel

from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.helpers import TOKENS, drain_queue, event, wait_for_dead_letters, wait_until


async def test_resource_event_is_delivered_translated(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """A resource.* event reaches Vercel as resource.updated with resourceId and productId."""
    await start_relay()
    await publisher.publish(event("resource.renamed", resource_id="res_1", product_id="prod_1"))
    await wait_until(lambda: len(sim.accepted) == 1)
    accepted = sim.accepted[0]
    assert accepted.installation_id == "icfg_alpha"
    assert accepted.event == {
        "type": "resource.updated",
        "resourceId": "res_1",
        "productId": "prod_1",
    }


async def test_billing_event_is_delivered_without_absent_optionals(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """A billing.* event without billing_plan_id becomes installation.updated, no null keys."""
    await start_relay()
    await publisher.publish(event("billing.plan_changed", installation_id="icfg_beta"))
    await wait_until(lambda: len(sim.accepted) == 1)
    assert sim.accepted[0].installation_id == "icfg_beta"
    assert sim.accepted[0].event == {"type": "installation.updated"}


async def test_request_carries_user_agent_and_json_content_type(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """The request names this project in User-Agent and is sent as application/json."""
    await start_relay()
    await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 1)
    headers = {key.lower(): value for key, value in sim.accepted[0].headers.items()}
    assert headers["user-agent"].startswith("vercel-event-consumer/")
    assert headers["content-type"] == "application/json"


async def test_delivered_message_is_acked(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """After a 2xx nothing is left in the work queue, the retry tiers or the DLQ."""
    relay = await start_relay()
    for _ in range(20):
        await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 20)
    await relay.shutdown()
    assert await drain_queue(channel, names["queue"]) == []
    assert await drain_queue(channel, f"{names['queue']}.dlq") == []


async def test_invalid_json_is_dead_lettered_byte_identical(
    start_relay: Any, sim: VercelSimulator, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """A body that is not JSON lands in the DLQ unchanged, with reason and original properties."""
    await start_relay()
    body = b'{"id": "evt_x", "type": "resource.renamed", \xff oops'
    exchange = await channel.get_exchange(names["exchange"])
    await exchange.publish(
        aio_pika.Message(
            body,
            message_id="evt_x",
            content_type="application/json",
            correlation_id="corr-1",
            app_id="orders",
            headers={"tenant": "t-9"},
        ),
        routing_key="resource.renamed",
    )
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.body == body
    assert dead.headers["dead-letter-reason"] == "invalid_message"
    assert "Invalid JSON" in str(dead.headers["dead-letter-detail"])
    assert (dead.message_id, dead.correlation_id, dead.app_id) == ("evt_x", "corr-1", "orders")
    assert dead.content_type == "application/json"
    assert dead.headers["tenant"] == "t-9"
    assert dead.headers["original-exchange"] == names["exchange"]
    assert dead.headers["original-routing-key"] == "resource.renamed"
    assert dead.headers["delivery-attempts"] == 1
    assert str(dead.headers["dead-lettered-at"]).endswith("Z")
    assert "dead-letter-http-status" not in dead.headers
    assert dead.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert sim.requests == 0


async def test_schema_violation_names_the_field(
    start_relay: Any, publisher: EventPublisher, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """A resource event without resource_id is invalid_message, the detail naming the field."""
    await start_relay()
    bad = event()
    del bad["resource_id"]
    await publisher.publish(bad, validate=False)
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.headers["dead-letter-reason"] == "invalid_message"
    assert "resource_id" in str(dead.headers["dead-letter-detail"])
    assert orjson.loads(dead.body) == bad


async def test_unknown_type_family_is_invalid(
    start_relay: Any, publisher: EventPublisher, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """A body whose type is neither resource.* nor billing.* is dead-lettered as invalid."""
    await start_relay()
    body = orjson.dumps({**event(), "type": "order.created"})
    await publisher.publish_raw(body, event_id="evt_order", event_type="resource.renamed")
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.headers["dead-letter-reason"] == "invalid_message"
    assert "type" in str(dead.headers["dead-letter-detail"])


async def test_oversized_body_is_invalid(
    start_relay: Any, publisher: EventPublisher, channel: AbstractChannel, names: dict[str, str]
) -> None:
    """A body over CONSUMER_MAX_BODY_BYTES is dead-lettered as invalid_message, untouched."""
    await start_relay(max_body_bytes=4096)
    body = orjson.dumps(event(data={"blob": "x" * 10_000}))
    await publisher.publish_raw(body, event_id="evt_big", event_type="resource.renamed")
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.headers["dead-letter-reason"] == "invalid_message"
    assert "4096" in str(dead.headers["dead-letter-detail"])
    assert dead.body == body


async def test_vercel_rejections_are_dead_lettered_with_status(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """400, 401, 403, 404 and 422 answers dead-letter at once as rejected_by_vercel + status."""
    statuses = [400, 401, 403, 404, 422, 409]
    await start_relay()
    for status in statuses:
        sim.add_fault(Fault(status=status, times=1))
        await publisher.publish(event(id=f"evt_{status}"))
        [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
        assert dead.headers["dead-letter-reason"] == "rejected_by_vercel"
        assert dead.headers["dead-letter-http-status"] == status
        assert dead.headers["delivery-attempts"] == 1
        assert dead.message_id == f"evt_{status}"
    assert sim.requests == len(statuses)


async def test_wrong_token_is_rejected_by_vercel(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """A fallback token that belongs to another installation gets Vercel's 403, dead-lettered."""
    await start_relay(vercel_token=TOKENS["icfg_beta"], vercel_tokens_dir=None)
    await publisher.publish(event(installation_id="icfg_alpha"))
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.headers["dead-letter-http-status"] == 403
    assert TOKENS["icfg_beta"] not in str(dead.headers)


async def test_transient_failures_are_retried_until_delivered(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """408, 425, 429, 500, 503 and a dropped connection are retried; the event then arrives."""
    await start_relay(max_attempts=8, retry_delays=(0.1,))
    for fault in [Fault(status=s, times=1) for s in (408, 425, 429, 500, 503)]:
        sim.add_fault(fault)
    sim.add_fault(Fault(drop=True, times=1))
    await publisher.publish(event(id="evt_flaky"))
    await wait_until(lambda: len(sim.accepted) == 1)
    assert sim.requests == 7
    assert sim.accepted[0].event["type"] == "resource.updated"


async def test_garbage_answer_is_retried(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """An answer that is not HTTP at all counts as transient and is retried."""
    await start_relay(retry_delays=(0.1,))
    sim.add_fault(Fault(garbage=True, times=1))
    await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 1)
    assert sim.requests == 2


async def test_timeout_is_retried(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """A Vercel slower than CONSUMER_HTTP_TIMEOUT is a transient failure, retried."""
    await start_relay(http_timeout=0.3, retry_delays=(0.1,))
    sim.add_fault(Fault(latency=1.0, times=1))
    await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 1)
    assert sim.requests == 2


async def test_retries_exhausted_dead_letters_with_last_status(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """After CONSUMER_MAX_ATTEMPTS transient failures the message is retries_exhausted."""
    await start_relay(max_attempts=3, retry_delays=(0.1, 0.2))
    sim.add_fault(Fault(status=503))
    original = event()
    await publisher.publish(original)
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.headers["dead-letter-reason"] == "retries_exhausted"
    assert dead.headers["delivery-attempts"] == 3
    assert dead.headers["dead-letter-http-status"] == 503
    assert "503" in str(dead.headers["dead-letter-detail"])
    assert dead.headers["original-exchange"] == names["exchange"]
    assert dead.headers["original-routing-key"] == original["type"]
    assert orjson.loads(dead.body) == original
    assert sim.requests == 3


async def test_retry_after_is_a_floor_for_the_next_attempt(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """A 429 with Retry-After: 1 is not retried sooner than one second later."""
    await start_relay(retry_delays=(0.1, 1.5))
    sim.add_fault(Fault(status=429, retry_after="1", times=1))
    started = time.monotonic()
    await publisher.publish(event())
    await wait_until(lambda: sim.requests == 1)
    first_attempt = time.monotonic()
    await wait_until(lambda: len(sim.accepted) == 1)
    assert time.monotonic() - first_attempt >= 1.0
    assert first_attempt - started < 5


async def test_retries_bypass_the_domain_exchange(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """Other subscribers of the exchange see a retried event once, not once per attempt."""
    await start_relay(retry_delays=(0.1,))
    spy = await channel.declare_queue(exclusive=True)
    await spy.bind(names["exchange"], "resource.#")
    sim.add_fault(Fault(status=503, times=2))
    await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 1)
    assert len(await drain_queue(channel, spy.name)) == 1


async def test_token_file_changes_are_picked_up_without_restart(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
    tmp_path: Any,
) -> None:
    """No token file → no_credentials; a file added, then rotated, while the worker runs is
    used for the next message."""
    await start_relay(vercel_tokens_dir=tmp_path)
    await publisher.publish(event(id="evt_before"))
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.headers["dead-letter-reason"] == "no_credentials"
    assert "icfg_alpha" in str(dead.headers["dead-letter-detail"])
    assert sim.requests == 0

    (tmp_path / "icfg_alpha").write_text(TOKENS["icfg_alpha"] + "\n")
    await publisher.publish(event(id="evt_added"))
    await wait_until(lambda: len(sim.accepted) == 1)

    sim.set_token("icfg_alpha", "tok_alpha_rotated")
    (tmp_path / "icfg_alpha").write_text("tok_alpha_rotated")
    await publisher.publish(event(id="evt_rotated"))
    await wait_until(lambda: len(sim.accepted) == 2)


async def test_no_log_line_or_dead_letter_contains_a_token(
    start_relay: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """Tokens appear in no log line and no dead letter, whatever the outcome."""
    relay = await start_relay(
        vercel_token=TOKENS["icfg_alpha"], max_attempts=2, retry_delays=(0.1,)
    )
    sim.add_fault(Fault(status=401, times=1))
    await publisher.publish(event(id="evt_401"))
    dead = await wait_for_dead_letters(channel, names["queue"], 1)
    sim.add_fault(Fault(status=503, installation="icfg_beta"))
    await publisher.publish(event(id="evt_503", installation_id="icfg_beta"))
    await publisher.publish(event(id="evt_ok", installation_id="icfg_alpha"))
    dead += await wait_for_dead_letters(channel, names["queue"], 1)
    await wait_until(lambda: len(sim.accepted) == 1)
    await relay.shutdown()
    logs = relay.log_text()
    assert '"event":"delivered"' in logs
    assert '"event":"dead_lettered"' in logs
    assert '"event":"retried"' in logs
    for token in TOKENS.values():
        assert token not in logs
        assert all(token not in str(m.headers) and token.encode() not in m.body for m in dead)


async def test_outcome_logs_carry_vercel_id_and_event_fields(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """Each outcome line names the event, installation, type, attempt, status and x-vercel-id."""
    relay = await start_relay()
    await publisher.publish(event(id="evt_logged"))
    await wait_until(lambda: len(sim.accepted) == 1)
    await relay.shutdown()
    lines = [orjson.loads(line) for line in relay.log_text().splitlines()]
    [line] = [entry for entry in lines if entry.get("event") == "delivered"]
    assert line["event_id"] == "evt_logged"
    assert line["installation_id"] == "icfg_alpha"
    assert line["type"] == "resource.renamed"
    assert line["attempt"] == 1
    assert line["status"] == 201
    assert line["vercel_id"] == sim.accepted[0].vercel_id
    assert line["latency_ms"] >= 0


async def test_concurrency_bounds_requests_in_flight(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """With CONSUMER_CONCURRENCY=5 and a slow Vercel, 5 requests run at once, never more."""
    sim.add_fault(Fault(latency=0.3))
    await start_relay(concurrency=5)
    for _ in range(20):
        await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 20)
    assert sim.max_in_flight == 5


async def test_topology_declare_is_idempotent(
    start_relay: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """A second worker on the same queue declares the same topology and both consume."""
    await start_relay()
    await start_relay()
    for _ in range(10):
        await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 10)


async def test_message_whose_dead_letter_cannot_be_published_is_kept(
    start_relay: Any,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """While the DLQ is missing (unroutable), the message is not acked but handed back; once
    the DLQ is back, its dead letter arrives: nothing is lost."""
    relay = await start_relay()
    dlq = f"{names['queue']}.dlq"
    await channel.queue_delete(dlq)
    await publisher.publish_raw(b"not json", event_id="evt_kept", event_type="resource.renamed")
    await wait_until(lambda: "could not republish" in relay.log_text())
    await channel.declare_queue(dlq, durable=True, arguments={"x-queue-type": "quorum"})
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.message_id == "evt_kept"
    assert dead.headers["dead-letter-reason"] == "invalid_message"


async def test_a_message_the_broker_gives_up_on_lands_in_the_dlq(
    start_relay: Any,
    publisher: EventPublisher,
    channel: AbstractChannel,
    names: dict[str, str],
) -> None:
    """The work queue dead-letters into the DLQ: a message rejected without requeue (as the
    broker does past a delivery limit) is kept there, not dropped."""
    relay = await start_relay()
    await relay.shutdown()  # no consumer of ours: this test takes the message itself
    await publisher.publish(event(id="evt_given_up"))
    queue = await channel.get_queue(names["queue"], ensure=False)
    message = await queue.get(timeout=5)
    await message.reject(requeue=False)
    [dead] = await wait_for_dead_letters(channel, names["queue"], 1)
    assert dead.message_id == "evt_given_up"
    assert dead.headers["x-first-death-reason"] == "rejected"
