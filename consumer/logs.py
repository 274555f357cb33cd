"""structlog configuration: JSON lines (or a console renderer), filtered cheaply by level.

Only entry points call `configure_logging`. Below the configured level a log call returns at
once (`make_filtering_bound_logger`), so debug lines cost nothing on the hot path. Log lines
are written to stdout as single JSON objects rendered by orjson.

Libraries log through the standard `logging` module (aiormq reports every dropped connection,
with a traceback, at warning and error). Their records of warning and above are passed to
structlog too, so that they are JSON lines like ours (`logger` names the library, the
traceback goes in `exception`), not bare text between them; a RecursionError's thousand frames
are left out.

Except the library's reports of a broker going away (`FOLDED`): the worker says that itself,
once per outage ("broker unavailable", then "broker reconnected after N s"), so those records
are lowered to debug, without their tracebacks. Any other library warning or error, a real one,
stays as it is.
"""

from __future__ import annotations

import logging
import sys
from typing import IO, Any, TextIO, cast

import orjson
import structlog
from structlog.typing import FilteringBoundLogger

# aiormq's messages for a connection that could not be made or was lost: the worker's own
# "broker unavailable" line reports the same fault (record.msg, before %-formatting).
FOLDED = (
    "error when creating transport",
    "Cancelling cause reader exited abnormally",
    "Unexpected connection close from remote",
    "Server connection %r was stuck",
)
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    log_format: str = "json", level: str = "info", stream: IO[Any] | None = None
) -> None:
    """Route every structlog logger to `stream` (stdout) as JSON or console lines."""
    renderer: Any
    factory: Any
    if log_format == "console":
        # Every string value quoted with repr(): structlog quotes only those holding a space,
        # '=', a quote or a line break, so an event id with ESC (a terminal escape sequence),
        # another C0/C1 control or U+2028 reached the operator's terminal raw (found by the
        # hostile-identity property test in tests/test_translate.py).
        renderer = structlog.dev.ConsoleRenderer(colors=False, repr_native_str=True)
        factory = structlog.PrintLoggerFactory(cast(TextIO, stream or sys.stdout))
    else:
        renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory = structlog.BytesLoggerFactory(_binary(stream or sys.stdout))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    if not any(isinstance(handler, _ToStructlog) for handler in root.handlers):
        root.addHandler(_ToStructlog(logging.WARNING))


class _ToStructlog(logging.Handler):
    """Hands the standard library's log records to structlog."""

    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name}
        if is_folded(record):
            structlog.get_logger(record.name).debug(record.getMessage(), **fields)
            return
        if record.exc_info and isinstance(record.exc_info[1], RecursionError):
            # A thousand frames of one decoder (headers nested too deep did it, 218 KB a line,
            # twice a second while the worker reconnects, before consumer/amqptables.py): one
            # line says it as well.
            fields["error"] = f"RecursionError: {record.exc_info[1]} (traceback left out)"
        elif record.exc_info:
            fields["exc_info"] = record.exc_info
        structlog.get_logger(record.name).log(record.levelno, record.getMessage(), **fields)


def is_folded(record: logging.LogRecord) -> bool:
    """Whether `record` is the AMQP library's report of a lost or refused connection."""
    return record.name.startswith(("aiormq", "aio_pika")) and str(record.msg).startswith(FOLDED)


def _binary(stream: IO[Any]) -> Any:
    # JSON lines are bytes from orjson; write them to the stream's buffer when it has one.
    return getattr(stream, "buffer", stream)


def get_logger(name: str) -> FilteringBoundLogger:
    """A logger of the class `configure_logging` set up: typed, so mypy checks every call."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
