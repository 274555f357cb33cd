"""Our message headers and the AMQP properties a copy carries: the names, in one place.

The relay writes these headers (consumer/deadletter.py); `vercel-consumer dlq` reads them
(consumer/dlq/model.py says what each means for a dead letter) and writes the replay ones. A leaf:
it imports nothing, so both sides can.
"""

from __future__ import annotations

ATTEMPTS = "delivery-attempts"
FIRST_ATTEMPT_AT = "first-attempt-at"
ORIGINAL_EXCHANGE = "original-exchange"
ORIGINAL_ROUTING_KEY = "original-routing-key"
ORIGINAL_USER_ID = "original-user-id"
LAST_ERROR = "last-error"
REASON = "dead-letter-reason"
DETAIL = "dead-letter-detail"
HTTP_STATUS = "dead-letter-http-status"
DEAD_LETTERED_AT = "dead-lettered-at"
REPLAY_COUNT = "replay-count"
REPLAYED_AT = "replayed-at"
DROPPED_HEADERS = "dropped-headers"
# Set by quorum queues: how often the broker delivered this copy before without an ack. Ours
# only for reading; never carried over to a copy, which is a new message.
DELIVERY_COUNT = "x-delivery-count"

# AMQP's basic properties other than `headers`, in the protocol's order, by aio-pika's names.
PROPERTIES = (
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
)
# Not carried to a copy: `expiration` would let the copy vanish, the broker checks `user_id`
# against our login (callers keep it as ORIGINAL_USER_ID), and a copy is always persistent.
NOT_COPIED = frozenset({"expiration", "user_id", "delivery_mode"})
