"""The outbox table, its triggers, and every SQL statement the write side and the relay run.

Pure: strings and constants, no driver. `vercel-consumer outbox sql` prints `DDL` for teams that
migrate with their own tool; `vercel-consumer outbox init` runs it (idempotent).

Order. `seq` is the relay's publishing order within an installation, and it is COMMIT order:
a BEFORE INSERT trigger takes a transaction-scoped advisory lock on the row's installation
(namespace WRITE_LOCK) and only then draws `seq`. A second transaction writing events of the
same installation waits at that lock until the first commits or rolls back, so a smaller `seq`
is always committed before a larger one is drawn, and the relay never sees a later event of an
installation while an earlier one is still uncommitted. Writers of different installations do
not wait for each other.

The relay claims per installation: `pg_try_advisory_xact_lock` on namespace CLAIM_LOCK skips
installations another relay holds (SKIP LOCKED, one level up), then the rows of the
installations it got are taken `FOR UPDATE SKIP LOCKED`, and rows after one it had to skip are
dropped from the batch (GAPS), so two relays never publish one installation's events out of
order. The advisory locks end with the claim transaction, after the rows are marked sent.
"""

from __future__ import annotations

TABLE = "vercel_outbox"
CHANNEL = "vercel_outbox"  # the NOTIFY channel: one empty notification per inserting statement
WRITE_LOCK = 0x0B0C_0001  # advisory lock namespaces (first key of the two-int form)
CLAIM_LOCK = 0x0B0C_0002

DDL = f"""\
-- vercel-event-consumer transactional outbox (docs/outbox.md). Idempotent.
CREATE SEQUENCE IF NOT EXISTS {TABLE}_seq;

CREATE TABLE IF NOT EXISTS {TABLE} (
    seq             bigint PRIMARY KEY,          -- set by the trigger: commit order
    id              text NOT NULL UNIQUE,        -- the event id, AMQP message_id; a repeat fails
    type            text NOT NULL,               -- routing key
    installation_id text NOT NULL,
    body            jsonb NOT NULL,              -- the whole event, as the contract has it
    created_at      timestamptz NOT NULL DEFAULT now(),
    sent_at         timestamptz,                 -- NULL until published (or dead-lettered)
    attempts        integer NOT NULL DEFAULT 0,  -- failed publishing attempts
    last_error      text,
    CONSTRAINT {TABLE}_body_is_object CHECK (jsonb_typeof(body) = 'object'),
    CONSTRAINT {TABLE}_columns_match_body CHECK (
        body->>'id' = id AND body->>'type' = type AND body->>'installation_id' = installation_id
    )
);

CREATE INDEX IF NOT EXISTS {TABLE}_unsent ON {TABLE} (installation_id, seq) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS {TABLE}_unsent_seq ON {TABLE} (seq) WHERE sent_at IS NULL;
CREATE INDEX IF NOT EXISTS {TABLE}_sent ON {TABLE} (sent_at) WHERE sent_at IS NOT NULL;

CREATE OR REPLACE FUNCTION {TABLE}_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- One writer per installation at a time until commit: seq order is commit order.
    PERFORM pg_advisory_xact_lock({WRITE_LOCK}, hashtext(NEW.installation_id));
    NEW.seq := nextval('{TABLE}_seq');
    RETURN NEW;
END $$;

CREATE OR REPLACE FUNCTION {TABLE}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{CHANNEL}', '');  -- delivered at commit, never for a rollback
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS {TABLE}_order ON {TABLE};
CREATE TRIGGER {TABLE}_order BEFORE INSERT ON {TABLE}
    FOR EACH ROW EXECUTE FUNCTION {TABLE}_order();
DROP TRIGGER IF EXISTS {TABLE}_notify ON {TABLE};
CREATE TRIGGER {TABLE}_notify AFTER INSERT ON {TABLE}
    FOR EACH STATEMENT EXECUTE FUNCTION {TABLE}_notify();
"""

