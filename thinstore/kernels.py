"""Pure-Python twins of the native kernels: the reference the C code is tested against.

Each function has the signature of its native wrapper (thinstore/native.py); the
contract is written once in _native/thinstore_native.h. Arrays are numpy and
C-contiguous:

- ``dirarr``   uint64[n_dir]: map page id per FANOUT virtual chunks (0 = no page)
- ``pages``    uint64[cap, FANOUT]: row = page id; entry = data chunk id (0 = unmapped)
- ``chunk_ref`` uint32[n_chunks]: how many map-page entries name the chunk
- ``chunk_state`` uint8[n_chunks]: ST_* flags below
- ``page_dirty`` uint8[cap]: set when a page's entries change

Invariants the callers keep: pages a write or unmap touches are loaded and exclusive
(page refcount 1), and ``new_chunks`` holds exactly the free chunks the call needs.
"""

from __future__ import annotations

import numpy as np

from .format import FANOUT

ST_PENDING_FREE = 1   # refcount fell to 0 in the open transaction: not reusable before commit
ST_PINNED = 2         # refcount fell but not to 0: the committed state may still share it
ST_WRITTEN = 4        # data written since the last commit
ST_REF_CHANGED = 8    # refcount changed since the last commit

_SHARED = ST_PINNED


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


def shadow_page(pages, src, dst, chunk_ref, chunk_state) -> None:
    """Copy page src to dst and give every chunk it names one more reference."""
    pages[dst] = pages[src]
    ids = pages[dst][pages[dst] != 0]
    ref_batch(chunk_ref, chunk_state, ids, +1)


def ref_batch(chunk_ref, chunk_state, ids, delta) -> None:
    """Add delta (+1/-1) to the refcount of every id (repeats count; zeros ignored)."""
    ids = np.asarray(ids, dtype=np.int64)
    ids = ids[ids != 0]
    if not len(ids):
        return
    uniq, counts = np.unique(ids, return_counts=True)
    if delta > 0:
        chunk_ref[uniq] += counts.astype(chunk_ref.dtype)
        chunk_state[uniq] |= ST_REF_CHANGED
        return
    if np.any(chunk_ref[uniq] < counts):
        raise ValueError("reference count would drop below zero")
    chunk_ref[uniq] -= counts.astype(chunk_ref.dtype)
    zero = chunk_ref[uniq] == 0
    chunk_state[uniq[zero]] |= ST_PENDING_FREE | ST_REF_CHANGED
    chunk_state[uniq[~zero]] |= ST_PINNED | ST_REF_CHANGED


def _needs_new(c: int, chunk_ref, chunk_state) -> bool:
    return c == 0 or chunk_ref[c] > 1 or bool(chunk_state[c] & _SHARED)


def count_write_allocs(dirarr, pages, chunk_ref, chunk_state, chunk_shift, offset, length) -> int:
    """How many new chunks a write of the range needs (unmapped or shared chunks)."""
    if length <= 0:
        return 0
    first, last = _chunk_span(chunk_shift, offset, length)
    ents = _entries(dirarr, pages, first, last)
    mapped = ents[ents != 0].astype(np.int64)
    shared = (chunk_ref[mapped] > 1) | ((chunk_state[mapped] & _SHARED) != 0)
    return int(np.count_nonzero(ents == 0) + np.count_nonzero(shared))


def write_range(dirarr, pages, page_dirty, chunk_ref, chunk_state, new_chunks,
                chunk_shift, fio, buf, offset, length, counters) -> None:
    """Write buf to the byte range, allocating or copying-on-write chunks as needed."""
    if length <= 0:
        return
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
        c = int(pages[pid, slot])
        bstart = base + lo - offset
        if _needs_new(c, chunk_ref, chunk_state):
            c, written = _place_chunk(pages, page_dirty, chunk_ref, chunk_state, pid, slot, c,
                                      next(fresh), chunk_shift, lo, hi, fio, counters,
                                      data[bstart:bstart + hi - lo])
            if written:                 # the piece went out with the copied bytes
                if run_off is not None:
                    fio.pwrite(data[run_start:bstart], run_off)
                    run_off = None
                pos = base + hi
                continue
        chunk_state[c] |= ST_WRITTEN
        doff = (c << chunk_shift) + lo
        if run_off is not None and run_off + (bstart - run_start) != doff:
            fio.pwrite(data[run_start:bstart], run_off)
            run_off = None
        if run_off is None:
            run_off, run_start = doff, bstart
        pos = base + hi
    if run_off is not None:
        fio.pwrite(data[run_start:length], run_off)
    counters[3] += length


