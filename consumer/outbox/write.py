"""Adding an event to the outbox inside the caller's open transaction.

```python
with Session(engine) as session, session.begin():
    session.add(order)                        # the change …
    add_event(session, event)                 # … and its event: one commit, or neither
```

One function per driver: SQLAlchemy 2 (`add_event` for a `Session`, `add_event_async` for an
`AsyncSession`), psycopg 3 (`add_event_psycopg`, `add_event_psycopg_async`) and asyncpg
(`add_event_asyncpg`). Each checks the event against the contract first and raises
ContractError, so an invalid event fails the caller's transaction instead of reaching the DLQ
later; then runs the same one-parameter INSERT (consumer/outbox/schema.py) that services in
other languages run by hand. None commits: the caller's transaction decides. The drivers are
the caller's: this module imports none of them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from consumer.contract import parse_event
from consumer.errors import ContractError
from consumer.outbox.schema import INSERT_ASYNCPG, INSERT_PSYCOPG, INSERT_SQLALCHEMY

MAX_BODY_BYTES = 256 * 1024  # the worker's default CONSUMER_MAX_BODY_BYTES


def outbox_body(event: Mapping[str, Any], *, max_bytes: int = MAX_BODY_BYTES) -> str:
    """The event as the JSON text the INSERT takes; ContractError if it breaks the contract."""
    try:
        body = orjson.dumps(dict(event))
    except (TypeError, ValueError) as exc:  # a value JSON cannot hold (an object, a huge int)
        raise ContractError(f"body cannot be written as JSON: {exc}") from None
    parse_event(body, max_bytes=max_bytes)
    return body.decode()


def add_event(session: Any, event: Mapping[str, Any]) -> None:
    """Add `event` in a SQLAlchemy 2 `Session`'s transaction (flushed with it, committed by
    the caller)."""
    from sqlalchemy import text  # the caller's dependency, not ours

    session.execute(text(INSERT_SQLALCHEMY), {"body": outbox_body(event)})


async def add_event_async(session: Any, event: Mapping[str, Any]) -> None:
    """Add `event` in a SQLAlchemy 2 `AsyncSession`'s transaction."""
    from sqlalchemy import text

    await session.execute(text(INSERT_SQLALCHEMY), {"body": outbox_body(event)})


def add_event_psycopg(connection: Any, event: Mapping[str, Any]) -> None:
    """Add `event` on a psycopg 3 `Connection` (or cursor), in its open transaction."""
    connection.execute(INSERT_PSYCOPG, (outbox_body(event),))


async def add_event_psycopg_async(connection: Any, event: Mapping[str, Any]) -> None:
    """Add `event` on a psycopg 3 `AsyncConnection` (or cursor), in its open transaction."""
    await connection.execute(INSERT_PSYCOPG, (outbox_body(event),))


async def add_event_asyncpg(connection: Any, event: Mapping[str, Any]) -> None:
    """Add `event` on an asyncpg `Connection`, inside its `connection.transaction()`."""
    await connection.execute(INSERT_ASYNCPG, outbox_body(event))
