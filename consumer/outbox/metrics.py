"""The outbox relay's Prometheus metrics, in a registry of its own (served by consumer/health.py).

No label carries an id or an event type: the number of series is fixed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from consumer import __version__
from consumer.metrics import PREFIX

OUTBOX = f"{PREFIX}_outbox"
# Seconds from the row's transaction to the broker's confirm: NOTIFY makes it milliseconds,
# polling alone up to CONSUMER_OUTBOX_POLL_INTERVAL, a backlog or an outage much more.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0)


class OutboxMetrics:
    """Every metric of one outbox relay."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.backlog = Gauge(
            f"{OUTBOX}_backlog", "Unsent outbox rows, as last sampled.", registry=self.registry
        )
        self.oldest_unsent_age = Gauge(
            f"{OUTBOX}_oldest_unsent_age_seconds",
            "Seconds since the oldest unsent row was written, as last sampled (0: none).",
            registry=self.registry,
        )
        self.published = Counter(
            f"{OUTBOX}_published",
            "Outbox rows published to the broker and marked sent.",
            registry=self.registry,
        )
        self.dead_lettered = Counter(
            f"{OUTBOX}_dead_lettered",
            "Outbox rows whose body broke the contract, put in the DLQ instead.",
            registry=self.registry,
        )
        self.publish_failures = Counter(
            f"{OUTBOX}_publish_failures",
            "Batches that could not be published (the broker down or refusing): rows stay unsent.",
            registry=self.registry,
        )
        self.database_errors = Counter(
            f"{OUTBOX}_database_errors",
            "Times the relay lost PostgreSQL, or a statement failed, and tried again.",
            registry=self.registry,
        )
        self.deleted = Counter(
            f"{OUTBOX}_deleted",
            "Sent rows deleted after CONSUMER_OUTBOX_RETENTION.",
            registry=self.registry,
        )
        self.latency = Histogram(
            f"{OUTBOX}_publish_latency_seconds",
            "From a row's transaction to its publish being confirmed.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.event_loop_lag = Gauge(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late the event loop's last heartbeat ran (seconds).",
            registry=self.registry,
        )
        info = Gauge(f"{PREFIX}_build_info", "Always 1.", ["version"], registry=self.registry)
        info.labels(__version__).set(1)
        ProcessCollector(registry=self.registry)