def _place_chunk(pages, page_dirty, chunk_ref, chunk_state, pid, slot, old, new,
                 chunk_shift, lo, hi, fio, counters, piece) -> tuple[int, bool]:
    """Map a new chunk at (pid, slot) whose uncovered parts hold the old bytes or zeros.
    Returns (new, written): written when the write's piece for [lo, hi) went out too
    (a copy on write where blocks cannot be shared writes the new chunk whole)."""
    cs = 1 << chunk_shift
    dst = new << chunk_shift
    written = False
    if old == 0:
        fio.punch(dst, lo)
        fio.punch(dst + hi, cs - hi)
        counters[0] += 1
    else:
        src = old << chunk_shift
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
        ref_batch(chunk_ref, chunk_state, [old], -1)
        counters[0] += 1
        counters[1] += 1
        counters[2] += lo + cs - hi
    chunk_ref[new] = 1
    chunk_state[new] = ST_REF_CHANGED | (ST_WRITTEN if written else 0)
    pages[pid, slot] = new
    page_dirty[pid] = 1
    return new, written


def unmap_range(dirarr, pages, page_dirty, chunk_ref, chunk_state, first_chunk, n_chunks) -> int:
    """Unmap whole virtual chunks; their data chunks lose one reference each."""
    if n_chunks <= 0:
        return 0
    v = np.arange(first_chunk, first_chunk + n_chunks, dtype=np.int64)
    pids = dirarr[v // FANOUT].astype(np.int64)
    keep = pids != 0
    v, pids = v[keep], pids[keep]
    slots = v % FANOUT
    ents = pages[pids, slots]
    hit = ents != 0
    if not hit.any():
        return 0
    ref_batch(chunk_ref, chunk_state, ents[hit], -1)
    pages[pids[hit], slots[hit]] = 0
    page_dirty[np.unique(pids[hit])] = 1
    return int(np.count_nonzero(hit))


def read_range(dirarr, pages, chunk_shift, fio, buf, offset, length) -> None:
    """Fill buf with the range: zeros for holes, file bytes for mapped extents."""
    if length <= 0:
        return
    out = np.empty(((length >> chunk_shift) + 2, 3), dtype=np.int64)
    n = translate(dirarr, pages, chunk_shift, offset, length, out)
    view = memoryview(buf).cast("B")
    for voff, ln, doff in out[:n].tolist():
        part = view[voff - offset:voff - offset + ln]
        if doff < 0:
            part[:] = bytes(ln)
        else:
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


SLOW = -1                 # write_fast: "take the general path"; nothing was changed
FAST_MAX_CHUNKS = 64
_FAST_SCAN_MAX = 65536


def write_fast(dirarr, pages, page_ref, page_dirty, chunk_ref, chunk_state, chunk_sums,
               intent_bits, intent_hot, intent_shift, cursor, chunk_shift, fio, buf,
               offset, length, counters) -> int:
    """The common write whole: checks, allocation, write intent, write_range.

    Returns the number of chunks allocated (holes and shared chunks in range: first
    writes and copies on write), or SLOW (nothing changed) when a page is missing or
    shared, the request spans more than
    FAST_MAX_CHUNKS chunks, buf is all zeros, free chunks run short within the scan,
    or a chunk needing write intent lies in an unmarked region. `cursor` is int64[3],
    SpaceMap's allocation cursor and preallocated range (prealloc); `chunk_sums` is
    empty when checksums are off.
    """
    return _write_fast(dirarr, pages, page_ref, page_dirty, chunk_ref, chunk_state, chunk_sums,
                       intent_bits, intent_hot, intent_shift, cursor, chunk_shift, fio, buf,
                       offset, length, counters, None)


def _write_fast(dirarr, pages, page_ref, page_dirty, chunk_ref, chunk_state, chunk_sums,
                intent_bits, intent_hot, intent_shift, cursor, chunk_shift, fio, buf,
                offset, length, counters, max_need, page_loaded=None) -> int:
    """write_fast, also SLOW when the write needs more than max_need (not None) chunks
    or a page in range is not loaded (page_loaded given: a row not read yet looks all
    holes)."""
    if length == 0:
        return SLOW
    first, last = _chunk_span(chunk_shift, offset, length)
    if last - first >= FAST_MAX_CHUNKS or is_zero(memoryview(buf)[:length]):
        return SLOW
    need, hot = 0, []
    for v in range(first, last + 1):
        c = _fast_entry(dirarr, pages, page_ref, len(chunk_ref), v)
        if c is None or (page_loaded is not None and not page_loaded[int(dirarr[v // FANOUT])]):
            return SLOW
        need += _needs_new(c, chunk_ref, chunk_state)
        if c and len(chunk_sums) and chunk_sums[c] and not chunk_state[c] & ST_WRITTEN:
            r = c >> intent_shift
            if r >= len(intent_bits) or not intent_bits[r]:
                return SLOW
            hot.append(r)
    if max_need is not None and need > max_need:
        return SLOW
    fresh = _fast_allocate(chunk_ref, chunk_state, cursor, need)
    if fresh is None:
        return SLOW
    prealloc(fio, chunk_shift, len(chunk_ref), cursor, fresh)
    intent_hot[hot] = True
    write_range(dirarr, pages, page_dirty, chunk_ref, chunk_state, fresh, chunk_shift, fio,
                buf, offset, length, counters)
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


def _fast_entry(dirarr, pages, page_ref, n_chunks: int, v: int):
    """Chunk id of virtual chunk v (0: a hole) when its page exists and is exclusive,
    else None."""
    d = v // FANOUT
    if d >= len(dirarr):
        return None
    pid = int(dirarr[d])
    if pid == 0 or pid >= len(pages) or page_ref[pid] != 1:
        return None
    c = int(pages[pid, v % FANOUT])
    return c if 0 <= c < n_chunks else None


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


# ---- the write lane (fastlane.py; ts_lane and ts_dev_lane in the header) -----

GATE_READER, GATE_WRITER, GATE_SHARED, GATE_EXCLUSIVE = 1, 1 << 24, 1 << 32, 1 << 48


class Lane:
    """A pool's half of the lane: the arrays write_fast takes, page_loaded and
    chunk_verified (bool arrays; chunk_verified empty when checksums are off), and
    the lane's scalars, named as in ts_lane (``fio`` stands where C has ``fd``).
    ``gate``, ``closers`` and ``excl_closers`` are the C side's synchronisation;
    the twin only reads them."""

    def __init__(self, pages, page_ref, page_dirty, page_loaded, chunk_ref, chunk_state,
                 chunk_sums, chunk_verified, intent_bits, intent_hot, intent_shift, cursor,
                 counters, fio, chunk_shift):
        self.pages, self.page_ref, self.page_dirty = pages, page_ref, page_dirty
        self.page_loaded, self.chunk_verified = page_loaded, chunk_verified
        self.chunk_ref, self.chunk_state, self.chunk_sums = chunk_ref, chunk_state, chunk_sums
        self.intent_bits, self.intent_hot, self.intent_shift = intent_bits, intent_hot, intent_shift
        self.cursor, self.counters, self.fio, self.chunk_shift = cursor, counters, fio, chunk_shift
        self.open = self.writes = self.budget = self.wrote = self.gate = 0
        self.closers = self.excl_closers = 0


class DevLane:
    """A device's half: its directory, size and whether the lane may write it."""

    def __init__(self, dirarr, size: int, writable: bool):
        self.dirarr, self.size, self.writable = dirarr, size, int(writable)


def lane_write(lane: Lane, dev: DevLane, buf, offset: int, length: int) -> int:
    """write_fast through a lane: SLOW (nothing changed) unless the lane is open for
    writes and empty, the device writable, the range inside it and the chunks to
    allocate within lane.budget; otherwise write_fast's result, with lane.wrote set
    and the chunks allocated taken off lane.budget."""
    if (not dev.writable or length <= 0 or offset < 0 or offset + length > dev.size
            or lane.closers or lane.gate or not (lane.open and lane.writes)):
        return SLOW
    rc = _write_fast(dev.dirarr, lane.pages, lane.page_ref, lane.page_dirty, lane.chunk_ref,
                     lane.chunk_state, lane.chunk_sums, lane.intent_bits, lane.intent_hot,
                     lane.intent_shift, lane.cursor, lane.chunk_shift, lane.fio, buf, offset,
                     length, lane.counters, max(lane.budget, 0), lane.page_loaded)
    if rc != SLOW:
        lane.wrote = 1
        lane.budget -= rc
    return rc


def lane_read(lane: Lane, dev: DevLane, buf, offset: int, length: int) -> int:
    """read_range through a lane: 0 when read; SLOW (buf untouched) unless the lane
    is open with no lane writer or exclusive lock holder inside or closing, the range inside the device and
    spanning at most FAST_MAX_CHUNKS chunks, its map pages in memory, and no chunk
    in it waiting for its checksum to be checked."""
    if length <= 0 or offset < 0 or offset + length > dev.size:
        return SLOW
    first, last = _chunk_span(lane.chunk_shift, offset, length)
    if (last - first >= FAST_MAX_CHUNKS or lane.excl_closers
            or lane.gate & (GATE_WRITER | GATE_EXCLUSIVE)
            or not lane.open or not _lane_readable(lane, dev, first, last)):
        return SLOW
    read_range(dev.dirarr, lane.pages, lane.chunk_shift, lane.fio, buf, offset, length)
    return 0


def _lane_readable(lane: Lane, dev: DevLane, first: int, last: int) -> bool:
    n_sums = len(lane.chunk_sums)
    for v in range(first, last + 1):
        d = v // FANOUT
        if d >= len(dev.dirarr):
            return False
        pid = int(dev.dirarr[d])
        if pid == 0:
            continue
        if pid >= len(lane.pages) or not lane.page_loaded[pid]:
            return False
        c = int(lane.pages[pid, v % FANOUT])
        if c == 0 or n_sums == 0:
            continue
        if c >= n_sums or c >= len(lane.chunk_ref):
            return False
        if lane.chunk_sums[c] and not lane.chunk_verified[c] \
                and not lane.chunk_state[c] & ST_WRITTEN:
            return False
    return True
