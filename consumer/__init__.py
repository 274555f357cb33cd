"""vercel-event-consumer: relays a partner's RabbitMQ domain events to Vercel's Create Event API.

What a partner's own code may import from here, and rely on across releases (pinned by
tests/test_public_api.py, as httpx pins its own):

- **Publishing:** `EventPublisher` (confirmed publishes, reconnects, `publish_many`) and the
  errors it raises, all under `BrokerError`: `PublishError`, `PublishUnroutable`,
  `PublishNotConfirmed`, `PublishTimeout`, `PublishBatchError`.
- **The contract:** `Event` (`ResourceEvent | BillingEvent`), `parse_event` (bytes → an event,
  or `ContractError` saying why), `json_schema` and `example_event`.
- **The error tree's root**, `ConsumerError`, and `ConfigError`.

Two sub-packages are public too, each behind its own import: `consumer.outbox.write` (add an
event inside your own database transaction; the `outbox` extra) and `consumer.testing`
(`VercelSimulator`, a local Create Event endpoint for your tests). Everything else (the worker,
the dead-letter tool) is an application, reached through the `vercel-consumer` command.
"""

from consumer._version import __version__
from consumer.contract import (
    BillingEvent,
    Event,
    ResourceEvent,
    example_event,
    json_schema,
    parse_event,
)
from consumer.errors import (
    BrokerError,
    ConfigError,
    ConsumerError,
    ContractError,
    PublishBatchError,
    PublishError,
    PublishNotConfirmed,
    PublishTimeout,
    PublishUnroutable,
)
from consumer.publish import EventPublisher

__all__ = [
    "BillingEvent",
    "BrokerError",
    "ConfigError",
    "ConsumerError",
    "ContractError",
    "Event",
    "EventPublisher",
    "PublishBatchError",
    "PublishError",
    "PublishNotConfirmed",
    "PublishTimeout",
    "PublishUnroutable",
    "ResourceEvent",
    "__version__",
    "example_event",
    "json_schema",
    "parse_event",
]
