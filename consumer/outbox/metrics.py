"""The outbox relay's Prometheus metrics, in a registry of its own (served by consumer/health.py).

No label carries an id or an event type: the number of series is fixed.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from consumer.metrics import PREFIX, register_process_metrics

OUTBOX = f"{PREFIX}_outbox"
# Seconds from the row's transaction to the broker's confirm: NOTIFY makes it milliseconds,
# polling alone up to CONSUMER_OUTBOX_POLL_INTERVAL, a backlog or an outage much more.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 600.0)


class OutboxMetrics:
    """Every metric of one outbox relay."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.event_loop_lag = register_process_metrics(self.registry)
        gauge, counter = self._gauge, self._counter
        self.backlog = gauge("backlog", "Unsent outbox rows, as last sampled.")
        self.oldest_unsent_age = gauge(
            "oldest_unsent_age_seconds",
            "Seconds since the oldest unsent row was written, as last sampled (0: none).",
        )
        self.published = counter("published", "Outbox rows published and marked sent.")
        self.dead_lettered = counter(
            "dead_lettered", "Outbox rows whose body broke the contract, put in the DLQ instead."
        )
        self.publish_failures = counter(
            "publish_failures",
            "Times the relay could not publish (broker unreachable, or a batch refused): "
            "the rows stay unsent.",
        )
        self.database_errors = counter(
            "database_errors",
            "Times the relay lost PostgreSQL, or a statement failed, and tried again.",
        )
        self.deleted = counter("deleted", "Sent rows deleted after CONSUMER_OUTBOX_RETENTION.")
        self.latency = Histogram(
            f"{OUTBOX}_publish_latency_seconds",
            "From a row's transaction to its publish being confirmed.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(f"{OUTBOX}_{name}", documentation, registry=self.registry)

    def _counter(self, name: str, documentation: str) -> Counter:
        return Counter(f"{OUTBOX}_{name}", documentation, registry=self.registry)
