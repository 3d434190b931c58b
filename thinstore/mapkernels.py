"""Pure-Python twins of the array kernels: block-map translation, reference counts,
chunk flags and data-file reads and copies.

Each of these takes the arrays and the file it works on one by one (shapes in
thinstore/kernels.py's docstring; the contract in _native/thinstore_native.h), and
none knows of a request, a lane or the pool's state as a whole: those are the request
kernels of thinstore/kernels.py, built on these. The storage core reaches both through
``K`` (thinstore/native.py) and the names of thinstore.kernels, which re-exports
everything public here; `chunk_span`, `entries` and `needs_new` are public only for
the request kernels' sake.
"""

from __future__ import annotations

import numpy as np

from .format import FANOUT

ST_PENDING_FREE = 1   # refcount fell to 0 in the open transaction: not reusable before commit
ST_PINNED = 2         # refcount fell but not to 0: the committed state may still share it
ST_WRITTEN = 4        # data written since the last commit
ST_REF_CHANGED = 8    # refcount changed since the last commit
ST_REHASH = 16        # written since DataSums.prehash cleared it (after the bytes landed)

SHARED_STATE = ST_PINNED   # a mapped chunk with these flags is shared: copy on write
SUMMARY_SHIFT = 12    # chunk_summary: one byte per 4096 chunks (TS_SUMMARY_SHIFT)


def summary_len(n_chunks: int) -> int:
    """Bytes of chunk_summary for a space map of n_chunks chunks."""
    return (n_chunks + (1 << SUMMARY_SHIFT) - 1) >> SUMMARY_SHIFT


def mark(chunk_state, chunk_summary, ids, flags: int) -> None:
    """Set flags on chunks ids (an int or an id array) and their summary bytes: the
    only way a flag is set, so a scan of the summary finds every flagged chunk."""
    chunk_state[ids] |= flags
    chunk_summary[np.right_shift(ids, SUMMARY_SHIFT)] = 1


def chunk_span(chunk_shift: int, offset: int, length: int) -> tuple[int, int]:
    first = offset >> chunk_shift
    last = (offset + length - 1) >> chunk_shift
    return first, last


