"""Pure-Python twins of the native kernels: the reference the C code is tested against.

Each function has the signature of its native wrapper (thinstore/native.py); the
contract is written once in _native/thinstore_native.h. Arrays are numpy and
C-contiguous:

- ``dirarr``   uint64[n_dir]: map page id per FANOUT virtual chunks (0 = no page)
- ``pages``    uint64[cap, FANOUT]: row = page id; entry = data chunk id (0 = unmapped)
- ``chunk_ref`` uint32[n_chunks]: how many map-page entries name the chunk
- ``chunk_state`` uint8[n_chunks]: ST_* flags below
- ``chunk_summary`` uint8[summary_len(n_chunks)]: 1 for a window of 1 << SUMMARY_SHIFT
  chunks in which some chunk has a flag (set with every flag; SpaceMap clears it)
- ``page_dirty`` uint8[cap]: set when a page's entries change

The request kernels (``write``, ``read``, ``unmap_range``, ``count_write_allocs``)
take the pool's state as one object, ``PoolState`` (C: ts_pool), and the device's
as ``Dev`` (C: ts_dev). Invariants the callers keep: pages a general write or unmap
touches are loaded and exclusive (page refcount 1), and ``new_chunks`` holds exactly
the free chunks the call needs.
"""

from __future__ import annotations

import numpy as np

from .format import FANOUT

ST_PENDING_FREE = 1   # refcount fell to 0 in the open transaction: not reusable before commit
ST_PINNED = 2         # refcount fell but not to 0: the committed state may still share it
ST_WRITTEN = 4        # data written since the last commit
ST_REF_CHANGED = 8    # refcount changed since the last commit
ST_REHASH = 16        # written since DataSums.prehash cleared it (after the bytes landed)

_SHARED = ST_PINNED
SUMMARY_SHIFT = 12    # chunk_summary: one byte per 4096 chunks (TS_SUMMARY_SHIFT)


def summary_len(n_chunks: int) -> int:
    """Bytes of chunk_summary for a space map of n_chunks chunks."""
    return (n_chunks + (1 << SUMMARY_SHIFT) - 1) >> SUMMARY_SHIFT


def mark(chunk_state, chunk_summary, ids, flags: int) -> None:
    """Set flags on chunks ids (an int or an id array) and their summary bytes: the
    only way a flag is set, so a scan of the summary finds every flagged chunk."""
    chunk_state[ids] |= flags
    chunk_summary[np.right_shift(ids, SUMMARY_SHIFT)] = 1


def _chunk_span(chunk_shift: int, offset: int, length: int) -> tuple[int, int]:
    first = offset >> chunk_shift
    last = (offset + length - 1) >> chunk_shift
    return first, last


def _entries(dirarr, pages, first: int, last: int) -> np.ndarray:
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
    first, last = _chunk_span(chunk_shift, offset, length)
    ents = _entries(dirarr, pages, first, last)
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


def _needs_new(c: int, chunk_ref, chunk_state) -> bool:
    return c == 0 or chunk_ref[c] > 1 or bool(chunk_state[c] & _SHARED)


def count_write_allocs(ps, dev, offset, length) -> int:
    """How many new chunks a write of the range needs (unmapped or shared chunks)."""
    if length <= 0:
        return 0
    first, last = _chunk_span(ps.chunk_shift, offset, length)
    ents = _entries(dev.dirarr, ps.pages, first, last)
    mapped = ents[ents != 0].astype(np.int64)
    shared = (ps.chunk_ref[mapped] > 1) | ((ps.chunk_state[mapped] & _SHARED) != 0)
    return int(np.count_nonzero(ents == 0) + np.count_nonzero(shared))


def _write_given(ps, dirarr, new_chunks, buf, offset, length) -> None:
    """REQ_GIVEN: write buf to the byte range, allocating or copying-on-write chunks
    from new_chunks as needed; then, checksums on, ST_REHASH on every chunk the range
    maps, even when the write failed part way."""
    if length <= 0:
        return
    try:
        _write_given_run(ps, dirarr, new_chunks, buf, offset, length)
    finally:
        if ps.chunk_sums is not None and len(ps.chunk_sums):
            first, last = _chunk_span(ps.chunk_shift, offset, length)
            ents = _entries(dirarr, ps.pages, first, last)
            ents = ents[(ents != 0) & (ents < len(ps.chunk_state))].astype(np.int64)
            mark(ps.chunk_state, ps.chunk_summary, ents, ST_REHASH)


