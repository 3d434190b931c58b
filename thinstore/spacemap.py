"""Data chunk space map: reference counts, transaction state and allocation.

Invariants:
- chunk 0 is never allocated (a map entry of 0 means "unmapped");
- a chunk is free when its refcount is 0 and it is not PENDING_FREE;
- a chunk whose refcount fell in the open transaction is PENDING_FREE (at 0) or PINNED
  (above 0) until commit: the committed maps may still point at it, so it must be
  neither reused nor written in place before the commit that lets it go (DESIGN §3).
Refcounts persist as a PagedArray; the state flags live only in memory.
"""

from __future__ import annotations

import logging

import numpy as np

from .kernels import ST_PENDING_FREE, ST_PINNED, ST_REF_CHANGED, ST_WRITTEN
from .paged import PagedArray

log = logging.getLogger("thinstore")

_WINDOW = 1 << 16


class SpaceMap:
    def __init__(self, refcounts: PagedArray, checksums: PagedArray):
        self.refs = refcounts
        self.sums = checksums
        refcounts.exact_marks = checksums.exact_marks = False   # marked at commit_prepare
        self.state = np.zeros(len(refcounts), dtype=np.uint8)
        # [cursor, preallocated lo, hi): an array, as the fast write kernel moves it too
        # (kernels.prealloc: the data file is kept allocated a little ahead)
        self.cursor_arr = np.array([1, -1, -1], dtype=np.int64)
        self._touched: np.ndarray | None = None

    def freeze(self) -> None:
        """Scan the state array once for a whole commit: every flagged() until thaw()
        filters that list (a commit asked four times, each a pass over a state array
        of the pool's capacity: 256 MiB at 16 TiB). Only while nothing else changes
        the state, i.e. under the pool's exclusive lock."""
        self._touched = None
        self._touched = self.flagged(0xFF)

    def thaw(self) -> None:
        self._touched = None

    @property
    def cursor(self) -> int:
        """Where the next allocation starts looking (allocations rotate through the pool)."""
        return int(self.cursor_arr[0])

    @cursor.setter
    def cursor(self, value: int) -> None:
        self.cursor_arr[0] = value

    @property
    def capacity(self) -> int:
        """Usable chunks (chunk 0 excluded)."""
        return len(self.refs.arr) - 1

    def used(self) -> int:
        return int(np.count_nonzero(self.refs.arr[1:]))

    def pending(self) -> int:
        return len(self.flagged(ST_PENDING_FREE))

    def flagged(self, flag: int) -> np.ndarray:
        """Chunk ids whose state has `flag`, sorted. The state array is scanned as
        64-bit words (a transaction touches few chunks, and a scan byte by byte with a
        temporary of the pool's size cost 80 ms per call on a 4 TiB pool)."""
        state = self.state
        if self._touched is not None:       # inside a commit: scanned once (freeze)
            ids = self._touched
            return ids[(state[ids] & flag) != 0]
        n8 = len(state) // 8 * 8
        words = np.flatnonzero(state[:n8].view(np.uint64))
        ids = (words[:, None] * 8 + np.arange(8)).ravel()
        ids = np.concatenate([ids, np.arange(n8, len(state))])
        return ids[(state[ids] & flag) != 0]

    def free(self) -> int:
        return self.capacity - self.used() - self.pending()

    def allocate(self, n: int) -> np.ndarray | None:
        """n free chunk ids, or None when fewer than n are free. Nothing is changed."""
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        found, total = [], 0
        size = len(self.refs.arr)
        for lo, hi in ((self.cursor, size), (1, self.cursor)):
            pos, window = lo, max(256, 2 * n)     # small first: the cursor is usually at free space
            while pos < hi and total < n:
                end = min(pos + window, hi)
                win = np.flatnonzero((self.refs.arr[pos:end] == 0) &
                                     ((self.state[pos:end] & ST_PENDING_FREE) == 0))
                take = win[:n - total] + pos
                found.append(take)
                total += len(take)
                pos, window = end, min(window * 4, _WINDOW)
        if total < n:
            return None
        ids = np.concatenate(found).astype(np.int64)
        self.cursor = int(ids[-1]) + 1 if ids[-1] + 1 < size else 1
        return ids

    def commit_prepare(self) -> None:
        """Mark the refcount leaves that changed in this transaction dirty."""
        self.refs.mark(self.flagged(ST_REF_CHANGED))

    def commit_done(self, data_fio, chunk_shift: int, defer=None) -> int:
        """After the commit is durable: free pending chunks and clear state. The freed
        chunks' bytes go back to the file system by a hole punch: handed to `defer`
        (the pool's background reclaim, reclaim.py) when given, else punched here."""
        touched = self.flagged(0xFF)
        freed = touched[(self.state[touched] & ST_PENDING_FREE) != 0]
        self.state[touched] = 0
        if defer is not None and getattr(data_fio, "punch_unit", 0) <= (1 << chunk_shift):
            defer(freed)
            return len(freed)
        # a store that frees whole objects (RADOS) punches here: its objects go at once
        freed = self._punch_whole_units(freed, data_fio, chunk_shift)
        for start, count in _runs(freed):
            data_fio.punch(start << chunk_shift, count << chunk_shift)
        return len(freed)

    def _punch_whole_units(self, freed, data_fio, chunk_shift: int):
        """Where the file frees space in units of several chunks (a RADOS object:
        ``punch_unit`` bytes), punch each unit the freed chunks leave wholly free as one
        (the object is removed rather than zeroed piecemeal and kept). Returns the freed
        chunks still to punch."""
        unit = getattr(data_fio, "punch_unit", 0) >> chunk_shift
        if unit <= 1 or not len(freed):
            return freed
        refs = self.refs.arr
        whole = [int(u) for u in np.unique(freed // unit)
                 if not refs[u * unit:(u + 1) * unit].any()]
        for u in whole:
            data_fio.punch((u * unit) << chunk_shift, unit << chunk_shift)
        return freed[~np.isin(freed // unit, whole)]

    def written(self) -> np.ndarray:
        return self.flagged(ST_WRITTEN)

    def resize(self, nchunks: int) -> None:
        self.refs.resize(nchunks)
        self.sums.resize(nchunks)
        state = np.zeros(nchunks, dtype=np.uint8)
        n = min(nchunks, len(self.state))
        state[:n] = self.state[:n]
        self.state = state


def _runs(ids: np.ndarray):
    """Yield (start, count) for runs of consecutive ids."""
    if not len(ids):
        return
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    for run in np.split(ids, breaks):
        yield int(run[0]), len(run)


__all__ = ["SpaceMap", "ST_PENDING_FREE", "ST_PINNED", "ST_WRITTEN"]