def entries(dirarr, pages, first: int, last: int) -> np.ndarray:
    """Data chunk ids of virtual chunks first..last (a copy)."""
    v = np.arange(first, last + 1, dtype=np.int64)
    pids = dirarr[v // FANOUT].astype(np.int64)
    out = pages[pids, v % FANOUT].copy()
    out[pids == 0] = 0
    return out


def translate(dirarr, pages, chunk_shift, offset, length, out) -> int:
    """Turn a byte range into coalesced extents (virt_offset, length, data_offset|-1)."""
    if length <= 0:
        return 0
    first, last = chunk_span(chunk_shift, offset, length)
    ents = entries(dirarr, pages, first, last)
    n = 0
    pos, end = offset, offset + length
    for i, c in enumerate(ents.tolist()):
        v = first + i
        lo = max(pos, v << chunk_shift)
        hi = min(end, (v + 1) << chunk_shift)
        doff = -1 if c == 0 else (c << chunk_shift) + (lo - (v << chunk_shift))
        if n and _joins(out[n - 1], lo, doff):
            out[n - 1, 1] += hi - lo
        else:
            out[n] = (lo, hi - lo, doff)
            n += 1
        pos = hi
    return n


def _joins(prev, lo: int, doff: int) -> bool:
    if prev[2] == -1 or doff == -1:
        return prev[2] == -1 and doff == -1
    return prev[2] + prev[1] == doff


def needs_new(c: int, chunk_ref, chunk_state) -> bool:
    return c == 0 or chunk_ref[c] > 1 or bool(chunk_state[c] & SHARED_STATE)


def shadow_page(pages, src, dst, chunk_ref, chunk_state, chunk_summary) -> None:
    """Copy page src to dst and give every chunk it names one more reference."""
    pages[dst] = pages[src]
    ids = pages[dst][pages[dst] != 0]
    ref_batch(chunk_ref, chunk_state, chunk_summary, ids, +1)


def ref_batch(chunk_ref, chunk_state, chunk_summary, ids, delta) -> None:
    """Add delta (+1/-1) to the refcount of every id (repeats count; zeros ignored)."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[ids != 0]
    if not len(ids):
        return
    uniq, counts = np.unique(ids, return_counts=True)
    if delta > 0:
        chunk_ref[uniq] += counts.astype(chunk_ref.dtype)
        mark(chunk_state, chunk_summary, uniq, ST_REF_CHANGED)
        return
    if np.any(chunk_ref[uniq] < counts):
        raise ValueError("reference count would drop below zero")
    chunk_ref[uniq] -= counts.astype(chunk_ref.dtype)
    zero = chunk_ref[uniq] == 0
    mark(chunk_state, chunk_summary, uniq[zero], ST_PENDING_FREE | ST_REF_CHANGED)
    mark(chunk_state, chunk_summary, uniq[~zero], ST_PINNED | ST_REF_CHANGED)


def state_clear(chunk_state, ids, flags: int) -> None:
    """Clear `flags` on chunks `ids` (ids past the array skipped); the twin of
    ts_state_clear (there, atomic against kernels running without the GIL)."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < len(chunk_state))]
    chunk_state[ids] &= np.uint8(~flags & 0xFF)


def read_range(dirarr, pages, chunk_shift, fio, buf, offset, length) -> None:
    """Fill buf with the range: zeros for holes, file bytes for mapped extents."""
    if length <= 0:
        return
    out = np.empty(((length >> chunk_shift) + 2, 3), dtype=np.int64)
    n = translate(dirarr, pages, chunk_shift, offset, length, out)
    read_extents(fio, buf, offset, out[:n].tolist())


def read_extents(fio, buf, offset, extents) -> None:
    """Fill buf from translated extents (virtual offset, length, data offset or -1).
    A file that reads many ranges at once (``preadinto_many``: RADOS, all in flight
    together) gets them in one call."""
    view = memoryview(buf).cast("B")
    parts = []
    for voff, ln, doff in extents:
        part = view[voff - offset:voff - offset + ln]
        if doff < 0:
            part[:] = bytes(ln)
        else:
            parts.append((part, doff))
    many = getattr(fio, "preadinto_many", None)
    if many is not None:
        many(parts)
        return
    for part, doff in parts:
        fio.preadinto(part, doff)


def cow_copy(fio, src_off, dst_off, length) -> None:
    """Copy bytes inside the data file (reflink where the file system can)."""
    fio.copy(src_off, dst_off, length)


def is_zero(buf) -> bool:
    """True when every byte of buf is zero."""
    arr = np.frombuffer(buf, dtype=np.uint8)
    return not arr.any()


def count_mapped(dirarr, pages, chunk_ref, page_ref) -> tuple[int, int]:
    """(mapped chunks, chunks mapped by this device alone) of one directory."""
    pids = dirarr[dirarr != 0].astype(np.int64)
    if not len(pids):
        return 0, 0
    rows = pages[pids]
    mask = rows != 0
    used = int(np.count_nonzero(mask))
    solo = (page_ref[pids] == 1)[:, None] & mask
    excl = int(np.count_nonzero(chunk_ref[rows[solo].astype(np.int64)] == 1))
    return used, excl


def writeback(fio, runs, window: int) -> None:
    """Write the dirty pages of byte ranges `runs` of `fio` out; the twin of
    ts_writeback without its pacing (Python has no sync_file_range): one datasync."""
    fio.datasync()


PREALLOC_BYTES = 4 << 20


def prealloc(fio, chunk_shift, n_chunks, cursor, ids) -> int:
    """Keep the data file allocated ahead of the allocator (ts_prealloc): each id
    outside cursor[1]:cursor[2] gets the next PREALLOC_BYTES preallocated from it,
    which becomes the range (only its own chunk when the file system refuses).
    Returns the number of fallocate calls."""
    calls = 0
    span = max(1, PREALLOC_BYTES >> chunk_shift)
    for c in np.asarray(ids, dtype=np.int64).tolist():
        if not 0 < c < n_chunks or (cursor[1] >= 0 and cursor[1] <= c < cursor[2]):
            continue
        hi = min(c + span, n_chunks)
        calls += 1
        if not fio.preallocate(c << chunk_shift, (hi - c) << chunk_shift):
            hi = c + 1
        cursor[1], cursor[2] = c, hi
    return calls
