"""Changed chunks between two devices, found by walking their directories.

Snapshots and clones share map pages copy-on-write and a shared page is never changed
in place, so two directory slots holding the same page id map the same 508 virtual
chunks to the same data chunks: that slot is skipped without reading a single entry.
Only slots whose page ids differ are compared entry by entry, and there equal data
chunk ids mean equal bytes (a chunk referenced twice is shared, hence copied before any
write).  A diff therefore costs what changed, not the size of the devices.

The result is conservative at chunk granularity: a chunk rewritten with the bytes it
already held is reported as changed; a chunk whose bytes differ is never missed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np

FANOUT = 508  # entries per map page (docs: kernels contract)

PageRows = Callable[[np.ndarray], np.ndarray]  # page ids (k,) -> entries (k, FANOUT)


class DiffRange(NamedTuple):
    """Bytes [offset, offset+length) differ; a_mapped/b_mapped say which side has data."""

    offset: int
    length: int
    a_mapped: bool
    b_mapped: bool

    def to_dict(self) -> dict:
        side = {True: "data", False: "hole"}
        return {"offset": self.offset, "length": self.length,
                "a": side[self.a_mapped], "b": side[self.b_mapped]}


@dataclass
class DiffCounters:
    """What a diff touched; tests assert on these to hold the cost claim."""

    slots: int = 0  # directory slots looked at (vectorised: no entries read)
    pages_skipped: int = 0  # slots where both devices hold the same page (nonzero)
    pages_compared: int = 0  # slots whose entries were read and compared
    chunks_changed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class DeviceMap:
    """A device's map as the diff needs it: size, directory, and a way to read pages."""

    size: int
    chunk_size: int
    dirarr: np.ndarray  # uint64 page id per FANOUT virtual chunks, 0 = no page
    rows: PageRows


def diff_maps(a: DeviceMap, b: DeviceMap | None,
              counters: DiffCounters | None = None) -> list[DiffRange]:
    """Byte ranges where a and b differ (b None: everything mapped in a).

    Devices of different sizes are compared over the larger size; past its end a device
    counts as unmapped.  Ranges are ascending, coalesced, clipped to the larger size.
    """
    counters = counters if counters is not None else DiffCounters()
    dir_a, dir_b = _padded(a.dirarr, b.dirarr if b else np.zeros(0, np.uint64))
    counters.slots += len(dir_a)
    differ = dir_a != dir_b
    counters.pages_skipped += int(np.count_nonzero(~differ & (dir_a != 0)))
    slots = np.flatnonzero(differ)
    counters.pages_compared += len(slots)
    chunks, in_a, in_b = _changed_chunks(slots, dir_a, dir_b, a.rows, b.rows if b else None)
    counters.chunks_changed += len(chunks)
    size = max(a.size, b.size if b else 0)
    return _ranges(chunks, in_a, in_b, a.chunk_size, size)


def _padded(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = max(len(x), len(y))
    return _pad(x, n), _pad(y, n)


def _pad(x: np.ndarray, n: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.uint64)
    if len(x) == n:
        return x
    out = np.zeros(n, np.uint64)
    out[:len(x)] = x
    return out


def _entries(slots, dirarr, rows) -> np.ndarray:
    """Entries of the pages at these slots; zeros where a slot has no page."""
    ids = dirarr[slots]
    out = np.zeros((len(slots), FANOUT), np.uint64)
    have = ids != 0
    if rows is not None and have.any():
        out[have] = rows(ids[have])
    return out


def _changed_chunks(slots, dir_a, dir_b, rows_a, rows_b):
    """(virtual chunk numbers, mapped in a, mapped in b) of entries that differ."""
    ea = _entries(slots, dir_a, rows_a)
    eb = _entries(slots, dir_b, rows_b)
    row, col = np.nonzero(ea != eb)
    chunks = slots[row].astype(np.int64) * FANOUT + col
    return chunks, ea[row, col] != 0, eb[row, col] != 0


def _ranges(chunks, in_a, in_b, chunk_size, size) -> list[DiffRange]:
    """Coalesce consecutive chunks with the same (a, b) state into byte ranges."""
    if len(chunks) == 0:
        return []
    state = in_a.astype(np.int8) * 2 + in_b
    breaks = np.flatnonzero((np.diff(chunks) != 1) | (np.diff(state) != 0)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(chunks)]))
    out = []
    for s, e in zip(starts.tolist(), ends.tolist()):
        lo = int(chunks[s]) * chunk_size
        hi = min((int(chunks[e - 1]) + 1) * chunk_size, size)
        if hi > lo:
            out.append(DiffRange(lo, hi - lo, bool(in_a[s]), bool(in_b[s])))
    return out
