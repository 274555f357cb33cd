"""The transactional outbox on PostgreSQL: the table (schema), the write helpers (write), the
relay (store, relay, metrics) and its commands (cli). docs/outbox.md. Nothing outside this
package but consumer/cli.py imports it, so the worker never needs a PostgreSQL driver."""
