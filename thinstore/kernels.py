"""Pure-Python twins of the native kernels: the reference the C code is tested against.

Each function has the signature of its native wrapper (thinstore/native.py); the
contract is written once in _native/thinstore_native.h. Arrays are numpy and
C-contiguous:

- ``dirarr``   uint64[n_dir]: map page id per FANOUT virtual chunks (0 = no page)
- ``pages``    uint64[cap, FANOUT]: row = page id; entry = data chunk id (0 = unmapped)
- ``chunk_ref`` uint32[n_chunks]: how many map-page entries name the chunk
- ``chunk_state`` uint8[n_chunks]: ST_* flags (mapkernels.py)
- ``chunk_summary`` uint8[summary_len(n_chunks)]: 1 for a window of 1 << SUMMARY_SHIFT
  chunks in which some chunk has a flag (set with every flag; SpaceMap clears it)
- ``page_dirty`` uint8[cap]: set when a page's entries change

The request kernels (``write``, ``read``, ``unmap_range``, ``count_write_allocs``)
take the pool's state as one object, ``PoolState`` (C: ts_pool), and the device's
as ``Dev`` (C: ts_dev). Invariants the callers keep: pages a general write or unmap
touches are loaded and exclusive (page refcount 1), and ``new_chunks`` holds exactly
the free chunks the call needs.

The twins live in two modules: this one holds the request kernels and the state they
take (PoolState, Dev, the lane's fast paths); thinstore/mapkernels.py the array
kernels they are built on (translate, ref_batch, read_range and the rest), re-exported
here so that this module has every name native.py's ``K`` has.
"""

from __future__ import annotations

import numpy as np

from .format import FANOUT
from .mapkernels import (  # noqa: F401  (the array kernels: K's names, see above)
    PREALLOC_BYTES, SHARED_STATE, ST_PENDING_FREE, ST_PINNED, ST_REF_CHANGED, ST_REHASH,
    ST_WRITTEN, SUMMARY_SHIFT, chunk_span, count_mapped, cow_copy, entries, is_zero, mark,
    needs_new, prealloc, read_extents, read_range, ref_batch, shadow_page, state_clear,
    summary_len, translate, writeback)


def count_write_allocs(ps, dev, offset, length) -> int:
    """How many new chunks a write of the range needs (unmapped or shared chunks)."""
    if length <= 0:
        return 0
    first, last = chunk_span(ps.chunk_shift, offset, length)
    ents = entries(dev.dirarr, ps.pages, first, last)
    mapped = ents[ents != 0].astype(np.int64)
    shared = (ps.chunk_ref[mapped] > 1) | ((ps.chunk_state[mapped] & SHARED_STATE) != 0)
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
            first, last = chunk_span(ps.chunk_shift, offset, length)
            ents = entries(dirarr, ps.pages, first, last)
            ents = ents[(ents != 0) & (ents < len(ps.chunk_state))].astype(np.int64)
            mark(ps.chunk_state, ps.chunk_summary, ents, ST_REHASH)


def _write_given_run(ps, dirarr, new_chunks, buf, offset, length) -> None:
    chunk_shift, fio = ps.chunk_shift, ps.fio
    cs = 1 << chunk_shift
    data = memoryview(buf).cast("B")
    first, last = chunk_span(chunk_shift, offset, length)
    fresh = iter(np.asarray(new_chunks, dtype=np.int64).tolist())
    run_off, run_start = None, 0     # pending contiguous pwrite: data offset, buf start
    pos, end = offset, offset + length
    for v in range(first, last + 1):
        base = v << chunk_shift
        lo, hi = max(pos, base) - base, min(end, base + cs) - base
        pid, slot = int(dirarr[v // FANOUT]), v % FANOUT
        c = int(ps.pages[pid, slot])
        bstart = base + lo - offset
        if needs_new(c, ps.chunk_ref, ps.chunk_state):
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
    first, last = chunk_span(ps.chunk_shift, offset, length)
    if last - first >= FAST_MAX_CHUNKS or is_zero(memoryview(buf)[:length]):
        return SLOW
    need, hot = 0, []
    sums, bits = ps.chunk_sums, ps.intent_bits
    for v in range(first, last + 1):
        c = _fast_entry(ps, dev.dirarr, v)
        if c is None:
            return SLOW
        need += needs_new(c, ps.chunk_ref, ps.chunk_state)
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
    first, last = chunk_span(ps.chunk_shift, offset, length)
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
