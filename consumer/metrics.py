"""The worker's Prometheus metrics: their definitions, and cheap recording methods.

A `Metrics` owns its `CollectorRegistry` (no global default registry, so a test can run several
workers in one process); the CLI builds one and hands it to the handler, the queue-depth poller
and the health server, which serves it on /metrics. Every label value comes from a fixed
vocabulary: outcomes, dead-letter reasons, retry causes, the contract's type families, HTTP
status classes, queue kinds, circuit states. No id and no free-form event type (its verb is the
publisher's choice) ever becomes a label, so the number of series is bounded whatever arrives.

The hot path records through label children bound once, up front. Values the worker keeps
anyway (deliveries in flight, whether it consumes, reconnects, token-file reloads, the circuit
breaker's state) are read when Prometheus scrapes, through callables given to `sample_from`, and
cost nothing per message.
docs/operations.md lists every metric with what to alert on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from consumer._version import __version__
from consumer.contract import FAMILIES
from consumer.errors import DeliveryError, Reason, TokenUnavailable, VercelError, VercelThrottled

PREFIX = "vercel_consumer"
RETRY_CAUSES = ("rate_limited", "vercel_unavailable", "token_unavailable", "internal_error")
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "error")  # error: no HTTP answer at all
CIRCUIT_STATES = ("closed", "open", "half_open")
UNKNOWN = "unknown"
# Seconds. Vercel answers in tens of milliseconds; CONSUMER_HTTP_TIMEOUT is 10 s by default.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Sample = Callable[[], float]


class Metrics:
    """Every metric of one worker, in a registry of its own (`registry`)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        deliveries = Counter(
            f"{PREFIX}_deliveries",
            "Deliveries handled, by outcome, event type family and reason "
            "(dead-letter reason, or retry cause; empty for delivered and returned).",
            ["outcome", "event_family", "reason"],
            registry=self.registry,
        )
        self._deliveries_metric = deliveries
        self._deliveries = {key: deliveries.labels(*key) for key in _delivery_keys()}
        latency = Histogram(
            f"{PREFIX}_vercel_request_duration_seconds",
            "Create Event calls to Vercel, by status class (error: no HTTP answer).",
            ["status_class"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._latency = {
            status_class: latency.labels(status_class) for status_class in STATUS_CLASSES
        }
        self._queue_messages = Gauge(
            f"{PREFIX}_queue_messages",
            "Ready messages in the work queue, the retry tiers (summed) and the DLQ, "
            "as last sampled by this worker.",
            ["queue"],
            registry=self.registry,
        )
        self.event_loop_lag = register_process_metrics(self.registry)
        self.concurrency_limit = Gauge(
            f"{PREFIX}_concurrency_limit",
            "CONSUMER_CONCURRENCY: the most deliveries this worker handles at once.",
            registry=self.registry,
        )
        self.coalesced = Counter(
            f"{PREFIX}_coalesced",
            "Create Event calls saved by coalescing: deliveries settled by another's call.",
            registry=self.registry,
        )
        self.coalesce_keys_waiting = Gauge(
            f"{PREFIX}_coalesce_keys_waiting",
            "Keys (installation, type, resource) with deliveries waiting for the next call.",
            registry=self.registry,
        )
        self.redeliveries_skipped = Counter(
            f"{PREFIX}_redeliveries_skipped",
            "Redeliveries acked without calling Vercel: Vercel had accepted that very event "
            "(same id and body) but its ack was lost with the channel.",
            registry=self.registry,
        )
        self._sampled = _Sampled()
        self.registry.register(self._sampled)

    # -- recorded on the hot path --------------------------------------------------------------

    def outcome(self, outcome: str, event_type: str | None, reason: str = "") -> None:
        """Count one delivery's outcome; `event_type` is reduced to its family."""
        key = (outcome, event_family(event_type), reason)
        child = self._deliveries.get(key)
        if child is None:  # a combination not bound ahead; still from fixed vocabularies
            child = self._deliveries_metric.labels(*key)
        child.inc()

    def vercel_request(self, status: int | None, seconds: float) -> None:
        """Observe one call to Vercel; `status` None when there was no HTTP answer."""
        self._latency[status_class(status)].observe(seconds)

    # -- recorded now and then -----------------------------------------------------------------

    def queue_depths(self, depths: Mapping[str, int]) -> None:
        """Set the sampled depths, by queue kind (work, retry, dlq)."""
        for kind, count in depths.items():
            self._queue_messages.labels(kind).set(count)

    def forget_queue_depths(self) -> None:
        """Drop the depths: better no series than a stale one while the broker is away."""
        self._queue_messages.clear()

    def sample_from(
        self,
        *,
        in_flight: Sample,
        consuming: Sample,
        reconnects: Sample,
        token_reloads: Sample,
        broker_blocked: Sample,
        throttled_installations: Sample,
        circuit_state: Callable[[], str],
    ) -> None:
        """Read these at each scrape (from the worker, the token store, the rate limiter and
        the breaker)."""
        self._sampled.sources = {
            "in_flight": in_flight,
            "consuming": consuming,
            "broker_reconnects": reconnects,
            "token_reloads": token_reloads,
            "throttled_installations": throttled_installations,
            "broker_blocked": broker_blocked,
        }
        self._sampled.circuit_state = circuit_state


def register_process_metrics(registry: CollectorRegistry) -> Gauge:
    """What every server of the package exports (the worker, the outbox relay): build info,
    the process collector, and the event-loop lag gauge, returned for the health monitor."""
    info = Gauge(f"{PREFIX}_build_info", "Always 1.", ["version"], registry=registry)
    info.labels(__version__).set(1)
    ProcessCollector(registry=registry)
    return Gauge(
        f"{PREFIX}_event_loop_lag_seconds",
        "How late the event loop's last heartbeat ran (seconds).",
        registry=registry,
    )


def event_family(event_type: str | None) -> str:
    """The type's family (`resource.renamed` → `resource`), or `unknown`: a bounded label."""
    if event_type is None:
        return UNKNOWN
    family = event_type.partition(".")[0]
    return family if family in FAMILIES else UNKNOWN


def status_class(status: int | None) -> str:
    """`2xx`, `4xx`, … for an HTTP status; `error` when there was none."""
    if status is None or not 100 <= status <= 599:
        return "error"
    return f"{status // 100}xx"


def retry_cause(error: DeliveryError) -> str:
    """Why a failure is retried or deferred, as a label: a rate limit (Vercel's 429, or our own
    limiter holding the call back), Vercel otherwise, a token file that could not be read now
    (out of file descriptors: the host's problem, not a bug), or our own bug."""
    if isinstance(error, VercelThrottled):
        return "rate_limited"
    if isinstance(error, VercelError):
        return "vercel_unavailable"
    if isinstance(error, TokenUnavailable):
        return "token_unavailable"
    return "internal_error"


def _delivery_keys() -> Iterable[tuple[str, str, str]]:
    families = (*FAMILIES, UNKNOWN)
    for family in families:
        yield ("delivered", family, "")
        yield ("returned", family, "")
        yield from (("retried", family, cause) for cause in RETRY_CAUSES)
        yield from (("deferred", family, cause) for cause in RETRY_CAUSES)
        yield from (("dead_lettered", family, reason.value) for reason in Reason)


# Values read at scrape time: (name without the prefix, type, help); sources are keyed by name.
_SAMPLED: tuple[tuple[str, type[GaugeMetricFamily | CounterMetricFamily], str], ...] = (
    ("in_flight", GaugeMetricFamily, "Deliveries being handled now (at most the concurrency)."),
    ("consuming", GaugeMetricFamily, "1 while connected to the broker and consuming, else 0."),
    (
        "broker_blocked",
        GaugeMetricFamily,
        "1 while the broker blocks the connection (memory or disk alarm), else 0.",
    ),
    (
        "broker_reconnects",
        CounterMetricFamily,
        "Times the worker lost the broker, or failed to reach it, and tried again.",
    ),
    (
        "token_reloads",
        CounterMetricFamily,
        "Token files (re-)read: once per installation, then once per rotation.",
    ),
    (
        "throttled_installations",
        GaugeMetricFamily,
        "Installations Vercel's rate limit holds back right now (429, or quota spent).",
    ),
)


class _Sampled(Collector):
    """Values owned elsewhere, read at scrape time (0 until `Metrics.sample_from` wires them)."""

    def __init__(self) -> None:
        self.sources: dict[str, Sample] = {}
        self.circuit_state: Callable[[], str] = lambda: "closed"

    def collect(self) -> Iterable[Metric]:
        for name, family, documentation in _SAMPLED:
            source = self.sources.get(name)
            value = float(source()) if source is not None else 0.0
            yield family(f"{PREFIX}_{name}", documentation, value=value)
        circuit = GaugeMetricFamily(
            f"{PREFIX}_circuit_state",
            "1 for the state the Vercel circuit breaker is in, 0 for the others.",
            labels=["state"],
        )
        current = self.circuit_state()
        for state in CIRCUIT_STATES:
            circuit.add_metric([state], 1.0 if state == current else 0.0)
        yield circuit