def writeback(fio, runs, window: int) -> None:
    """Write the dirty pages of byte ranges `runs` of `fio` out; the twin of
    ts_writeback without its pacing (Python has no sync_file_range): one datasync."""
    fio.datasync()


def state_clear(chunk_state, ids, flags: int) -> None:
    """Clear `flags` on chunks `ids` (ids past the array skipped); the twin of
    ts_state_clear (there, atomic against kernels running without the GIL)."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[(ids >= 0) & (ids < len(chunk_state))]
    chunk_state[ids] &= np.uint8(~flags & 0xFF)


def _write_given_run(ps, dirarr, new_chunks, buf, offset, length) -> None:
    chunk_shift, fio = ps.chunk_shift, ps.fio
    cs = 1 << chunk_shift
    data = memoryview(buf).cast("B")
    first, last = _chunk_span(chunk_shift, offset, length)
    fresh = iter(np.asarray(new_chunks, dtype=np.int64).tolist())
    run_off, run_start = None, 0     # pending contiguous pwrite: data offset, buf start
    pos, end = offset, offset + length
    for v in range(first, last + 1):
        base = v << chunk_shift
        lo, hi = max(pos, base) - base, min(end, base + cs) - base
        pid, slot = int(dirarr[v // FANOUT]), v % FANOUT
        c = int(ps.pages[pid, slot])
        bstart = base + lo - offset
        if _needs_new(c, ps.chunk_ref, ps.chunk_state):
            c, written = _place_chunk(ps, pid, slot, c, next(fresh), lo, hi,
                                      data[bstart:bstart + hi - lo])
            if written:                 # the piece went out with the copied bytes
                if run_off is not None:
                    fio.pwrite(data[run_start:bstart], run_off)
                    run_off = None
                pos = base + hi
                continue
        mark(ps.chunk_state, ps.chunk_summary, c, ST_WRITTEN)
        doff = (c << chunk_shift) + lo
        if run_off is not None and run_off + (bstart - run_start) != doff:
            fio.pwrite(data[run_start:bstart], run_off)
            run_off = None
        if run_off is None:
            run_off, run_start = doff, bstart
        pos = base + hi
    if run_off is not None:
        fio.pwrite(data[run_start:length], run_off)
    ps.counters[3] += length


def _place_chunk(ps, pid, slot, old, new, lo, hi, piece) -> tuple[int, bool]:
    """Map a new chunk at (pid, slot) whose uncovered parts hold the old bytes or zeros.
    Returns (new, written): written when the write's piece for [lo, hi) went out too
    (a copy on write where blocks cannot be shared writes the new chunk whole)."""
    fio, counters = ps.fio, ps.counters
    cs = 1 << ps.chunk_shift
    dst = new << ps.chunk_shift
    written = False
    if old == 0:
        fio.punch(dst, lo)
        fio.punch(dst + hi, cs - hi)
        counters[0] += 1
    else:
        src = old << ps.chunk_shift
        if lo > 0 or hi < cs:        # the first part with a whole block tells a reflink fs
            if fio.copy_shared(src, dst, lo):
                fio.copy(src + hi, dst + hi, cs - hi)
            elif fio.copy_shared(src + hi, dst + hi, cs - hi):
                if lo:
                    fio.pwrite(fio.pread(lo, src), dst)
            else:
                whole = bytearray(fio.pread(cs, src))
                whole[lo:hi] = piece
                fio.pwrite(whole, dst)
                written = True
        ref_batch(ps.chunk_ref, ps.chunk_state, ps.chunk_summary, [old], -1)
        counters[0] += 1
        counters[1] += 1
        counters[2] += lo + cs - hi
    ps.chunk_ref[new] = 1
    ps.chunk_state[new] = 0
    mark(ps.chunk_state, ps.chunk_summary, new, ST_REF_CHANGED | (ST_WRITTEN if written else 0))
    ps.pages[pid, slot] = new
    ps.page_dirty[pid] = 1
    return new, written


def unmap_range(ps, dev, first_chunk, n_chunks) -> int:
    """Unmap whole virtual chunks of dev; their data chunks lose one reference each."""
    if n_chunks <= 0:
        return 0
    dirarr, pages = dev.dirarr, ps.pages
    v = np.arange(first_chunk, first_chunk + n_chunks, dtype=np.int64)
    pids = dirarr[v // FANOUT].astype(np.int64)
    keep = pids != 0
    v, pids = v[keep], pids[keep]
    slots = v % FANOUT
    ents = pages[pids, slots]
    hit = ents != 0
    if not hit.any():
        return 0
    ref_batch(ps.chunk_ref, ps.chunk_state, ps.chunk_summary, ents[hit], -1)
    pages[pids[hit], slots[hit]] = 0
    ps.page_dirty[np.unique(pids[hit])] = 1
    return int(np.count_nonzero(hit))


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


SLOW = -1                 # write: "take the general path"; nothing was changed
FAST_MAX_CHUNKS = 64
_FAST_SCAN_MAX = 65536
REQ_GIVEN, REQ_LOCKED, REQ_LANE = 0, 1, 2     # write's modes (TS_REQ_*)


def write(ps, dev, buf, offset: int, length: int, mode: int, new_chunks=None) -> int:
    """The one write entry (ts_write): buf at offset of dev.

    REQ_GIVEN: the general path; the caller made the pages exclusive and passes the
    new chunks the write needs (``new_chunks``, in order). Returns 0.
    REQ_LOCKED: the common case whole: checks, allocation, write intent, the write.
    Returns the number of chunks allocated (holes and shared chunks in range: first
    writes and copies on write), or SLOW (nothing changed) when a page is missing,
    unloaded or shared, the request spans more than FAST_MAX_CHUNKS chunks, buf is
    all zeros, free chunks run short within the scan, or a chunk needing write
    intent lies in an unmarked region.
    REQ_LANE: REQ_LOCKED as the lane does it without the lock: SLOW also unless the
    lane is open for writes and empty, dev writable, the range inside it and the
    chunks to allocate within ps.budget; otherwise REQ_LOCKED's result, with
    ps.wrote set and the chunks allocated taken off ps.budget.
    """
    if mode == REQ_GIVEN:
        _write_given(ps, dev.dirarr, np.zeros(0, np.int64) if new_chunks is None else new_chunks,
                     buf, offset, length)
        return 0
    if mode == REQ_LOCKED:
        return _write_checked(ps, dev, buf, offset, length, None)
    if mode != REQ_LANE:
        raise ValueError(f"write: unknown mode {mode}")
    if (not dev.writable or length <= 0 or offset < 0 or offset + length > dev.size
            or ps.closers or ps.gate or not (ps.open and ps.writes)):
        return SLOW
    rc = _write_checked(ps, dev, buf, offset, length, max(ps.budget, 0))
    if rc != SLOW:
        ps.wrote = 1
        ps.budget -= rc
    return rc


def _write_checked(ps, dev, buf, offset, length, max_need) -> int:
    """REQ_LOCKED, also SLOW when the write needs more than max_need (not None) chunks."""
    if length == 0:
        return SLOW
    first, last = _chunk_span(ps.chunk_shift, offset, length)
    if last - first >= FAST_MAX_CHUNKS or is_zero(memoryview(buf)[:length]):
        return SLOW
    need, hot = 0, []
    sums, bits = ps.chunk_sums, ps.intent_bits
    for v in range(first, last + 1):
        c = _fast_entry(ps, dev.dirarr, v)
        if c is None:
            return SLOW
        need += _needs_new(c, ps.chunk_ref, ps.chunk_state)
        if c and len(sums) and (c >= len(sums) or sums[c] and not ps.chunk_state[c] & ST_WRITTEN):
            r = c >> ps.intent_shift
            if c >= len(sums) or r >= len(bits) or not bits[r]:
                return SLOW
            hot.append(r)
    if max_need is not None and need > max_need:
        return SLOW
    fresh = _fast_allocate(ps.chunk_ref, ps.chunk_state, ps.cursor, need)
    if fresh is None:
        return SLOW
    prealloc(ps.fio, ps.chunk_shift, len(ps.chunk_ref), ps.cursor, fresh)
    ps.intent_hot[hot] = True
    _write_given(ps, dev.dirarr, fresh, buf, offset, length)
    return need


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


def _fast_entry(ps, dirarr, v: int):
    """Chunk id of virtual chunk v (0: a hole) when its page exists, is loaded and
    exclusive, else None."""
    d = v // FANOUT
    if d >= len(dirarr):
        return None
    pid = int(dirarr[d])
    if pid == 0 or pid >= len(ps.pages) or ps.page_ref[pid] != 1 or not ps.page_loaded[pid]:
        return None
    c = int(ps.pages[pid, v % FANOUT])
    return c if 0 <= c < len(ps.chunk_ref) else None


def _fast_allocate(chunk_ref, chunk_state, cursor, need: int):
    """`need` free chunk ids in SpaceMap.allocate's order (cursor up, then from 1),
    looking at most _FAST_SCAN_MAX ids; None if too few. Advances cursor[0]."""
    if need == 0:
        return np.zeros(0, dtype=np.int64)
    n = len(chunk_ref)
    start = int(cursor[0]) if 1 <= cursor[0] < n else 1
    up = np.arange(start, min(n, start + _FAST_SCAN_MAX))
    ids = np.concatenate([up, np.arange(1, min(start, 1 + _FAST_SCAN_MAX - len(up)))])
    free = ids[(chunk_ref[ids] == 0) & ((chunk_state[ids] & ST_PENDING_FREE) == 0)][:need]
    if len(free) < need:
        return None
    cursor[0] = free[-1] + 1 if free[-1] + 1 < n else 1
    return free.astype(np.int64)


# ---- the pool's state (ts_pool, ts_dev in the header) ------------------------

GATE_READER, GATE_WRITER, GATE_SHARED, GATE_EXCLUSIVE = 1, 1 << 24, 1 << 32, 1 << 48


class PoolState:
    """The pool's state as the request kernels take it (C: ts_pool): the arrays,
    named as in ts_pool (``fio`` stands where C has ``fd``; page_loaded and
    chunk_verified are bool arrays, chunk_verified, chunk_sums, intent_bits and
    intent_hot empty when checksums are off), and the lane's scalars. ``gate``,
    ``closers`` and ``excl_closers`` are the C side's synchronisation; the twin
    only reads them. ``c`` is the native struct bound to this object (native.py),
    or None: a bound object's scalars live in C."""

    ARRAYS = ("pages", "page_ref", "page_dirty", "page_loaded", "chunk_ref", "chunk_state",
              "chunk_summary", "chunk_sums", "chunk_verified", "intent_bits", "intent_hot",
              "cursor", "counters")

    def __init__(self, fio=None, chunk_shift: int = 0, intent_shift: int = 0, **arrays):
        for name in self.ARRAYS:
            setattr(self, name, arrays.pop(name, None))
        if arrays:
            raise TypeError(f"PoolState: unknown arrays {sorted(arrays)}")
        self.fio, self.chunk_shift, self.intent_shift = fio, chunk_shift, intent_shift
        self.open = self.writes = self.budget = self.wrote = self.gate = 0
        self.closers = self.excl_closers = 0
        self.c = None


