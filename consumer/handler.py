"""One delivery, start to finish: parse → translate → token → wait its turn → send → ack |
retry | dead letter.

The handler never lets an exception escape and never acks a message before its outcome is
durable: after Vercel's 2xx, or after the broker confirmed the copy in a retry tier or the DLQ.
When that copy cannot be published the message is left to the broker to deliver again.
Each outcome and each call to Vercel is counted in `Metrics`; a valid W3C `traceparent` message
header is forwarded to Vercel and its trace id logged; with OTEL_* set, each delivery and each
Vercel call is also a span (consumer/otel.py), and the call's own context is forwarded.
Everything it needs is built once and passed in; nothing is constructed per message.

The body is our contract's, or a CloudEvent in either content mode (consumer/cloudevents.py),
whose attributes join the log line as `ce_*` fields.

Before sending, a message waits for its installation's rate limit and the global one: a short
wait is held in place, a longer one is deferred to a retry tier (without spending an attempt)
so that it does not hold a consumer slot the other installations need. Every Vercel call is
reported to the circuit breaker; while it is open, failures do not spend attempts either.
A message the broker has redelivered more than `max_redeliveries` times is dead-lettered
unprocessed: it may be what killed the workers that held it.

When an ack is lost after Vercel's 2xx (the channel closed meanwhile), the event is remembered
(`AcceptedMemory`: its id and a hash of its body, for a few minutes); its redelivery to this
worker is acked without a second call, logged as `redelivery_skipped` and counted.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from aio_pika.abc import AbstractIncomingMessage
from structlog.typing import FilteringBoundLogger

from consumer.accepted import AcceptedMemory
from consumer.acking import Acker
from consumer.breaker import CircuitBreaker
from consumer.cloudevents import parse_message
from consumer.coalesce import Coalescer
from consumer.coalescing import CoalescedSend
from consumer.contract import Event
from consumer.deadletter import (
    Republisher,
    redeliveries,
    retry_age,
    trusted_attempts,
    trusted_headers,
)
from consumer.errors import (
    BrokerError,
    DeliveryError,
    RedeliveryLimit,
    VercelError,
    VercelRejected,
    VercelThrottled,
    VercelUnavailable,
)
from consumer.metrics import Metrics, retry_cause
from consumer.otel import NO_TRACER, Tracer
from consumer.ratelimit import InstallationLimits, RequestRate
from consumer.retry import DeadLetter, RetryPolicy
from consumer.tokens import TokenStore
from consumer.topology import broker_errors
from consumer.tracing import HEADER as TRACEPARENT
from consumer.tracing import parse_traceparent
from consumer.translate import VercelRequest, translate
from consumer.vercel import Delivered, VercelClient

REPUBLISH_BACKOFF = 1.0  # seconds to wait before handing a message back after a failed publish
HOLD_IN_PLACE = 1.0  # seconds: a shorter rate-limit wait is held in place, a longer one deferred


class Handler:
    """Handles deliveries from the work queue; call it with each incoming message."""

    def __init__(
        self,
        *,
        vercel: VercelClient,
        tokens: TokenStore,
        policy: RetryPolicy,
        republisher: Republisher,
        breaker: CircuitBreaker,
        limits: InstallationLimits,
        rate: RequestRate,
        max_body_bytes: int,
        max_redeliveries: int,
        log: FilteringBoundLogger,
        metrics: Metrics,
        accepted: AcceptedMemory | None = None,
        tracer: Tracer = NO_TRACER,
        acker: Acker | None = None,
        coalescer: Coalescer[Any] | None = None,
        coalesce_window: float = 0.0,
    ) -> None:
        self._accepted = AcceptedMemory() if accepted is None else accepted
        self._vercel = vercel
        self._tokens = tokens
        self._policy = policy
        self._republisher = republisher
        self._breaker = breaker
        self._limits = limits
        self._rate = rate
        self._max_body_bytes = max_body_bytes
        self._max_redeliveries = max_redeliveries
        self._log = log
        self._metrics = metrics
        self._tracer = tracer
        self._acker = acker  # batches this channel's acks; None: one ack frame per message
        # One call per key for deliveries waiting together (CONSUMER_COALESCE), or one each.
        self._deliver = self._send
        if coalescer is not None:
            coalesced = CoalescedSend(
                self._send, coalescer, window=coalesce_window, on_coalesced=metrics.coalesced.inc
            )
            self._deliver = coalesced.send

    async def __call__(self, message: AbstractIncomingMessage) -> None:
        if self._acker is not None:
            self._acker.received(message)
        fields: dict[str, Any] = {"event_id": message.message_id}
        try:
            attempts = trusted_attempts(message) + 1
            with self._tracer.delivery(message, attempts):  # a no-op unless OTEL_* sets tracing
                await self._handle(message, attempts, fields)
        except Exception as exc:  # noqa: BLE001 - last resort: the slot and the message go back
            self._log.exception("unexpected error outside delivery handling", **fields)
            await self._hand_back(message, exc, fields)

    async def _handle(
        self, message: AbstractIncomingMessage, attempts: int, fields: dict[str, Any]
    ) -> None:
        fields.update(routing_key=message.routing_key, attempt=attempts)
        trace_headers = self._trace_headers(message, fields)
        if "trace_id" not in fields and (trace_id := self._tracer.trace_id()):
            fields["trace_id"] = trace_id  # the trace this delivery's spans started
        started = time.perf_counter()
        try:
            self._check_redeliveries(message)
            event, cloudevent = parse_message(
                message.headers, message.content_type, message.body, max_bytes=self._max_body_bytes
            )
            fields.update(_event_fields(event), **cloudevent)
            if message.redelivered and self._accepted.holds(event.id, message.body):
                await self._skip_accepted(message, fields)
                return
            token = self._tokens.token_for(event.installation_id)
            delivered = await self._deliver(event, token, trace_headers)
        except DeliveryError as error:
            fields.update(_error_fields(error, started))
            await self._reroute(message, error, attempts, fields)
        except Exception as exc:  # noqa: BLE001 - a bug must not lose the message
            self._log.exception("unexpected error while handling a message", **fields)
            # Retried like a transient failure, so a bug costs attempts, not the message.
            internal = DeliveryError(f"internal error: {type(exc).__name__}: {exc}")
            await self._reroute(message, internal, attempts, fields)
        else:
            fields.update(status=delivered.status, vercel_id=delivered.vercel_id)
            fields["latency_ms"] = _elapsed_ms(started)
            self._metrics.outcome("delivered", event.type)
            self._tracer.outcome("delivered")
            await self._settle(message, "delivered", fields)

    def _trace_headers(
        self, message: AbstractIncomingMessage, fields: dict[str, Any]
    ) -> dict[str, str] | None:
        """The message's W3C traceparent, to forward to Vercel; its trace id goes in the log."""
        raw = message.headers.get(TRACEPARENT) if message.headers else None
        if raw is None:
            return None
        trace = parse_traceparent(raw)
        if trace is None:
            self._log.debug(
                "ignoring an invalid traceparent header", value=repr(raw)[:120], **fields
            )
            return None
        fields["trace_id"] = trace.trace_id
        return {TRACEPARENT: trace.value}

    def _check_redeliveries(self, message: AbstractIncomingMessage) -> None:
        # On a first delivery the broker passes on whatever x-delivery-count the publisher set;
        # only a redelivery's count is the broker's own.
        count = redeliveries(message.headers) if message.redelivered else 0
        if count > self._max_redeliveries:
            raise RedeliveryLimit(
                f"delivered {count + 1} times without an outcome (more than"
                f" CONSUMER_MAX_REDELIVERIES={self._max_redeliveries} redeliveries); the workers"
                " that held it may have died processing it, so it is not processed again"
            )

    async def _send(self, event: Event, token: str, headers: dict[str, str] | None) -> Delivered:
        """Send once the installation's turn has come; tell the breaker and limiter the answer."""
        installation = event.installation_id
        await self._wait_turn(installation)
        try:
            delivered = await self._call_vercel(translate(event), token, headers)
        except VercelThrottled as error:
            self._limits.block(installation, error.retry_after or HOLD_IN_PLACE)
            raise
        except (VercelUnavailable, VercelRejected) as error:
            # A 4xx comes from a Vercel that is up; only transient failures point to an outage.
            self._breaker.record(installation, failed=isinstance(error, VercelUnavailable))
            raise
        try:
            self._breaker.record(installation, failed=False)
            self._limits.observe(installation, delivered.quota)
        except Exception:  # noqa: BLE001 - delivered is delivered: a retry would duplicate it
            self._log.exception("could not record a delivery", installation_id=installation)
        return delivered

    async def _call_vercel(
        self, request: VercelRequest, token: str, headers: dict[str, str] | None
    ) -> Delivered:
        """One call to Vercel, timed by status class for the latency histogram."""
        started = time.perf_counter()
        with self._tracer.vercel_call(request.path) as call:
            try:
                delivered = await self._vercel.send(request, token, call.forward(headers))
            except VercelError as error:
                self._metrics.vercel_request(error.status, time.perf_counter() - started)
                raise
            call.answered(delivered.status)
        self._metrics.vercel_request(delivered.status, time.perf_counter() - started)
        return delivered

    async def _wait_turn(self, installation: str) -> None:
        while (wait := self._limits.wait_for(installation)) > 0:
            self._tracer.event("rate_limit.wait", wait_seconds=wait)
            if wait > HOLD_IN_PLACE:
                raise VercelThrottled(
                    f"held back: installation over its Vercel rate limit for {wait:.1f} s more",
                    retry_after=self._limits.defer(installation, wait),
                )
            await asyncio.sleep(wait)
        if (waited := await self._rate.acquire()) > 0:  # CONSUMER_MAX_RPS's turn
            self._tracer.event("rate_limit.global_wait", wait_seconds=waited)

    async def _reroute(
        self,
        message: AbstractIncomingMessage,
        error: DeliveryError,
        attempts: int,
        fields: dict[str, Any],
    ) -> None:
        try:
            now = datetime.now(UTC)
            age = retry_age(trusted_headers(message, now), now)
            counted = not self._breaker.is_open
            decision = self._policy.decide(error, attempts, age=age, counted=counted)
            if isinstance(decision, DeadLetter):
                await self._republisher.dead_letter(message, decision)
                fields.update(reason=decision.reason.value, detail=decision.detail)
                outcome, reason = "dead_lettered", decision.reason.value
            else:
                await self._republisher.retry(message, decision, error.detail)
                fields.update(retry_in_ms=decision.delay_ms, detail=error.detail)
                # Deferred: waits without spending an attempt (rate limit, open circuit).
                outcome = "retried" if decision.attempts == attempts else "deferred"
                reason = retry_cause(error)
        except Exception as exc:  # noqa: BLE001 - BrokerError, a header that will not encode, a bug
            await self._hand_back(message, exc, fields)
            return
        self._metrics.outcome(outcome, fields.get("type"), reason)
        if self._breaker.is_open:
            self._tracer.event("circuit.open")
        self._tracer.outcome(outcome, reason, error.detail)
        await self._settle(message, outcome, fields)

    async def _settle(
        self, message: AbstractIncomingMessage, outcome: str, fields: dict[str, Any]
    ) -> None:
        try:
            await self._ack(message)
        except BrokerError as exc:
            # The channel is gone: the broker will redeliver. Vercel has a delivered event
            # already, so its redelivery to this worker is acked without a second call.
            if outcome == "delivered":
                self._accepted.remember(fields["event_id"], message.body)
            self._log.warning("ack failed; message will be redelivered", error=str(exc), **fields)
            return
        log = self._log.warning if outcome == "dead_lettered" else self._log.info
        log(outcome, **fields)

    async def _ack(self, message: AbstractIncomingMessage) -> None:
        if self._acker is not None:
            await self._acker.ack(message)
            return
        with broker_errors("acking"):
            await message.ack()

    async def _skip_accepted(
        self, message: AbstractIncomingMessage, fields: dict[str, Any]
    ) -> None:
        """A redelivery of an event Vercel accepted (its ack was lost): ack it, no second call."""
        self._metrics.redeliveries_skipped.inc()
        await self._settle(message, "redelivery_skipped", fields)

    async def _hand_back(
        self, message: AbstractIncomingMessage, exc: Exception, fields: dict[str, Any]
    ) -> None:
        """The copy was not confirmed: give the message back to the broker, unacked."""
        self._metrics.outcome("returned", fields.get("type"))
        self._tracer.outcome("returned", detail=f"{type(exc).__name__}: {exc}")
        self._log.error(
            "could not republish; returning message to the queue",
            error=f"{type(exc).__name__}: {exc}",
            **fields,
        )
        await asyncio.sleep(REPUBLISH_BACKOFF)  # do not spin on a broker that refuses us
        if self._acker is not None and not self._acker.awaiting_outcome(message):
            return  # its outcome is durable and its ack under way: a reject would contradict it
        try:
            with broker_errors("rejecting"):
                await message.reject(requeue=True)
        except Exception:  # noqa: BLE001, S110 - channel closed (the broker requeues everything
            pass  # unacked on it anyway), or the message was settled already
        else:
            if self._acker is not None:
                self._acker.released(message)  # settled: no longer blocks a run of acks


def _event_fields(event: Event) -> dict[str, Any]:
    return {"event_id": event.id, "type": event.type, "installation_id": event.installation_id}


def _error_fields(error: DeliveryError, started: float) -> dict[str, Any]:
    if not isinstance(error, VercelError):
        return {}
    return {
        "status": error.status,
        "vercel_id": error.vercel_id,
        "latency_ms": _elapsed_ms(started),
    }


def _elapsed_ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
