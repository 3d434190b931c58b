"""What a benchmark does: the workload, parsed from the command line.

The option names and their meaning follow ``rbd bench`` (io-type, io-size,
io-pattern, io-threads as io-depth, io-total) and fio (``rw``, ``bs``,
``iodepth``, ``runtime``, ``fsync``), so a user of either reads them at sight.
"""

from __future__ import annotations

import dataclasses
import re

from thinstore.errors import UsageError
from thinstore.units import format_size

IO_TYPES = ("read", "write", "readwrite")
IO_PATTERNS = ("rand", "seq")
DEFAULT_SECONDS = 10.0


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark's workload.

    ``io_size`` bytes per request; ``io_depth`` requests in flight (threads or
    connections for the built-in engines, fio's iodepth for fio); the run stops
    after ``io_total`` bytes or ``seconds``, whichever is given (one is);
    ``sync`` is ``none``, ``fua`` (every write forced to stable storage) or
    ``every-N`` (a flush after every N writes of each thread, fio's ``fsync=N``);
    ``ramp`` seconds of the workload run first and are not measured (fio's
    ``ramp_time``): caches fill, the first writes allocate.
    """

    io_type: str = "read"
    io_size: int = 4096
    io_pattern: str = "rand"
    io_depth: int = 16
    io_total: int | None = None
    seconds: float | None = DEFAULT_SECONDS
    sync: str = "none"
    ramp: float = 0.0

    def __post_init__(self):
        if self.io_type not in IO_TYPES:
            raise UsageError(f"invalid io type {self.io_type!r}: use {', '.join(IO_TYPES)}")
        if self.io_pattern not in IO_PATTERNS:
            raise UsageError(f"invalid io pattern {self.io_pattern!r}: use rand or seq")
        if not 0 < self.io_size <= 32 << 20 or self.io_size % 512:
            raise UsageError(f"invalid io size {self.io_size}: a multiple of 512 up to 32M")
        if not 1 <= self.io_depth <= 256:
            raise UsageError(f"invalid io depth {self.io_depth}: 1 to 256")
        if (self.io_total is None) == (self.seconds is None):
            raise UsageError("give one of --io-total and --time")
        if self.io_total is not None and self.io_total < self.io_size:
            raise UsageError(f"--io-total {self.io_total} is less than one request "
                             f"(--io-size {self.io_size})")
        parse_sync(self.sync)
        if self.ramp < 0:
            raise UsageError("--ramp must not be negative")

    @property
    def writes(self) -> bool:
        return self.io_type != "read"

    @property
    def flush_every(self) -> int:
        """N of ``every-N``; 0 for ``none`` and ``fua``."""
        return parse_sync(self.sync)

    @property
    def fua(self) -> bool:
        return self.sync == "fua"

    def describe(self) -> str:
        """``4K randread QD16, 10s``: the workload as fio users name it."""
        rw = {"read": "read", "write": "write", "readwrite": "rw"}[self.io_type]
        stop = format_size(self.io_total) if self.io_total is not None \
            else f"{self.seconds:g}s"
        sync = "" if self.sync == "none" else f", sync {self.sync}"
        sync += f", after {self.ramp:g}s ramp" if self.ramp else ""
        prefix = "rand" if self.io_pattern == "rand" else "seq "
        return f"{format_size(self.io_size)} {prefix}{rw} QD{self.io_depth}, {stop}{sync}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def parse_sync(text: str) -> int:
    """``none`` and ``fua`` -> 0; ``every-N`` -> N (N >= 1); else a UsageError."""
    if text in ("none", "fua"):
        return 0
    match = re.fullmatch(r"every-(\d+)", text or "")
    if not match or int(match.group(1)) < 1:
        raise UsageError(f"invalid --sync {text!r}: use none, fua or every-N (N >= 1)")
    return int(match.group(1))


def parse_duration(text: str) -> float:
    """``30``, ``30s``, ``500ms``, ``2m``, ``1h`` -> seconds (> 0)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(ms|s|m|h)?\s*", text)
    if not match:
        raise UsageError(f"invalid duration {text!r}: e.g. 30s, 500ms, 2m")
    value = float(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[
        match.group(2)]
    if value <= 0:
        raise UsageError(f"invalid duration {text!r}: must be more than 0")
    return value

