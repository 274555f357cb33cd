"""Metrics on /metrics: what each outcome records, and labels that stay bounded."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import orjson
from prometheus_client import generate_latest

from consumer.errors import (
    DeliveryError,
    Reason,
    TokenUnavailable,
    VercelThrottled,
    VercelUnavailable,
)
from consumer.metrics import Metrics, event_family, retry_cause, status_class
from consumer.publish.publisher import EventPublisher
from consumer.testing.vercel_sim import Fault, VercelSimulator
from tests.helpers import event, get_json, sample, scrape, wait_until

DELIVERIES = "vercel_consumer_deliveries_total"
LATENCY_COUNT = "vercel_consumer_vercel_request_duration_seconds_count"


def test_labels_come_from_fixed_vocabularies() -> None:
    """Types reduce to their family, statuses to their class, failures to a cause."""
    assert event_family("resource.renamed") == "resource"
    assert event_family("billing.plan.changed") == "billing"
    assert event_family("evil.evt_123") == "unknown"
    assert event_family(None) == "unknown"
    assert [status_class(s) for s in (201, 302, 404, 429, 503, None, 999)] == [
        "2xx",
        "3xx",
        "4xx",
        "4xx",
        "5xx",
        "error",
        "error",
    ]
    assert retry_cause(VercelThrottled("x", status=429)) == "rate_limited"
    assert retry_cause(VercelThrottled("held back by our limiter")) == "rate_limited"
    assert retry_cause(VercelUnavailable("x", status=503)) == "vercel_unavailable"
    assert retry_cause(VercelUnavailable("x", status=None)) == "vercel_unavailable"
    assert retry_cause(DeliveryError("internal error: KeyError")) == "internal_error"
    assert retry_cause(TokenUnavailable("EMFILE")) == "token_unavailable"  # not a bug


def test_every_outcome_series_exists_from_the_start_and_registries_are_separate() -> None:
    """A fresh worker exposes each outcome/reason at 0 (so rate() and alerts work before the
    first failure), and two Metrics in one process do not share values."""
    first, second = Metrics(), Metrics()
    first.outcome("delivered", "resource.renamed")
    text_first = generate_latest(first.registry).decode()
    text_second = generate_latest(second.registry).decode()
    for reason in Reason:
        assert f'reason="{reason.value}"' in text_second
    delivered = f'{DELIVERIES}{{event_family="resource",outcome="delivered",reason=""}}'
    assert f"{delivered} 1.0" in text_first
    assert f"{delivered} 0.0" in text_second
    assert 'vercel_consumer_circuit_state{state="closed"} 1.0' in text_second


async def test_outcomes_and_vercel_latency_are_counted(
    start_relay: Any, serve_health: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """One delivered, one retried (503) then delivered, one dead-lettered (Vercel's 400): each
    counted by outcome, family and reason, and each Vercel call by status class."""
    relay = await start_relay()
    health = await serve_health(relay)
    sim.add_fault(Fault(status=503, installation="icfg_beta", times=1))
    sim.add_fault(Fault(status=400, installation="icfg_alpha", times=1))
    await publisher.publish(event("resource.renamed"))
    await publisher.publish(event("billing.plan_changed", installation_id="icfg_beta"))
    await wait_until(lambda: len(sim.accepted) == 1)  # the alpha one was refused

    async def settled() -> bool:
        samples = await scrape(health.url)
        delivered = sample(
            samples, DELIVERIES, outcome="delivered", event_family="billing", reason=""
        )
        return delivered == 1

    await wait_until(settled)
    samples = await scrape(health.url)
    expected = {
        ("retried", "billing", "vercel_unavailable"): 1,
        ("delivered", "billing", ""): 1,
        ("dead_lettered", "resource", "rejected_by_vercel"): 1,
        ("delivered", "resource", ""): 0,
        ("dead_lettered", "unknown", "invalid_message"): 0,
    }
    for (outcome, family, reason), count in expected.items():
        labels = {"outcome": outcome, "event_family": family, "reason": reason}
        assert sample(samples, DELIVERIES, **labels) == count, labels
    assert sample(samples, LATENCY_COUNT, status_class="2xx") == 1
    assert sample(samples, LATENCY_COUNT, status_class="4xx") == 1
    assert sample(samples, LATENCY_COUNT, status_class="5xx") == 1


async def test_publisher_chosen_types_and_ids_never_become_labels(
    start_relay: Any, serve_health: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """A new verb, an unknown type family and fresh ids add no label value: the first counts
    under its family, the second under `unknown`."""
    relay = await start_relay()
    health = await serve_health(relay)
    marker = uuid.uuid4().hex
    await publisher.publish(event(f"resource.v{marker}", id=f"evt_{marker}"))
    body = orjson.dumps({**event(), "type": f"t{marker}.odd"})
    await publisher.publish_raw(body, event_id=f"evt_{marker}_2", event_type="resource.odd")

    async def both_counted() -> bool:
        samples = await scrape(health.url)
        labels = {"outcome": "dead_lettered", "event_family": "unknown"}
        invalid = sample(samples, DELIVERIES, reason="invalid_message", **labels)
        delivered = sample(
            samples, DELIVERIES, outcome="delivered", event_family="resource", reason=""
        )
        return invalid == 1 and delivered == 1

    await wait_until(both_counted)
    before = set(await scrape(health.url))
    text = generate_latest(relay.metrics.registry).decode()
    assert marker not in text
    assert "icfg_alpha" not in text
    await publisher.publish(event(f"billing.v{uuid.uuid4().hex}"))
    await wait_until(lambda: len(sim.accepted) == 2)
    assert {key for key in await scrape(health.url) if key[0] == DELIVERIES} <= before


async def test_in_flight_consuming_and_concurrency_are_read_at_scrape_time(
    start_relay: Any, serve_health: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """While Vercel holds 3 requests, in_flight says 3 of a limit of 16, and consuming is 1."""
    relay = await start_relay(concurrency=16)
    health = await serve_health(relay)
    sim.add_fault(Fault(latency=1.0, times=3))  # below the relay's 2 s HTTP timeout
    for _ in range(3):
        await publisher.publish(event())
    await wait_until(lambda: sim.in_flight == 3)
    samples = await scrape(health.url)
    assert sample(samples, "vercel_consumer_in_flight") == 3
    assert sample(samples, "vercel_consumer_concurrency_limit") == 16
    assert sample(samples, "vercel_consumer_consuming") == 1
    await wait_until(lambda: len(sim.accepted) == 3)
    await wait_until(lambda: relay.worker.in_flight == 0)
    samples = await scrape(health.url)
    assert sample(samples, "vercel_consumer_in_flight") == 0
    delivered = {"outcome": "delivered", "event_family": "resource", "reason": ""}
    assert sample(samples, DELIVERIES, **delivered) == 3


async def test_token_file_reads_are_counted(
    start_relay: Any,
    serve_health: Any,
    sim: VercelSimulator,
    publisher: EventPublisher,
    tokens_dir: Path,
) -> None:
    """The first event of an installation reads its token file once; a rotation reads it again;
    events in between read nothing."""
    relay = await start_relay()
    health = await serve_health(relay)
    for _ in range(2):
        await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 2)
    assert sample(await scrape(health.url), "vercel_consumer_token_reloads_total") == 1
    (tokens_dir / "icfg_alpha").write_text("tok_alpha_rotated_longer")
    sim.set_token("icfg_alpha", "tok_alpha_rotated_longer")
    await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 3)
    assert sample(await scrape(health.url), "vercel_consumer_token_reloads_total") == 2


async def test_queue_depths_are_sampled_by_kind(
    start_relay: Any, serve_health: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """Two dead letters show as a DLQ depth of 2; retry tiers and work queue as 0."""
    relay = await start_relay(queue_depth_interval=0.1)
    health = await serve_health(relay)
    sim.remove_installation("icfg_alpha")  # 404: rejected_by_vercel
    for _ in range(2):
        await publisher.publish(event())

    async def dlq_has_two() -> bool:
        return sample(await scrape(health.url), "vercel_consumer_queue_messages", queue="dlq") == 2

    await wait_until(dlq_has_two)
    samples = await scrape(health.url)
    assert sample(samples, "vercel_consumer_queue_messages", queue="retry") == 0
    assert sample(samples, "vercel_consumer_queue_messages", queue="work") == 0


async def test_a_rate_limited_call_counts_as_deferred(
    start_relay: Any, serve_health: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """Vercel's 429 parks the message without spending an attempt: deferred, rate_limited."""
    relay = await start_relay()
    health = await serve_health(relay)
    sim.add_fault(Fault(status=429, retry_after="0", times=1))
    await publisher.publish(event())
    await wait_until(lambda: len(sim.accepted) == 1)
    labels = {"outcome": "deferred", "event_family": "resource", "reason": "rate_limited"}
    assert sample(await scrape(health.url), DELIVERIES, **labels) == 1


async def test_a_throttled_installation_shows_until_its_retry_after_passes(
    start_relay: Any, serve_health: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """After a 429 with Retry-After 30 its installation counts as throttled; the others not."""
    relay = await start_relay()
    health = await serve_health(relay)
    throttled = "vercel_consumer_throttled_installations"
    assert sample(await scrape(health.url), throttled) == 0
    sim.add_fault(Fault(status=429, retry_after="30", installation="icfg_alpha", times=1))
    await publisher.publish(event(installation_id="icfg_alpha"))
    await publisher.publish(event(installation_id="icfg_beta"))
    await wait_until(lambda: sim.by_status["429"] == 1 and len(sim.accepted) == 1)
    await wait_until(lambda: '"deferred"' in relay.log_text())
    assert sample(await scrape(health.url), throttled) == 1


async def test_circuit_state_and_readiness_follow_the_breaker(
    start_relay: Any, serve_health: Any, sim: VercelSimulator, publisher: EventPublisher
) -> None:
    """A Vercel-wide outage shows as circuit_state open (or half_open) and /readyz 503
    circuit_open; once Vercel is back, closed and ready again."""
    relay = await start_relay(
        retry_delays=(0.1, 0.2), breaker_window=10, breaker_probe_delays=(0.3, 0.6)
    )
    health = await serve_health(relay)
    sim.add_fault(Fault(status=503))
    for number in range(20):
        installation = ("icfg_alpha", "icfg_beta")[number % 2]
        await publisher.publish(event(installation_id=installation))

    async def circuit_not_closed() -> bool:
        closed = sample(await scrape(health.url), "vercel_consumer_circuit_state", state="closed")
        return closed == 0

    await wait_until(circuit_not_closed)
    status, body = await get_json(f"{health.url}/readyz")
    assert (status, body["reason"]) == (503, "circuit_open")
    sim.clear_faults()
    await wait_until(lambda: len(sim.accepted) == 20)
    samples = await scrape(health.url)
    assert sample(samples, "vercel_consumer_circuit_state", state="closed") == 1
    assert sample(samples, "vercel_consumer_circuit_state", state="open") == 0
    assert (await get_json(f"{health.url}/readyz"))[0] == 200
