"""Data chunk checksums: computed at commit, verified on read, kept honest across crashes.

Every mapped chunk of a pool created with data checksums has an mmh3 checksum in
``md.space.sums`` (0 = not known: never verified). Invariants:

- a checksum is brought up to date in the commit that follows a write of its chunk
  (chunks with ST_WRITTEN), never on each small write;
- a read verifies every committed chunk it touches (not ST_WRITTEN) against its checksum
  and fails with DataChecksumError naming device and offset, never returning the bytes;
- the crash window: a chunk written *in place* after the last commit no longer matches
  its committed checksum. Before the first such write in a transaction, the chunk's
  coarse region is marked in the write-intent file (``POOL/intent``) and fsynced; after
  the commit the mark is cleared. Opening a pool re-checksums the mapped chunks of marked
  regions before anything reads them (see docs/integrity.md for why this and not
  never-write-in-place).
"""

from __future__ import annotations

import logging
import struct
import threading

import mmh3
import numpy as np

from . import chunkhash
from .spacemap import id_runs
from .errors import DataChecksumError
from .format import FANOUT
from .kernels import ST_PENDING_FREE, ST_REHASH, ST_WRITTEN
from .native import K

log = logging.getLogger("thinstore")

_hash = getattr(mmh3, "mmh3_x64_128_uintdigest", None)     # takes buffers (mmh3 >= 5)
INTENT_NAME = "intent"
REGION_MIN_BYTES = 64 << 20       # md-raid's bitmap chunks are this coarse too
MAX_REGIONS = 8 * 4000            # the bitmap fits in one 4 KiB block
_BATCH = 256 << 10                # bytes read at once when hashing at commit (fits L2)
_SMALL = 4                        # requests spanning fewer chunks take the scalar path


def chunk_sum(buf) -> int:
    """The low 32 bits of mmh3 x64 128-bit (seed 0) of a chunk; 0 means 'unknown', so a
    zero hash becomes 1. The x64 variant hashes ~3x faster than x86 32-bit on 64-bit
    hosts, which is what keeps checksums cheap at commit (benchmarks/)."""
    if _hash is not None:
        h = _hash(buf)
    else:
        h = mmh3.hash128(bytes(buf), 0, True, signed=False)
    return (h & 0xFFFFFFFF) or 1


def region_shift(nchunks: int, chunk_shift: int) -> int:
    """log2 of chunks per intent region: at least 64 MiB, at most MAX_REGIONS regions."""
    shift = max(0, (REGION_MIN_BYTES >> chunk_shift).bit_length() - 1)
    while (nchunks >> shift) >= MAX_REGIONS:
        shift += 1
    return shift


