"""Progress output: `logging` under the "edgeforge" logger, and progress bars for long loops.

Library modules never print and take no `log=` callbacks: they log with
`logging.getLogger(__name__)` (all under "edgeforge"), at INFO for progress, DEBUG for details
(per tensor, per prompt), WARNING for what a user should see even with -q. The CLI calls
`configure(verbosity)` once per run: one stderr handler, plain `%(message)s` lines, so stdout stays
for results (--json). A program embedding edgeforge configures `logging` as it likes instead.

Long loops use `progress()`:

    with progress(len(plan), "[quantize]", unit="tensors", logger=logger) as bar:
        for name in plan:
            ...
            bar.advance(1, name)

On a terminal (stderr is a tty, $CI unset, $TERM not "dumb") that draws one updating line
(`\\r`: count/total, percent, elapsed, rate, detail). Elsewhere (CI logs, pipes, files) it logs a
plain line at about every 10% and the last one, "[quantize] 12/120 tensors (3 s)". When INFO is
off (-q) it shows nothing.

Not used by edgeforge/runtime/ (copied into every bundle, stdlib only, self-contained).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import sys
import time
from typing import Iterator, TextIO

logger = logging.getLogger("edgeforge")

QUIET, DEFAULT, VERBOSE = -1, 0, 1

_prefix: contextvars.ContextVar[str] = contextvars.ContextVar("edgeforge_log_prefix", default="")
_active: Progress | None = None  # the bar drawn on the terminal now (the handler clears it around records)


def level_for(verbosity: int) -> int:
    """-q (< 0): WARNING; default (0): INFO; -v (> 0): DEBUG."""
    if verbosity < 0:
        return logging.WARNING
    return logging.INFO if verbosity == 0 else logging.DEBUG


class _Formatter(logging.Formatter):
    """`%(message)s`, after the prefix of the enclosing `prefixed()` block (e.g. "  [rpi5/tvm] ")."""

    def format(self, record: logging.LogRecord) -> str:
        return _prefix.get() + super().format(record)


class _StderrHandler(logging.StreamHandler):
    """Writes to sys.stderr as it is at each record (pytest and click's test runner replace it), and
    takes the progress bar off the line while a record is written."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass

    def emit(self, record: logging.LogRecord) -> None:
        bar = _active
        if bar is not None:
            bar.clear()
        super().emit(record)
        if bar is not None:
            bar.redraw()


def _handler() -> _StderrHandler | None:
    return next((h for h in logger.handlers if isinstance(h, _StderrHandler)), None)


def configure(verbosity: int = DEFAULT) -> None:
    """Send edgeforge's log records to stderr as plain lines, at the level -q/-v ask for.

    Idempotent: one handler however often it is called; a later call only changes the level."""
    logger.setLevel(level_for(verbosity))
    if _handler() is None:
        handler = _StderrHandler()
        handler.setFormatter(_Formatter("%(message)s"))
        logger.addHandler(handler)


@contextlib.contextmanager
def prefixed(prefix: str) -> Iterator[None]:
    """Log lines written inside this block (this thread or task) start with `prefix`."""
    token = _prefix.set(_prefix.get() + prefix)
    try:
        yield
    finally:
        _prefix.reset(token)


def is_terminal(stream: TextIO) -> bool:
    """A person watching: a tty, not a CI job ($CI set), not a dumb terminal."""
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False
    return bool(tty) and not os.environ.get("CI") and os.environ.get("TERM", "") != "dumb"


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:d}:{rest % 60:02d}"


def _rate(per_second: float) -> str:
    return f"{per_second:.0f}" if per_second >= 100 else f"{per_second:.1f}" if per_second >= 10 else f"{per_second:.2f}"


