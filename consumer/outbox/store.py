"""The relay's PostgreSQL edge (psycopg 3, async): connecting, the claim, marking rows, cleanup.

psycopg's errors (and the OSError a lost socket gives) become DatabaseError here, at the
boundary, with the failed action named; DSN passwords are never formatted into them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import TupleRow

import consumer.outbox.schema as schema
from consumer.errors import DatabaseError

CONNECT_TIMEOUT = 10  # seconds; a server that does not answer by then counts as down
# TCP keepalives, so that a server that vanished without a FIN (a partition, a dead node) fails
# the connection within about 25 s instead of leaving a statement or LISTEN waiting for good.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
CANDIDATES_PER_INSTALLATION = 4  # installations looked at per one claimed (others may be held)

Connection = psycopg.AsyncConnection[TupleRow]


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One claimed, unsent event."""

    seq: int
    id: str
    type: str
    installation_id: str
    body: bytes  # the JSON text of the body column
    created_at: datetime


@contextlib.contextmanager
def database_errors(action: str) -> Iterator[None]:
    """Re-raise what psycopg (or the socket under it) throws while doing `action` as a
    DatabaseError."""
    try:
        yield
    except psycopg.Error as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseError(f"{action} failed: {detail}") from exc
    except OSError as exc:
        raise DatabaseError(f"{action} failed: {exc}") from exc


def dsn_problem(dsn: str) -> str | None:
    """Why libpq can never use `dsn`, in words that quote none of it; None when it parses.

    Checked once at start-up: psycopg's own parse errors quote the DSN, password and all
    (`invalid percent-encoded token: "s3%zzcret"`, `missing "=" after "cret"`, the whole URI
    for an unclosed `[`), and the relay logged them on every failed connection. A raw `/`, `?`,
    `#` or `@` in a URL's password moves its boundaries as in an AMQP URL (the password became
    the port, or the host name in a resolver error), so it is refused before libpq sees it."""
    is_uri = dsn.startswith(("postgresql://", "postgres://"))  # libpq's two URI prefixes
    start, end = dsn.find("://") + 3, dsn.rfind("@")  # the user information lies between
    if is_uri and end > start and any(char in dsn[start:end] for char in "/?#@"):
        return (
            "holds a raw '/', '?', '#' or '@' in its user name or password: percent-encode it"
            " (e.g. / as %2F)"
        )
    try:
        params = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.Error:
        return (
            "is neither a postgresql:// URL nor a libpq key=value string (libpq's message is"
            " not shown: it would quote the password)"
        )
    ports = str(params.get("port") or "").split(",")
    if not all(port == "" or (port.isascii() and port.isdigit()) for port in ports):
        return "has a port that is not a number"
    return None


async def connect(dsn: str, *, autocommit: bool = False) -> Connection:
    """One connection to the outbox's database."""
    with database_errors("connecting to PostgreSQL"):
        return await psycopg.AsyncConnection.connect(
            with_keepalives(dsn), autocommit=autocommit, connect_timeout=CONNECT_TIMEOUT
        )


def with_keepalives(dsn: str) -> str:
    """The DSN with our TCP keepalive settings, unless it sets keepalives itself."""
    if "keepalives" in dsn:
        return dsn
    return psycopg.conninfo.make_conninfo(dsn, **KEEPALIVES)


async def init_schema(dsn: str) -> None:
    """Create the table, its indexes and triggers (idempotent)."""
    async with await connect(dsn) as connection:
        with database_errors("creating the outbox table"):
            await connection.execute(schema.DDL)
            await connection.commit()


async def claim(connection: Connection, batch: int) -> list[OutboxRow]:
    """Claim up to `batch` of the oldest unsent rows, in `seq` order, for the open transaction.

    Installations another relay holds are skipped; within an installation no row is claimed
    after one that is locked by someone else (see consumer/outbox/schema.py)."""
    with database_errors("claiming outbox rows"):
        installations = [
            row[0]
            for row in await _fetch(
                connection,
                schema.CLAIM_INSTALLATIONS,
                {"candidates": batch * CANDIDATES_PER_INSTALLATION, "installations": batch},
            )
        ]
        if not installations:
            return []
        rows = [
            OutboxRow(seq, event_id, event_type, installation, body.encode(), created_at)
            for seq, event_id, event_type, installation, body, created_at in await _fetch(
                connection,
                schema.CLAIM_ROWS,
                {"installations": installations, "batch": batch},
            )
        ]
        if not rows:
            return []
        gaps = dict(
            await _fetch(
                connection,
                schema.GAPS,
                {
                    "installations": installations,
                    "last": rows[-1].seq,
                    "claimed": [row.seq for row in rows],
                },
            )
        )
    return [row for row in rows if row.seq < gaps.get(row.installation_id, row.seq + 1)]


async def mark_sent(connection: Connection, seqs: Sequence[int]) -> None:
    with database_errors("marking outbox rows sent"):
        await connection.execute(schema.MARK_SENT, (list(seqs),))


async def mark_dead_lettered(connection: Connection, seq: int, why: str) -> None:
    with database_errors("marking an outbox row dead-lettered"):
        await connection.execute(schema.MARK_DEAD, (f"dead-lettered: {why}", seq))


async def note_failure(connection: Connection, seqs: Sequence[int], error: str) -> None:
    """Count a failed publishing attempt on rows still unsent (in a transaction of its own)."""
    with database_errors("noting a publishing failure"):
        async with connection.transaction():
            await connection.execute(schema.NOTE_FAILURE, (error, list(seqs)))


async def delete_sent(connection: Connection, retention: float, limit: int) -> int:
    """Delete up to `limit` rows sent more than `retention` seconds ago; how many went."""
    with database_errors("deleting sent outbox rows"):
        async with connection.transaction():
            cursor = await connection.execute(schema.DELETE_SENT, (retention, limit))
            return cursor.rowcount


async def backlog(connection: Connection) -> tuple[int, float]:
    """(unsent rows, seconds since the oldest of them was written)."""
    with database_errors("measuring the outbox backlog"):
        async with connection.transaction():
            cursor = await connection.execute(schema.BACKLOG)
            row = await cursor.fetchone()
    return (int(row[0]), float(row[1])) if row else (0, 0.0)


async def notifications(connection: Connection) -> AsyncIterator[None]:
    """LISTEN on the outbox channel (an autocommit connection); yield once per notification."""
    with database_errors("listening for outbox notifications"):
        await connection.execute(schema.LISTEN)
        async for _ in connection.notifies():
            yield None


async def _fetch(connection: Connection, query: str, params: dict[str, Any]) -> list[Any]:
    cursor = await connection.execute(query, params)
    return await cursor.fetchall()