class IntentLog:
    """The write-intent bitmap file: one bit per region, with a checksummed header.

    `bits` is what the file says (a region's bit is durable before any chunk in it is
    written in place); `hot` is the regions written in the open transaction. After a
    commit, a region stays marked for one more transaction if it was written in the
    last one, and is cleared only when a whole transaction passes without a write to it
    (md-raid clears its bits lazily the same way). So a steady random-write load pays
    no intent I/O at all, and a crash re-checksums at most two transactions' regions.

    A file that cannot be read back whole (torn, bad checksum) counts as every region
    marked: the worst a damaged intent file costs is a full re-checksum, never a false
    error or a missed one.
    """

    MAGIC = 0x49535354                # b"TSSI"; record: magic, checksum, shift, nbits, bits

    def __init__(self, fio, nchunks: int, chunk_shift: int):
        self.fio = fio
        self.shift = region_shift(nchunks, chunk_shift)
        self.bits = np.zeros((nchunks >> self.shift) + 1, dtype=bool)
        self.hot = np.zeros_like(self.bits)
        self.writes = 0

    @property
    def any(self) -> bool:
        return bool(self.bits.any())

    def encode(self) -> bytes:
        body = struct.pack("<II", self.shift, len(self.bits)) + np.packbits(self.bits).tobytes()
        return struct.pack("<II", self.MAGIC, chunk_sum(body)) + body

    def read_marked(self, nchunks: int) -> list:
        """Chunk ranges (start, stop) whose region the file marks; everything if unreadable."""
        raw = self.fio.pread(max(self.fio.size(), 8), 0)
        magic, csum = struct.unpack_from("<II", raw, 0)
        body = raw[8:]
        if magic != self.MAGIC or len(body) < 8:
            return [(0, nchunks)] if magic or any(raw) else []
        shift, nbits = struct.unpack_from("<II", body, 0)
        nbytes = (nbits + 7) // 8
        if len(body) < 8 + nbytes or csum != chunk_sum(body[:8 + nbytes]) or shift > 40:
            return [(0, nchunks)]
        bits = np.unpackbits(np.frombuffer(body, np.uint8, nbytes, 8))[:nbits]
        return [(int(r) << shift, min(nchunks, (int(r) + 1) << shift))
                for r in np.flatnonzero(bits)]

    def mark(self, chunks) -> None:
        """Make the regions of `chunks` durably marked before they are written in place."""
        if len(chunks) == 1:
            r = int(chunks[0]) >> self.shift
            if r < len(self.bits) and self.bits[r]:
                self.hot[r] = True
                return                     # the common case: one chunk, region marked
        regions = np.asarray(chunks, dtype=np.int64) >> self.shift
        if regions.max() >= len(self.bits):           # the pool grew
            extra = int(regions.max()) + 1 - len(self.bits)
            self.bits = np.concatenate([self.bits, np.zeros(extra, dtype=bool)])
            self.hot = np.concatenate([self.hot, np.zeros(extra, dtype=bool)])
        self.hot[regions] = True
        if self.bits[regions].all():
            return
        self.bits[regions] = True
        self._store(sync=True)

    def committed(self) -> None:
        """After a commit: keep only the regions the committed transaction wrote.

        Not synced: the new bits are a subset of the durable ones, so losing or tearing
        this write only costs a needless re-check.
        """
        keep = self.hot.copy()
        self.hot[:] = False
        if (keep != self.bits).any():
            self.bits = keep
            self._store(sync=False)

    def clear_all(self) -> None:
        if self.bits.any():
            self.bits[:] = False
            self.hot[:] = False
            self._store(sync=True)

    def _store(self, sync: bool) -> None:
        data = self.encode()
        self.fio.pwrite(data, 0)
        if self.fio.size() > len(data):
            self.fio.truncate(len(data))
        if sync:
            self.fio.fsync()
        self.writes += 1


def open_intent(store):
    """The pool's intent file, created empty when missing (pools made before it existed)."""
    if store.has(INTENT_NAME):
        return store.open(INTENT_NAME)
    fio = store.open(INTENT_NAME, create=True)
    fio.fsync()
    return fio