class Progress:
    """Progress of a loop of `total` steps; see the module docstring. Use through `progress()`."""

    BAR_WIDTH = 20
    MIN_REDRAW_S = 0.1  # a bar redraws at most ten times a second (and always at the end)

    def __init__(self, total: int, label: str, unit: str = "items", logger: logging.Logger | None = None,
                 stream: TextIO | None = None):
        self.total, self.label, self.unit = max(0, int(total)), label, unit
        self.log = logger or logging.getLogger("edgeforge")
        self._stream = stream
        self.count, self.detail = 0, ""
        self.start = time.perf_counter()
        self.enabled = self.log.isEnabledFor(logging.INFO)
        self.terminal = self.enabled and is_terminal(self.stream)
        self._step = max(1, self.total // 10)
        self._logged = 0  # the count of the last plain line
        self._drawn_width = 0  # characters of the bar line on screen (0: none drawn)
        self._drawn_count = -1  # the count the bar on screen shows
        self._last_draw = 0.0
        self._outer: Progress | None = None

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    # ---- the loop's side ----------------------------------------------------------------------
    def advance(self, n: int = 1, detail: str | None = None) -> None:
        """`n` more steps done; `detail` (what was just done) shows at the end of a terminal bar."""
        previous, self.count = self.count, self.count + n
        if detail is not None:
            self.detail = str(detail)
        if not self.enabled:
            return
        if self.terminal:
            now = time.perf_counter()
            if self.count >= self.total or now - self._last_draw >= self.MIN_REDRAW_S:
                self._draw(now)
        elif self.count != self._logged and (self.count >= self.total or self.count // self._step > previous // self._step):
            self._line()

    # ---- output -------------------------------------------------------------------------------
    def _line(self) -> None:
        self._logged = self.count
        self.log.info("%s %d/%d %s (%.0f s)", self.label, self.count, self.total, self.unit,
                      time.perf_counter() - self.start)

    def text(self, now: float | None = None, width: int | None = None) -> str:
        """The bar line: label, bar, count/total, percent, elapsed, rate, detail (cut from the left to fit
        `width`: the end of a tensor name is the part that differs)."""
        elapsed = (now or time.perf_counter()) - self.start
        frac = min(1.0, self.count / self.total) if self.total else 1.0
        filled = int(round(frac * self.BAR_WIDTH))
        rate = self.count / elapsed if elapsed > 0 else 0.0
        line = (f"{self.label} [{'#' * filled}{'.' * (self.BAR_WIDTH - filled)}] {self.count}/{self.total} {self.unit} "
                f"{100 * frac:3.0f}% {_clock(elapsed)} {_rate(rate)} {self.unit}/s")
        if not self.detail:
            return line
        room = (width - len(line) - 2) if width else len(self.detail)
        detail = self.detail if len(self.detail) <= room else ("..." + self.detail[-(room - 3):] if room > 6 else "")
        return f"{line}  {detail}" if detail else line

    def _draw(self, now: float | None = None) -> None:
        global _active
        if self._outer is None and _active is not self:
            self._outer, _active = _active, self
        self._last_draw = now or time.perf_counter()
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        line = self.text(self._last_draw, width)[:width]
        pad = " " * max(0, self._drawn_width - len(line))
        self.stream.write("\r" + line + pad)
        self.stream.flush()
        self._drawn_width, self._drawn_count = len(line), self.count

    def clear(self) -> None:
        """Take the bar off its line (a log record is about to be written there)."""
        if self._drawn_width:
            self.stream.write("\r" + " " * self._drawn_width + "\r")
            self.stream.flush()

    def redraw(self) -> None:
        if self._drawn_width:
            self._drawn_width = 0  # the line is empty now
            self._draw()

    def close(self, finished: bool = True) -> None:
        """End the bar: a terminal keeps its last state on a line of its own; plain output gets the
        final count when the last line did not show it (a loop that ended early)."""
        global _active
        if self.terminal and self._drawn_width:
            if finished and self._drawn_count != self.count:
                self._draw()
            self.stream.write("\n")
            self.stream.flush()
            self._drawn_width = 0
        elif self.enabled and not self.terminal and finished and self.count and self.count != self._logged:
            self._line()
        if _active is self:
            _active = self._outer


@contextlib.contextmanager
def progress(total: int, label: str, unit: str = "items", logger: logging.Logger | None = None,
             stream: TextIO | None = None) -> Iterator[Progress]:
    """A `Progress` for a loop of `total` steps; plain lines go to `logger` (default "edgeforge"),
    a terminal bar to `stream` (default sys.stderr)."""
    bar = Progress(total, label, unit, logger, stream)
    if bar.terminal:
        bar._draw()  # 0/total at once: the first step may take a while
    try:
        yield bar
    except BaseException:
        bar.close(finished=False)
        raise
    bar.close()
