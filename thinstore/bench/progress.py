"""The progress line of a running benchmark: elapsed time and current IOPS.

Drawn on stderr only when it is a terminal (a pipe or a file sees nothing),
from a thread that samples the engine's completed-request count twice a
second, so the measured threads never print.

    bench vm1  4K randwrite QD16, 10s  [ 3.5s/10s]  12.3K IOPS  48.1M/s
"""

from __future__ import annotations

import sys
import threading
import time

from thinstore.units import format_size

TICK = 0.5


class Ticker:
    """Context manager; ``ops_done()`` returns requests completed so far (or None)."""

    def __init__(self, enabled: bool, label: str, workload, ops_done=None, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.label, self.w, self.ops_done = label, workload, ops_done
        self._stop = threading.Event()
        self._thread = None

    def __enter__(self):
        if self.enabled:
            self._start = time.monotonic()
            self._thread = threading.Thread(target=self._loop, name="bench-progress",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _loop(self) -> None:
        last_ops, last_t = 0, time.monotonic()
        while not self._stop.wait(TICK):
            now = time.monotonic()
            ops = self._ops()
            rate = (ops - last_ops) / max(now - last_t, 1e-9) if ops is not None else None
            last_ops, last_t = ops or 0, now
            self.stream.write("\r" + self.line(now - self._start, rate) + "\x1b[K")
            self.stream.flush()

    def _ops(self):
        try:
            return self.ops_done() if self.ops_done else None
        except Exception:          # a progress line must never end a benchmark
            return None

    def line(self, elapsed: float, iops) -> str:
        total = f"/{self.w.seconds:g}s" if self.w.seconds else ""
        text = f"{self.label}  {self.w.describe()}  [{elapsed:5.1f}s{total}]"
        if iops is not None:
            text += f"  {_count(iops)} IOPS  {format_size(int(iops * self.w.io_size))}/s"
        return text


def _count(value: float) -> str:
    for unit, scale in (("M", 1e6), ("K", 1e3)):
        if value >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"