class DataSums:
    """Checksum upkeep of one open pool (only when the pool has data checksums on)."""

    def __init__(self, md, intent_fio, track_fresh: bool = True):
        self.md = md
        # With the native lane, `fresh` stays empty: while it holds anything the lane
        # stands aside, and a lane write maps new chunks it does not record anyway;
        # an unrecorded new chunk is hashed from a full read (its holes read zeros).
        self.track_fresh = track_fresh
        self.intent = IntentLog(intent_fio, len(md.space.refs), md.chunk_shift)
        self.verified = np.zeros(len(md.space.refs), dtype=bool)
        self._buf = bytearray(0)
        self._zero = bytearray(0)
        self.fresh: dict = {}         # chunk allocated this transaction -> [(lo, hi)] written
        self._pending = None
        self.counters = {"chunks_hashed": 0, "chunks_verified": 0, "intent_writes": 0,
                         "chunks_prehashed": 0}
        self._pre = None              # prehash's result: (generation, state, ids, sums)
        self._pre_buf = bytearray(0)
        self._verify_count = threading.Lock()   # reads verify side by side

    # ------------------------------------------------------------ commit
    def on_commit(self, generation: int) -> None:
        """Checksum chunks written in this transaction.

        The stale checksum of a freed chunk is left in place (writing it to zero would
        double the leaves a commit writes): nothing reads it before the chunk is
        written again, and then this hook replaces it.
        """
        space = self.md.space
        sums = space.sums
        freed = space.flagged(ST_PENDING_FREE)
        written = space.written()
        written = written[space.refs.arr[written] > 0]
        self.grow()
        todo = self._use_prehash(written)
        fresh, self.fresh = self.fresh, {}
        for c, ranges in self._sparse(todo, fresh):
            self._hash_fresh(c, ranges)
        self._hash_ids(todo[~np.isin(todo, list(fresh))] if fresh else todo)
        sums.mark(written)
        self.verified[freed] = False

    # ------------------------------------------------------------ before the commit
    def prehash_plan(self, again: bool = False):
        """Under the pool lock (either side): what prehash() is to hash -- the chunks
        written so far in this transaction -- or None when there are none. With
        `again`, after a prehash of this transaction: only the chunks written since
        their hash was taken (ST_REHASH set) or not in it; prehash() merges their sums
        into the earlier ones (a catch-up pass: each is shorter, so the commit finds
        fewer chunks still to hash). None then also when there is no earlier prehash
        of this transaction."""
        space = self.md.space
        written = space.written()
        written = written[space.refs.arr[written] > 0]
        if again:
            pre = self._pre
            if pre is None or pre[0] != self.md.sb.generation or pre[1] is not space.state \
                    or not len(pre[2]):
                return None
            ids = pre[2]
            pos = np.minimum(np.searchsorted(ids, written), len(ids) - 1)
            written = written[(ids[pos] != written) | ((space.state[written] & ST_REHASH) != 0)]
        if not len(written):
            return None
        return self.md.sb.generation, space.state, written, again

    def prehash(self, plan, stop=None) -> None:
        """Without the pool lock, while writes go on: hash the chunks of `plan`
        (prehash_plan) ahead of the commit, so that the commit, under the exclusive lock
        every request waits behind, hashes only the chunks written again since.

        Why a hash taken here is the one the commit needs: each chunk's ST_REHASH is
        cleared (atomically) before its bytes are read, and the write kernel sets it
        on every chunk it maps only after the write's bytes are in the file. So a chunk
        whose flag is still clear when the commit runs holds the bytes hashed here;
        any other is hashed again (_use_prehash). The result is used only by the next
        commit of the same generation and state array. `stop` (an Event): give up.
        Callers run one prehash at a time (the pool's _background_io lock): a catch-up
        pass merges into the last one's result, and a sum taken earlier must never
        replace one taken after the chunk's flag was last cleared."""
        generation, state, ids, again = plan
        out = np.zeros(len(ids), dtype=np.uint32)
        cs = self.md.chunk_size
        pre = chunkhash.prehash(self.md.data_fio, state, ids, cs, stop)
        if pre is not None or (stop is not None and stop.is_set()):
            if pre is not None:
                self._keep_prehash(generation, state, ids, pre, again)
            return
        K.state_clear(state, ids, ST_REHASH)
        per = max(1, _BATCH // cs)
        if len(self._pre_buf) < per * cs:
            self._pre_buf = bytearray(per * cs)
        at = 0
        for start, count in id_runs(ids):
            for lo in range(start, start + count, per):
                if stop is not None and stop.is_set():
                    return
                n = min(per, start + count - lo)
                view = memoryview(self._pre_buf)[:n * cs]
                self.md.data_fio.preadinto(view, lo * cs)
                for i in range(n):
                    out[at + i] = chunk_sum(view[i * cs:(i + 1) * cs])
                at += n
        self._keep_prehash(generation, state, ids, out, again)

    def _keep_prehash(self, generation: int, state, ids: np.ndarray, sums: np.ndarray,
                      again: bool) -> None:
        """Store a prehash's (sorted ids, sums); a catch-up pass's replace the earlier
        pass's sums of the same chunks and join the rest, kept sorted by chunk."""
        pre = self._pre
        if again and pre is not None and pre[0] == generation and pre[1] is state:
            old_ids, old_sums = pre[2], pre[3]
            keep = ~np.isin(old_ids, ids, assume_unique=True)
            ids = np.concatenate([old_ids[keep], ids])
            sums = np.concatenate([old_sums[keep], sums])
            order = np.argsort(ids, kind="stable")
            ids, sums = ids[order], sums[order]
        self._pre = (generation, state, ids, sums)

    def _use_prehash(self, written: np.ndarray) -> np.ndarray:
        """In the commit: take the prehashed sums of `written` chunks not written since
        (ST_REHASH clear); returns the chunks still to hash."""
        pre, self._pre = self._pre, None
        space = self.md.space
        if pre is None or not len(written) or pre[0] != self.md.sb.generation \
                or pre[1] is not space.state:
            return written
        _, _, ids, vals = pre
        pos = np.minimum(np.searchsorted(ids, written), len(ids) - 1)
        hit = (ids[pos] == written) & ((space.state[written] & ST_REHASH) == 0)
        got = written[hit]
        space.sums.arr[got] = vals[pos[hit]]
        self.verified[got] = True
        self.counters["chunks_prehashed"] += len(got)
        return written[~hit]

    def _sparse(self, written: np.ndarray, fresh: dict):
        """(chunk, ranges) of written fresh chunks less than half written; `fresh` keeps
        only those (the rest, mostly written, are cheaper in a batched full read)."""
        half = self.md.chunk_size // 2
        for c in [c for c, r in fresh.items() if sum(hi - lo for lo, hi in r) >= half]:
            del fresh[c]
        if not fresh:
            return []
        hit = written[np.isin(written, np.fromiter(fresh, np.int64, len(fresh)))]
        return [(c, fresh[c]) for c in hit.tolist()]

    def _hash_fresh(self, chunk: int, ranges: list) -> None:
        """Hash a chunk allocated this transaction: zeros except the ranges written."""
        cs = self.md.chunk_size
        if len(self._zero) != cs:
            self._zero = bytearray(cs)
        buf = memoryview(self._zero)
        base = chunk * cs
        try:
            for lo, hi in ranges:
                self.md.data_fio.preadinto(buf[lo:hi], base + lo)
            self.md.space.sums.arr[chunk] = chunk_sum(buf)
        finally:                                # the buffer must be all zero again
            for lo, hi in ranges:
                buf[lo:hi] = bytes(hi - lo)
        self.verified[chunk] = True
        self.counters["chunks_hashed"] += 1

    def _hash_ids(self, ids: np.ndarray) -> None:
        """Hash whole chunks `ids` (sorted) into the sums, in the commit (under the
        lock every request waits behind): in C on two threads where it can
        (chunkhash.py), else run by run here."""
        out = chunkhash.hash_parallel(self.md.data_fio, ids, self.md.chunk_size)
        if out is None:
            for start, count in id_runs(ids):
                self._hash_run(start, count)
            return
        self.md.space.sums.arr[ids] = out
        self.verified[ids] = True
        self.counters["chunks_hashed"] += len(ids)

    def _hash_run(self, start: int, count: int) -> None:
        """Hash `count` consecutive chunks from `start`, reading up to _BATCH at once into
        one reused buffer small enough to stay in cache while it is hashed."""
        cs = self.md.chunk_size
        per = max(1, _BATCH // cs)
        arr = self.md.space.sums.arr
        if len(self._buf) < per * cs:
            self._buf = bytearray(per * cs)
        for lo in range(start, start + count, per):
            n = min(per, start + count - lo)
            view = memoryview(self._buf)[:n * cs]
            self.md.data_fio.preadinto(view, lo * cs)
            for i in range(n):
                arr[lo + i] = chunk_sum(view[i * cs:(i + 1) * cs])
            self.verified[lo:lo + n] = True
            self.counters["chunks_hashed"] += n

    def committed(self) -> None:
        """After the superblock is durable: the intent marks have done their job."""
        self.intent.committed()
        self.counters["intent_writes"] = self.intent.writes

    def shutdown(self) -> None:
        """A clean close: everything is committed, so no region needs marking."""
        self.intent.clear_all()

    # ------------------------------------------------------------ writes
    def before_write(self, dirarr, pages, offset: int, length: int) -> None:
        """Mark the intent regions of committed chunks this write may change in place,
        and note what after_write needs to keep the fresh-chunk layouts exact."""
        shift = self.md.chunk_shift
        self._pending = None
        if ((offset + length - 1) >> shift) - (offset >> shift) < _SMALL:
            todo = self._scan_small(dirarr, pages, offset, length)
            if todo:
                self.intent.mark(todo)
            return
        ents = _entries(dirarr, pages, shift, offset, length)
        space = self.md.space
        ents = ents[ents != 0]
        for c in ents.tolist() if self.fresh else ():
            self.fresh.pop(c, None)          # large writes: hashed from a full read
        if not len(ents):
            return
        ents = ents[(space.sums.arr[ents] != 0) & ((space.state[ents] & ST_WRITTEN) == 0)]
        if len(ents):
            self.intent.mark(ents)

    def _scan_small(self, dirarr, pages, offset: int, length: int) -> list:
        """Chunks of a small range that hold a committed checksum (scalar path: numpy
        calls cost more than the work for a 4 KiB request); sets `_pending`."""
        shift, cs = self.md.chunk_shift, self.md.chunk_size
        sums, state = self.md.space.sums.arr, self.md.space.state
        out, pending = [], []
        end = offset + length
        for v in range(offset >> shift, ((end - 1) >> shift) + 1):
            pid = int(dirarr[v // FANOUT])
            c = int(pages[pid, v % FANOUT]) if pid else 0
            base = v << shift
            lo, hi = max(offset, base) - base, min(end, base + cs) - base
            if not c:
                pending.append((v, c, lo, hi, []))
            elif c in self.fresh:
                pending.append((v, c, lo, hi, self.fresh.pop(c)))
            elif sums[c] and not state[c] & ST_WRITTEN:
                out.append(c)
        self._pending = pending
        return out

    def after_write(self, dirarr, pages) -> None:
        """Record which bytes of chunks allocated in this transaction hold data.

        A chunk that was unmapped before the write is a new chunk whose uncovered parts
        read as zeros (the write kernel's contract), so at commit only its written
        ranges need reading. A chunk the write moved (copy on write) is not recorded:
        it holds copied bytes and is hashed from a full read. A write that fails between
        before_write and here leaves its chunks unrecorded, which is also safe.
        """
        if not self.track_fresh:
            self._pending = None
            return
        for v, old, lo, hi, ranges in self._pending or ():
            pid = int(dirarr[v // FANOUT])
            c = int(pages[pid, v % FANOUT]) if pid else 0
            if c and (old == 0 or c == old):
                ranges.append((lo, hi))
                self.fresh[c] = ranges
        self._pending = None

    # ------------------------------------------------------------ reads
    def verify(self, dm, buf, offset: int, length: int) -> None:
        """Raise DataChecksumError when a committed chunk the read touched does not match.

        A chunk the read covers whole is hashed from `buf`; one it covers in part is read
        whole once (and remembered as verified until it is written again).
        """
        shift = self.md.chunk_shift
        first = offset >> shift
        if ((offset + length - 1) >> shift) - first < _SMALL:
            return self._verify_small(dm, buf, offset, length)
        ents = _entries(dm.directory.arr, self.md.maps.pages, shift, offset, length)
        space = self.md.space
        idx = np.flatnonzero(ents != 0)
        c = ents[idx]
        todo = (space.sums.arr[c] != 0) & ~self.verified[c] & ((space.state[c] & ST_WRITTEN) == 0)
        if not todo.any():
            return
        view = memoryview(buf).cast("B")
        for v, chunk in zip((idx[todo] + first).tolist(), c[todo].tolist()):
            self._verify_one(dm, view, offset, v, chunk)

    def _verify_small(self, dm, buf, offset: int, length: int) -> None:
        shift = self.md.chunk_shift
        d, pages = dm.directory.arr, self.md.maps.pages
        sums, state = self.md.space.sums.arr, self.md.space.state
        view = None
        for v in range(offset >> shift, ((offset + length - 1) >> shift) + 1):
            pid = int(d[v // FANOUT])
            c = int(pages[pid, v % FANOUT]) if pid else 0
            if c and sums[c] and not self.verified[c] and not state[c] & ST_WRITTEN:
                if view is None:
                    view = memoryview(buf).cast("B")
                self._verify_one(dm, view, offset, v, c)

    def _verify_one(self, dm, view, offset: int, v: int, chunk: int) -> None:
        cs = self.md.chunk_size
        lo = v * cs - offset
        if lo >= 0 and lo + cs <= len(view):
            data = view[lo:lo + cs]
        else:
            data = self.md.data_fio.pread(cs, chunk * cs)
        with self._verify_count:
            self.counters["chunks_verified"] += 1
        if chunk_sum(data) != int(self.md.space.sums.arr[chunk]):
            view[:] = bytes(len(view))      # the caller's buffer must not keep bad bytes
            raise DataChecksumError(
                f"device {dm.name!r}: data at offset {v * cs} (chunk {v}, {cs} bytes) does not "
                f"match its checksum: pool data chunk {chunk} at byte {chunk * cs} of "
                f"{self.md.data_fio.path} is damaged (run 'thinstore scrub')")
        self.verified[chunk] = True

    # ------------------------------------------------------------ recovery
    def recover(self) -> int:
        """Re-checksum mapped chunks of regions the intent file marks (after a crash).

        Returns the number of chunks whose checksum changed; the caller commits.
        """
        space = self.md.space
        changed = 0
        for start, stop in self.intent.read_marked(len(space.refs)):
            ids = np.arange(start, stop)
            ids = ids[(space.refs.arr[start:stop] > 0) & (space.sums.arr[start:stop] != 0)]
            old = space.sums.arr[ids].copy()
            for s, n in id_runs(ids):
                self._hash_run(s, n)
            changed += int(np.count_nonzero(old != space.sums.arr[ids]))
            space.sums.mark(ids)
            self.intent.bits[:] = True  # so the clear after the recovery commit is written
        return changed

    def grow(self) -> None:
        """Follow the space map's length (the pool grew). Called by the exclusive side
        only (commit, Pool.grow), so concurrent readers never see `verified` replaced."""
        n = len(self.md.space.refs)
        if len(self.verified) < n:
            self.verified = np.concatenate([self.verified,
                                            np.zeros(n - len(self.verified), dtype=bool)])


def _entries(dirarr, pages, shift: int, offset: int, length: int) -> np.ndarray:
    """Data chunk ids (int64) of the virtual chunks a byte range touches; pages loaded."""
    first, last = offset >> shift, (offset + length - 1) >> shift
    v = np.arange(first, last + 1, dtype=np.int64)
    pids = dirarr[v // FANOUT].astype(np.int64)
    ents = pages[pids, v % FANOUT].astype(np.int64)
    ents[pids == 0] = 0
    return ents
