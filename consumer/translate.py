"""Pure translation: a contract `Event` → the Vercel Create Event request it stands for.

`resource.*` → `{"event": {"type": "resource.updated", "resourceId", "productId"?}}`,
`billing.*` → `{"event": {"type": "installation.updated", "billingPlanId"?}}`. Absent optional
fields are omitted, never sent as null. The installation id is checked against the contract's
pattern and percent-encoded as one path segment, so an id can never reach another endpoint.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from consumer.contract import INSTALLATION_ID_PATTERN, BillingEvent, Event, ResourceEvent
from consumer.errors import ContractError

_INSTALLATION_ID = re.compile(INSTALLATION_ID_PATTERN, re.ASCII)


@dataclass(frozen=True, slots=True)
class VercelRequest:
    """One Create Event call: where it goes and the JSON it carries."""

    path: str
    body: bytes


def translate(event: Event) -> VercelRequest:
    """Build the Create Event request for one domain event."""
    payload: dict[str, Any]
    if isinstance(event, ResourceEvent):
        payload = {"type": "resource.updated", "resourceId": event.resource_id}
        if event.product_id is not None:
            payload["productId"] = event.product_id
    elif isinstance(event, BillingEvent):
        payload = {"type": "installation.updated"}
        if event.billing_plan_id is not None:
            payload["billingPlanId"] = event.billing_plan_id
    else:  # pragma: no cover - the Event union is closed; this guards its next member
        raise TypeError(f"no translation for {type(event).__name__}")
    return VercelRequest(
        path=events_path(event.installation_id),
        body=orjson.dumps({"event": payload}),
    )


@functools.lru_cache(maxsize=4096)
def events_path(installation_id: str) -> str:
    """`/v1/installations/{integrationConfigurationId}/events`, the id as one encoded segment.

    The contract already holds ids to INSTALLATION_ID_PATTERN; checked again here because a
    `.` or `..` segment survives percent-encoding and any normalising proxy would move it.

    Cached (a few thousand installations): the check and `quote` cost a few microseconds per
    message otherwise, for the same few ids over and over. A rejected id raises, which is never
    cached, so it is checked again each time."""
    if not _INSTALLATION_ID.fullmatch(installation_id):
        raise ContractError("installation_id: must be ASCII letters, digits, '_' or '-'")
    return f"/v1/installations/{quote(installation_id, safe='')}/events"
