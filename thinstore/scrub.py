"""Scrub: read every mapped chunk, verify its checksum, name what is damaged and who uses it.

Each chunk is read once however many devices share it (a snapshot costs nothing
extra), in runs of consecutive chunks, straight from ``data`` (the read cache of
verified chunks is bypassed: scrub is how rot in a chunk read long ago is found).
Chunks written since the last commit are skipped (their checksum is not computed
yet), as are chunks without a checksum (a pool made without data checksums).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import numpy as np

from .datasums import chunk_sum
from .kernels import ST_WRITTEN
from .salvage import owners

_BATCH = 4 << 20


@dataclasses.dataclass
class Damaged:
    chunk: int
    data_offset: int          # byte offset in the pool's data file
    expected: int
    found: int
    users: list               # [(device, byte offset), ...]

    def describe(self) -> str:
        users = ", ".join(f"{n} at byte {off}" for n, off in self.users) or "no device"
        return (f"chunk {self.chunk} (data file byte {self.data_offset}): checksum "
                f"{self.found:08x}, expected {self.expected:08x}; used by {users}")


@dataclasses.dataclass
class ScrubReport:
    chunks: int = 0           # mapped chunks
    verified: int = 0
    skipped: int = 0          # no checksum yet, or written since the last commit
    bytes_read: int = 0
    seconds: float = 0.0
    damaged: list = dataclasses.field(default_factory=list)

    @classmethod
    def from_dict(cls, d: dict) -> "ScrubReport":
        """The inverse of to_dict (an online scrub's answer)."""
        damaged = [Damaged(**dict(x, users=[tuple(u) for u in x["users"]]))
                   for x in d["damaged"]]
        return cls(**dict(d, damaged=damaged))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["damaged"] = [dict(dataclasses.asdict(x), users=[list(u) for u in x.users])
                        for x in self.damaged]
        return d


class Progress:
    """A one-line progress bar on a terminal (stderr), silent elsewhere unless forced."""

    def __init__(self, total: int, stream=None, force: bool = False):
        self.total = max(total, 1)
        self.stream = stream or sys.stderr
        self.on = force or self.stream.isatty()
        self.last = 0.0

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if not self.on or (now - self.last < 0.2 and done < self.total):
            return
        self.last = now
        frac = done / self.total
        bar = "#" * int(frac * 30)
        self.stream.write(f"\rscrub [{bar:<30}] {100 * frac:5.1f}% {done}/{self.total} chunks")
        if done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def scrub_pool(pool, progress=None, rate: int | None = None) -> ScrubReport:
    """Verify every mapped chunk of an open pool (holding its lock per batch).

    `rate` (bytes per second, None or 0: as fast as the disk goes) paces the reads so
    a scrub of a served pool leaves clients their share of the disk: batches shrink to
    a tenth of a second's worth (the lock is held for one batch at a time) and the
    scrub sleeps whenever it is ahead of the rate.
    """
    t0 = time.monotonic()
    rep = ScrubReport()
    md = pool.md
    with pool.lock:
        space = md.space
        mapped = np.flatnonzero(space.refs.arr)
        rep.chunks = len(mapped)
    bad: dict = {}
    done = 0
    batch = min(_BATCH, rate // 10) if rate else _BATCH
    for run in _batches(mapped, max(1, batch // md.chunk_size)):
        with pool.lock:
            _scrub_run(md, run, rep, bad)
        done += len(run)
        if progress:
            progress(done)
        if rate:
            ahead = rep.bytes_read / rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
    with pool.lock:
        users = owners(md, list(bad))
    rep.damaged = [Damaged(c, c * md.chunk_size, e, f, users.get(c, []))
                   for c, (e, f) in sorted(bad.items())]
    rep.seconds = time.monotonic() - t0
    return rep


def _scrub_run(md, run: np.ndarray, rep: ScrubReport, bad: dict) -> None:
    """Read consecutive chunks `run` at once and compare each with its checksum."""
    cs = md.chunk_size
    space = md.space
    start = int(run[0])
    buf = bytearray(len(run) * cs)
    md.data_fio.preadinto(buf, start * cs)
    rep.bytes_read += len(buf)
    view = memoryview(buf)
    for c in run.tolist():
        want = int(space.sums.arr[c])
        if not want or space.state[c] & ST_WRITTEN or not space.refs.arr[c]:
            rep.skipped += 1
            continue
        got = chunk_sum(view[(c - start) * cs:(c - start + 1) * cs])
        rep.verified += 1
        if got != want:
            bad[c] = (want, got)


def _batches(ids: np.ndarray, per: int):
    """Runs of consecutive ids, each at most `per` long."""
    if not len(ids):
        return
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    for run in np.split(ids, breaks):
        for i in range(0, len(run), per):
            yield run[i:i + per]
