"""Progress of a long command: a redrawn bar on a terminal, plain lines anywhere else.

`progress_for(stream, total, title)` picks one by `stream.isatty()`. A bar is redrawn at most
ten times a second; plain lines (for a Kubernetes Job's log, a pipe or a file) come at each
tenth of the way but at most once a second, and at least every `LINE_EVERY` seconds, so a log
is neither silent nor flooded. Commands write progress to stderr: stdout is for results.
"""

from __future__ import annotations

import time
from typing import IO, Protocol

BAR_WIDTH = 30
REDRAW_EVERY = 0.1  # seconds
LINE_EVERY = 5.0  # seconds
LINE_GAP = 1.0  # seconds, at least, between two lines


class Progress(Protocol):
    def update(self, done: int, note: str) -> None: ...

    def close(self) -> None: ...


def progress_for(stream: IO[str], total: int, title: str) -> Progress:
    if stream.isatty():
        return ProgressBar(stream, total, title)
    return ProgressLines(stream, total, title)


class ProgressBar:
    """`replay [##########----------]  512/1024  50%  moved 500 skipped 12 failed 0`."""

    def __init__(self, stream: IO[str], total: int, title: str) -> None:
        self._stream, self._total, self._title = stream, max(total, 1), title
        self._drawn_at = 0.0
        self._last = (0, "")

    def update(self, done: int, note: str) -> None:
        self._last = (done, note)
        now = time.monotonic()
        if now - self._drawn_at >= REDRAW_EVERY:
            self._drawn_at = now
            self._draw()

    def _draw(self) -> None:
        done, note = self._last
        share = min(done / self._total, 1.0)
        filled = round(share * BAR_WIDTH)
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        line = f"{self._title} [{bar}] {done:>{len(str(self._total))}}/{self._total}"
        self._stream.write(f"\r{line} {share:4.0%}  {note}\x1b[K")
        self._stream.flush()

    def close(self) -> None:
        self._draw()
        self._stream.write("\n")
        self._stream.flush()


class ProgressLines:
    """`replay: 512/1024 (50%) moved 500 skipped 12 failed 0`, now and then."""

    def __init__(self, stream: IO[str], total: int, title: str) -> None:
        self._stream, self._total, self._title = stream, max(total, 1), title
        self._written_at = time.monotonic()
        self._tenth = 0

    def update(self, done: int, note: str) -> None:
        tenth = done * 10 // self._total
        since = time.monotonic() - self._written_at
        if (tenth > self._tenth and since >= LINE_GAP) or since >= LINE_EVERY:
            self._tenth, self._written_at = tenth, time.monotonic()
            share = min(done / self._total, 1.0)
            print(f"{self._title}: {done}/{self._total} ({share:.0%}) {note}", file=self._stream)
            self._stream.flush()

    def close(self) -> None:
        """Nothing to tidy: every line is complete."""