# The one INSERT every language runs, with the event's JSON text as its only parameter; the
# columns are read from the body, and the table's checks refuse a body that is not an object.
_INSERT = (
    f"INSERT INTO {TABLE} (id, type, installation_id, body) "
    "SELECT b->>'id', b->>'type', b->>'installation_id', b FROM (SELECT CAST({} AS jsonb) AS b) e"
)
INSERT_PSYCOPG = _INSERT.format("%s")
INSERT_ASYNCPG = _INSERT.format("$1")  # also node-postgres (pg) and Go's pgx
INSERT_SQLALCHEMY = _INSERT.format(":body")

# ── the relay's claim, in three statements of one transaction ────────────────────────────────

# 1. The installations with unsent rows, oldest head first, locked for this relay; those another
# relay holds are skipped. `heads` walks the (installation_id, seq) index one installation at
# a time (a loose index scan: one probe per installation, not a pass over the whole backlog,
# which may be millions of rows after an outage). The CTEs are materialised so that the lock is
# tried only on the rows the final LIMIT pulls, one by one, never on installations this batch
# will not take.
CLAIM_INSTALLATIONS = f"""
WITH RECURSIVE heads AS (
    (SELECT installation_id, seq FROM {TABLE} WHERE sent_at IS NULL
     ORDER BY installation_id, seq LIMIT 1)
    UNION ALL
    SELECT next.installation_id, next.seq FROM heads, LATERAL (
        SELECT installation_id, seq FROM {TABLE}
        WHERE sent_at IS NULL AND installation_id > heads.installation_id
        ORDER BY installation_id, seq LIMIT 1
    ) AS next
), candidates AS MATERIALIZED (
    SELECT installation_id FROM heads ORDER BY seq LIMIT %(candidates)s
)
SELECT installation_id FROM candidates
WHERE pg_try_advisory_xact_lock({CLAIM_LOCK}, hashtext(installation_id))
LIMIT %(installations)s
"""

# 2. Their oldest unsent rows, locked. A fresh statement: its snapshot is taken after the locks,
# so it sees what the relay that held them before committed.
CLAIM_ROWS = f"""
SELECT seq, id, type, installation_id, body::text, created_at FROM {TABLE}
WHERE sent_at IS NULL AND installation_id = ANY(%(installations)s)
ORDER BY seq LIMIT %(batch)s
FOR UPDATE SKIP LOCKED
"""

# 3. Per installation, the first unsent row up to the batch's last that the claim did NOT get
# (locked by something else): rows after it must wait, or they would overtake it.
GAPS = f"""
SELECT installation_id, min(seq) FROM {TABLE}
WHERE sent_at IS NULL AND installation_id = ANY(%(installations)s)
  AND seq <= %(last)s AND NOT (seq = ANY(%(claimed)s))
GROUP BY installation_id
"""

MARK_SENT = f"UPDATE {TABLE} SET sent_at = now() WHERE seq = ANY(%s)"
MARK_DEAD = f"UPDATE {TABLE} SET sent_at = now(), last_error = %s WHERE seq = %s"
NOTE_FAILURE = (
    f"UPDATE {TABLE} SET attempts = attempts + 1, last_error = %s "
    "WHERE seq = ANY(%s) AND sent_at IS NULL"
)
DELETE_SENT = f"""
DELETE FROM {TABLE} WHERE seq IN (
    SELECT seq FROM {TABLE} WHERE sent_at < now() - make_interval(secs => %s) LIMIT %s
)
"""
# The backlog and the age of its head, both from the partial index on unsent rows: the count is
# an index-only scan of the backlog alone (never of the sent rows the retention keeps, which a
# `min(created_at)` over the table made a sequential scan of), the head one index probe. The head
# is the first unsent row in publishing order. A row behind it may have an earlier created_at
# (its transaction began first and inserted later), so the age can fall short of the oldest
# created_at by at most the time such a transaction ran before its INSERT.
BACKLOG = f"""
SELECT (SELECT count(*) FROM {TABLE} WHERE sent_at IS NULL),
       coalesce((SELECT extract(epoch FROM now() - created_at) FROM {TABLE}
                 WHERE sent_at IS NULL ORDER BY seq LIMIT 1), 0)::float8
"""
LISTEN = f"LISTEN {CHANNEL}"