class Dev:
    """A device as the request kernels take it (C: ts_dev): its directory, size and
    whether a lane write may write it."""

    def __init__(self, dirarr, size: int, writable: bool):
        self.dirarr, self.size, self.writable = dirarr, size, int(writable)
        self.c = None


def read(ps: PoolState, dev: Dev, buf, offset: int, length: int, mode: int) -> int:
    """The one read entry (ts_read): the range of dev into buf; 0 when read.
    REQ_LOCKED (under the pool lock): read_range over dev's directory.
    REQ_LANE: the same, but SLOW (buf untouched) unless the lane is open with no
    lane writer or exclusive lock holder inside or closing, the range inside the
    device and spanning at most FAST_MAX_CHUNKS chunks, its map pages in memory,
    and no chunk in it waiting for its checksum to be checked."""
    if mode == REQ_LOCKED:
        read_range(dev.dirarr, ps.pages, ps.chunk_shift, ps.fio, buf, offset, length)
        return 0
    if mode != REQ_LANE:
        raise ValueError(f"read: unknown mode {mode}")
    if length <= 0 or offset < 0 or offset + length > dev.size:
        return SLOW
    first, last = _chunk_span(ps.chunk_shift, offset, length)
    if (last - first >= FAST_MAX_CHUNKS or ps.excl_closers
            or ps.gate & (GATE_WRITER | GATE_EXCLUSIVE)
            or not ps.open or not _lane_readable(ps, dev, first, last)):
        return SLOW
    read_range(dev.dirarr, ps.pages, ps.chunk_shift, ps.fio, buf, offset, length)
    return 0


def _lane_readable(ps: PoolState, dev: Dev, first: int, last: int) -> bool:
    n_sums = len(ps.chunk_sums)
    for v in range(first, last + 1):
        d = v // FANOUT
        if d >= len(dev.dirarr):
            return False
        pid = int(dev.dirarr[d])
        if pid == 0:
            continue
        if pid >= len(ps.pages) or not ps.page_loaded[pid]:
            return False
        c = int(ps.pages[pid, v % FANOUT])
        if c == 0 or n_sums == 0:
            continue
        if c >= n_sums or c >= len(ps.chunk_ref):
            return False
        if ps.chunk_sums[c] and not ps.chunk_verified[c] \
                and not ps.chunk_state[c] & ST_WRITTEN:
            return False
    return True
