"""The operator's dead-letter tool: `vercel-consumer dlq stats|list|replay|purge|import`.

`ops` holds what is done on the broker (lock, hold, replay, purge, import), `view` what an
operator sees of a dead letter (rows, filters, stats, tables), `export` the purge export file
format, `progress` the progress display, and `cli` the commands. The relay never imports this
package.
"""
