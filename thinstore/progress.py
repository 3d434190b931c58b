"""A one-line progress bar for long copies (import, export).

It draws only when its stream is a terminal, so scripts and pipes see nothing, and it
redraws at most a few times a second, so a copy of many small blocks does not spend its
time printing.  The line shows the bar, bytes done of total, the rate and the ETA::

    import vm1  [#########-----------]  4.5G/10G  512M/s  ETA 0:11

Use it as a context manager; leaving the block ends the line (on success and error).
"""

from __future__ import annotations

import sys
import time

from thinstore.units import format_duration, format_size

BAR_WIDTH = 24
REDRAW_SECONDS = 0.1


class Progress:
    """Counts bytes towards ``total`` and, on a terminal, keeps one status line current."""

    def __init__(self, total: int, label: str, stream=None, clock=time.monotonic):
        self.total = max(0, total)
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = _is_terminal(self.stream)
        self.done = 0
        self._clock = clock
        self._start = clock()
        self._last_draw = float("-inf")

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def advance(self, nbytes: int) -> None:
        """Add ``nbytes`` to the count and redraw if the last draw is old enough."""
        self.done = min(self.total, self.done + nbytes)
        now = self._clock()
        if self.enabled and now - self._last_draw >= REDRAW_SECONDS:
            self._last_draw = now
            self._draw(now)

    def close(self) -> None:
        """Draw the final state and end the line, once."""
        if self.enabled:
            self._draw(self._clock())
            self.stream.write("\n")
            self.stream.flush()
            self.enabled = False

    def line(self, now: float) -> str:
        """The status text at time ``now`` (no control characters)."""
        elapsed = max(now - self._start, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        filled = BAR_WIDTH * self.done // self.total if self.total else BAR_WIDTH
        bar = "#" * filled + "-" * (BAR_WIDTH - filled)
        return (f"{self.label}  [{bar}]  {format_size(self.done)}/{format_size(self.total)}"
                f"  {format_size(int(rate))}/s  ETA {format_duration(eta)}")

    def _draw(self, now: float) -> None:
        # \r returns to column 0 and \x1b[K clears what a longer previous line left behind.
        self.stream.write("\r" + self.line(now) + "\x1b[K")
        self.stream.flush()


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
