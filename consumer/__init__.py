"""vercel-event-consumer: relays a partner's RabbitMQ domain events to Vercel's Create Event API."""

__version__ = "0.1.0"
