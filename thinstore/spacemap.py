"""Data chunk space map: reference counts, transaction state and allocation.

Invariants:
- chunk 0 is never allocated (a map entry of 0 means "unmapped");
- a chunk is free when its refcount is 0 and it is not PENDING_FREE;
- a chunk whose refcount fell in the open transaction is PENDING_FREE (at 0) or PINNED
  (above 0) until commit: the committed maps may still point at it, so it must be
  neither reused nor written in place before the commit that lets it go (DESIGN §3).
Refcounts persist as a PagedArray; the state flags live only in memory.

Nothing on the commit path costs what the pool's capacity does: beside the state
flags (a byte per chunk: 256 MiB at 16 TiB of 64 KiB chunks) a *summary* keeps one
byte per window of 4096 chunks, set with every flag (kernels.mark and the native
kernels), so that flagged() reads the summary and the flagged windows only; and
used() is a count kept per window, recounted for the windows the summary names.
"""

from __future__ import annotations

import logging

import numpy as np

from . import kernels
from .kernels import SUMMARY_SHIFT, ST_PENDING_FREE, ST_PINNED, ST_REF_CHANGED, ST_WRITTEN
from .paged import PagedArray

log = logging.getLogger("thinstore")

_WINDOW = 1 << 16
_SUM_W = 1 << SUMMARY_SHIFT       # chunks per summary byte


class SpaceMap:
    def __init__(self, refcounts: PagedArray, checksums: PagedArray):
        self.refs = refcounts
        self.sums = checksums
        refcounts.exact_marks = checksums.exact_marks = False   # marked at commit_prepare
        self._new_state(len(refcounts))
        # [cursor, preallocated lo, hi): an array, as the fast write kernel moves it too
        # (kernels.prealloc: the data file is kept allocated a little ahead)
        self.cursor_arr = np.array([1, -1, -1], dtype=np.int64)
        self._touched: np.ndarray | None = None
        self._counted = None      # the refs array _wcount was counted from
        self._wcount = np.zeros(0, dtype=np.int64)
        self._used = 0

    def _new_state(self, n: int) -> None:
        """Zeroed state for n chunks: `state` is a view of a buffer padded to whole
        windows (so windows reshape), `summary` one byte per window."""
        windows = kernels.summary_len(n)
        self._state_buf = np.zeros(windows * _SUM_W, dtype=np.uint8)
        self.state = self._state_buf[:n]
        self.summary = np.zeros(windows, dtype=np.uint8)

    def mark(self, ids, flags: int) -> None:
        """Set state flags on chunk ids (int or array), summary included."""
        kernels.mark(self.state, self.summary, np.asarray(ids, dtype=np.int64), flags)

    def ref_batch(self, ids, delta: int) -> None:
        """Refcounts of ids +-1 each, with the flag rules (K.ref_batch)."""
        from .native import K
        K.ref_batch(self.refs.arr, self.state, self.summary, np.asarray(ids, dtype=np.uint64),
                    delta)

    def shadow_page(self, pages, src: int, dst: int) -> None:
        """Map page src copied to dst; its chunks gain a reference (K.shadow_page)."""
        from .native import K
        K.shadow_page(pages, src, dst, self.refs.arr, self.state, self.summary)

    def freeze(self) -> None:
        """Find the flagged chunks once for a whole commit: every flagged() until thaw()
        filters that list (a commit asks four times). Only while nothing else changes
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
        """Chunks with a reference (exact): the per-window counts, recounted for the
        windows whose chunks changed since the last commit (their summary is set)."""
        self._recount(np.flatnonzero(self.summary))
        return self._used

    def recount(self, ids=None) -> None:
        """Count the windows of chunk ids again (every window: ids None) after their
        refcounts were set other than through the kernels (repair)."""
        if ids is None:
            self._counted = None
        elif self._counted is self.refs.arr:
            self._recount(np.unique(np.asarray(ids, dtype=np.int64) >> SUMMARY_SHIFT))

    def _recount(self, windows: np.ndarray) -> None:
        refs = self.refs.arr
        if self._counted is not refs:             # new or replaced array: count it all
            self._count_all()
            return
        wcount = self._wcount
        for w in windows.tolist():
            k = int(np.count_nonzero(refs[w * _SUM_W:(w + 1) * _SUM_W]))
            if w == 0 and refs[0]:
                k -= 1
            self._used += k - int(wcount[w])
            wcount[w] = k

    def _count_all(self) -> None:
        """Per-window counts from the chunks with a nonzero refcount: those of the
        refcount leaves that hold any (PagedArray.nonzero_slots: costs what is
        mapped, not the capacity) and those this transaction changed (not marked
        in their leaves before the commit)."""
        refs = self.refs.arr
        ids = self.refs.nonzero_slots()
        changed = self.flagged(ST_REF_CHANGED)
        if len(changed):
            ids = np.union1d(ids, changed[refs[changed] != 0])
        ids = ids[ids != 0]                       # chunk 0 is never a data chunk
        counts = np.bincount(ids >> SUMMARY_SHIFT, minlength=kernels.summary_len(len(refs)))
        self._wcount, self._used, self._counted = counts.astype(np.int64), len(ids), refs

    def pending(self) -> int:
        return len(self.flagged(ST_PENDING_FREE))

    def flagged(self, flag: int) -> np.ndarray:
        """Chunk ids whose state has `flag`, sorted. Only the windows the summary
        names are read: a transaction touches few, and the state array is the
        pool's capacity (256 MiB at 16 TiB)."""
        state = self.state
        if self._touched is not None:       # inside a commit: found once (freeze)
            ids = self._touched
            return ids[(state[ids] & flag) != 0]
        windows = np.flatnonzero(self.summary)
        if not len(windows):
            return np.zeros(0, dtype=np.int64)
        block = self._state_buf.reshape(-1, _SUM_W)[windows]
        row, col = np.nonzero(block & flag)
        return windows[row] * _SUM_W + col

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
        windows = np.flatnonzero(self.summary)
        self._recount(windows)                # the counts must be right once it clears
        self.state[touched] = 0
        # a window stays flagged only if a chunk outside `touched` still has a flag
        self.summary[windows] = self._state_buf.reshape(-1, _SUM_W)[windows].any(axis=1)
        if defer is not None:      # the background reclaim, whole objects too (reclaim.py)
            defer(freed)
            return len(freed)
        freed = self._punch_whole_units(freed, data_fio, chunk_shift)
        for start, count in id_runs(freed):
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
        old = self.state
        self._new_state(nchunks)
        n = min(nchunks, len(old))
        self.state[:n] = old[:n]
        self.summary[:] = self._state_buf.reshape(-1, _SUM_W).any(axis=1)
        self._counted = None


def id_runs(ids):
    """(start, count) of each run of consecutive ids in sorted `ids` (chunk ids: the
    space map's, the checksums', the reclaimer's and the presync's batches)."""
    ids = np.asarray(ids, dtype=np.int64)
    if not len(ids):
        return
    breaks = np.flatnonzero(np.diff(ids) != 1) + 1
    for run in np.split(ids, breaks):
        yield int(run[0]), len(run)


__all__ = ["SpaceMap", "ST_PENDING_FREE", "ST_PINNED", "ST_WRITTEN"]
