"""The operator's dead-letter tool: `vercel-consumer dlq stats|list|replay|purge|import`.

By concern: `session` holds the DLQ (lock, one pass that reads by moving), `replay`, `purge`
and `restore` (import) act on it, `model` says what a dead letter and its headers mean,
`render` is every text an operator reads, `export` the purge export file (format and file
I/O), `progress` the progress display, and `cli` the commands and their flags. The relay never
imports this package.
"""
