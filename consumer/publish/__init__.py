"""What partners' services use to publish events: `EventPublisher`. The relay never imports
this package."""

from consumer.publish.publisher import EventPublisher

__all__ = ["EventPublisher"]
