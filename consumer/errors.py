"""The package's one exception tree, and the dead-letter reasons its leaves map to.

Third-party errors (aio-pika, aiormq, aiohttp, pydantic) never leave the adapter that met them:
they are mapped here, at the edge, so that the handler decides on our types alone.

```
ConsumerError
├── ConfigError              bad settings at start-up → one clear message, exit 2
├── BrokerError              broker unreachable, publish nacked, unroutable or unconfirmed
│   └── PublishError         EventPublisher: one publish did not end confirmed
│       ├── PublishUnroutable    returned: no queue is bound for its routing key
│       ├── PublishNotConfirmed  nacked by the broker, or the publisher was closed first
│       │   └── PublishTimeout   no confirm within the timeout, reconnects included: it may
│       │                        or may not be queued, so publish it again (same id)
│       └── PublishBatchError    publish_many: some of a batch failed; says which confirmed
├── DatabaseError            the outbox's PostgreSQL unreachable or a statement failed
└── DeliveryError            one message could not be delivered; `reason` says what follows
    ├── ContractError        the message can never succeed → dead letter (invalid_message)
    ├── CredentialsError     no token for the installation → dead letter (no_credentials)
    │   └── TokenFileError   its token file is broken (detail says how) → same, no fallback
    ├── TokenUnavailable     its token file could not be read now (EMFILE, EIO) → retry
    ├── RedeliveryLimit      the broker redelivered it too often: it may be what keeps killing
    │                        the worker → dead letter unprocessed (redelivery_limit)
    └── VercelError(status)  Vercel said no, or could not be reached
        ├── VercelRejected       4xx that will not change on retry → dead letter
        │                        (rejected_by_vercel)
        └── VercelUnavailable    408/425/5xx/network/timeout/garbage → retry, honouring
            │                    `retry_after`; once attempts or age run out → retries_exhausted
            └── VercelThrottled  429, or held back by our own limiter: the installation is over
                                 its rate limit → wait `retry_after` without spending an attempt
```

`counts_attempt` says whether a failure spends one of the message's `CONSUMER_MAX_ATTEMPTS`:
waiting out a rate limit does not (its time still counts against `CONSUMER_MAX_RETRY_AGE`).

Messages carry no secrets: tokens and broker passwords are never formatted into them.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Why a message was dead-lettered: the `dead-letter-reason` header's vocabulary."""

    INVALID_MESSAGE = "invalid_message"
    NO_CREDENTIALS = "no_credentials"
    REJECTED_BY_VERCEL = "rejected_by_vercel"
    RETRIES_EXHAUSTED = "retries_exhausted"
    REDELIVERY_LIMIT = "redelivery_limit"


class ConsumerError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(ConsumerError):
    """The configuration is unusable; the message names every bad setting."""


class BrokerCause(enum.StrEnum):
    """What kind of broker failure a BrokerError is: what /readyz may say to anyone (`cause`),
    while the sentence with hosts and the broker's words stays in the log."""

    UNREACHABLE = "unreachable"  # refused, reset, timed out, no route: the network or the node
    TLS = "tls"  # the TLS handshake failed: a CA, a certificate, or a plain port
    CREDENTIALS = "credentials"  # the broker refused the user, its password or the vhost
    OTHER = "other"  # anything else: a channel error, a nack, a closed connection mid-call


class BrokerError(ConsumerError):
    """RabbitMQ could not be reached, or did not confirm a publish we depend on. `cause` says
    which kind of failure it is."""

    def __init__(self, message: str, *, cause: BrokerCause = BrokerCause.OTHER) -> None:
        super().__init__(message)
        self.cause = cause


class PublishError(BrokerError):
    """One publish of `event_id` did not end confirmed by the broker."""

    def __init__(self, detail: str, *, event_id: str | None = None) -> None:
        super().__init__(detail)
        self.event_id = event_id


class PublishUnroutable(PublishError):
    """The broker returned the message: no queue is bound to its routing key. Not queued."""


class PublishNotConfirmed(PublishError):
    """The broker nacked the publish, or the publisher was closed before it confirmed."""


class PublishTimeout(PublishNotConfirmed):
    """No confirm within the publish timeout, reconnects included. The message may or may
    not be queued: publish it again with the same id (consumers are at-least-once)."""


class PublishBatchError(PublishError):
    """Some events of a `publish_many` batch were not confirmed. `confirmed` lists the ids
    that were (in batch order), `failures` each other event's id and its error; every event
    of the batch is in exactly one of the two."""

    def __init__(self, confirmed: list[str], failures: list[tuple[str, ConsumerError]]) -> None:
        first = failures[0][1] if failures else None
        super().__init__(
            f"{len(failures)} of {len(confirmed) + len(failures)} events not confirmed"
            + (f" (first: {first})" if first else "")
        )
        self.confirmed = confirmed
        self.failures = failures


class DatabaseError(ConsumerError):
    """The outbox's PostgreSQL could not be reached, or a statement on it failed."""


class DeliveryError(ConsumerError):
    """One message could not be delivered. `reason` is the dead letter it leads to, or None
    where the failure is transient and the message is to be retried."""

    reason: Reason | None = None
    counts_attempt = True

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class ContractError(DeliveryError):
    """The message breaks the contract (not JSON, wrong shape, unknown type, too large)."""

    reason = Reason.INVALID_MESSAGE


class CredentialsError(DeliveryError):
    """No access token is configured for the message's installation."""

    reason = Reason.NO_CREDENTIALS


class TokenFileError(CredentialsError):
    """The installation's token file exists but is unusable (empty, a byte-order mark, inner
    whitespace, not a regular file, unreadable): never replaced by the fallback token."""


class TokenUnavailable(DeliveryError):
    """The token file could not be read right now (out of file descriptors or memory, an I/O
    error): retried, never mistaken for a missing token."""


class RedeliveryLimit(DeliveryError):
    """The broker redelivered the message more often than allowed without an outcome: each
    time the worker that held it died or lost its channel. Not processed again."""

    reason = Reason.REDELIVERY_LIMIT


class VercelError(DeliveryError):
    """Vercel answered with a failure status, or could not be reached (`status` is None).
    `vercel_id` is the answer's `x-vercel-id`, for support requests to Vercel."""

    def __init__(
        self, detail: str, *, status: int | None = None, vercel_id: str | None = None
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.vercel_id = vercel_id


class VercelRejected(VercelError):
    """A 4xx answer that a retry would not change."""

    reason = Reason.REJECTED_BY_VERCEL


class VercelUnavailable(VercelError):
    """A transient failure; `retry_after` (seconds) is Vercel's floor for the next attempt."""

    def __init__(
        self,
        detail: str,
        *,
        status: int | None = None,
        vercel_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail, status=status, vercel_id=vercel_id)
        self.retry_after = retry_after


class VercelThrottled(VercelUnavailable):
    """The installation is over its rate limit: Vercel answered 429, or our limiter holds the
    request back until Vercel's quota resets. Waiting does not spend an attempt."""

    counts_attempt = False
