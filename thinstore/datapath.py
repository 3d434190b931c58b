"""The data path: byte-range reads, writes, zeroing and extents of a device.

These are methods of Pool (a mixin) because every request runs under the pool's
lock and touches its metadata (`self.md`), checksums (`self._sums`) and counters.
A request is bounds-checked, its map pages are loaded (reads) or made exclusive
(writes), and then one kernel call per request does the translation and the I/O
(DESIGN.md section 4). An all-zero write unmaps the whole chunks it covers.

Writes go through the one write entry, ``K.write``, over the pool's kernel state
(fastlane.KernelState: one struct the pool owns, also the native lane's): mode
REQ_LOCKED for the common case whole, REQ_GIVEN for the general path once Python
has made the pages exclusive and allocated.
"""

from __future__ import annotations

import logging

import numpy as np

from . import kernels, native
from .errors import OutOfRange, PoolFull, ReadOnlyDevice, WritePastEnd
from .fastlane import KernelState
from .format import FANOUT
from .metadata import DeviceMeta
from .native import K, NATIVE

log = logging.getLogger("thinstore")


class DataPath:
    """Pool's request handlers (see the module docstring)."""

    FAST_WRITES = True     # False: every write takes the general path (tests compare both)

    def _bounds(self, dm: DeviceMeta, offset: int, length: int, write: bool) -> None:
        self._live(dm)
        if write and dm.read_only:
            raise ReadOnlyDevice(f"{dm.name!r} is a read-only snapshot; clone it to write")
        if offset < 0 or length < 0 or offset + length > dm.size:
            cls = WritePastEnd if write else OutOfRange
            raise cls(f"{dm.name!r}: range {offset}+{length} lies outside the device "
                      f"({dm.size} bytes)")

    def _pages_of(self, offset: int, length: int) -> tuple[int, int]:
        shift = self.md.chunk_shift
        return (offset >> shift) // FANOUT, ((offset + length - 1) >> shift) // FANOUT

    def _read(self, dm: DeviceMeta, buf, offset: int) -> None:
        """Under the shared lock: reads run together, never beside a write. What they
        touch that is shared is idempotent (page loading, under its own lock) or a
        flag a second reader would set the same (DataSums.verified)."""
        length = memoryview(buf).nbytes
        with self.lock.shared:
            self._bounds(dm, offset, length, write=False)
            if not length:
                return
            self._load_pages(dm, offset, length)
            ps, k = self._kernel_state(repoint=False)
            k.read(ps, self._kernel_dev(dm, k is NATIVE), buf, offset,
                   length, kernels.REQ_LOCKED)
            if self._sums is not None:
                self._sums.verify(dm, buf, offset, length)

    def _load_pages(self, dm: DeviceMeta, offset: int, length: int) -> np.ndarray:
        """Load the map pages of a range (length > 0); returns the directory array.
        A request inside one page, the common case, checks it without numpy."""
        p0, p1 = self._pages_of(offset, length)
        d = dm.directory.arr
        maps = self.md.maps
        if p0 == p1:
            pid = int(d[p0])
            if pid and not maps.loaded[pid]:
                maps.ensure_loaded([pid])
        else:
            maps.ensure_loaded(d[p0:p1 + 1][d[p0:p1 + 1] != 0])
        return d

    def _write(self, dm: DeviceMeta, data, offset: int, fua: bool) -> None:
        length = memoryview(data).nbytes
        with self.lock:
            self._bounds(dm, offset, length, write=True)
            if length and not self._write_fast(dm, data, offset, length):
                if K.is_zero(data):
                    self._zero_range(dm, offset, length, no_hole=False)
                else:
                    self._write_data(dm, data, offset, length)
        if fua:
            self.flush()

    def flush(self, wait: bool = True) -> bool:
        """NBD FLUSH, and FUA: every write that returned before this call is durable
        when it returns -- one intent-log record and one fdatasync of the log, shared
        with concurrent flushes, or a full commit when the log cannot take the batch
        (SyncLog.flush in synclog.py). Costs what was written since the last flush,
        not the pool's size. With `wait` False it only starts that (the record is
        appended, its durable write runs on the log writer) and returns True, or
        returns False having done nothing where the log has no writer."""
        return self._log.flush(self, wait)

    def _kernel_state(self, repoint: bool = True):
        """(PoolState, kernels) pointed at the pool's current arrays; with the pool
        lock's exclusive side held, or its shared side and repoint False
        (fastlane.KernelState.current)."""
        ks = self.__dict__.get("_kstate")
        if ks is None:
            lane = self._lane
            ks = self._kstate = lane.state if lane is not None else \
                KernelState(bound=False)
        return ks.current(self, repoint)

    @staticmethod
    def _kernel_dev(dm: DeviceMeta, bound: bool) -> kernels.Dev:
        """dm as the kernels take it, kept on dm while its directory, size and
        writability stay (the locked path's; the lane keeps its own)."""
        dev = dm.__dict__.get("_kdev")
        d = dm.directory.arr
        if dev is None or dev.dirarr is not d or dev.size != dm.size or \
                dev.writable == dm.read_only or (bound and dev.c is None):
            dev = kernels.Dev(d, dm.size, not dm.read_only)
            if bound:
                dev.c = native.ffi.new("ts_dev *")
                native.fill_dev(dev.c, dev)
            dm.__dict__["_kdev"] = dev
        return dev

    def _write_fast(self, dm: DeviceMeta, data, offset: int, length: int) -> bool:
        """The common write in one kernel call (K.write, REQ_LOCKED): every chunk in
        range under exclusive pages (holes are first writes), free chunks near the
        cursor for the new chunks, intent regions already marked. False (nothing
        done) otherwise, and the general path below does the same write.

        It gives exactly the general path's result: the same chunks allocated (same
        scan order and cursor), the same intent marks (DataSums.before_write sets only
        `hot` when the region is marked). Chunks allocated this transaction whose
        written ranges DataSums tracks (`fresh`) are known only to Python, so while
        any exist the fast path stands aside.
        """
        sums = self._sums
        if not self.FAST_WRITES or (sums is not None and sums.fresh):
            return False
        self._load_pages(dm, offset, length)      # a row not read yet looks all holes
        ps, k = self._kernel_state()
        n = k.write(ps, self._kernel_dev(dm, k is NATIVE), data, offset, length,
                    kernels.REQ_LOCKED)
        if n < 0:
            return False
        self._dirty = True
        self._log.note(dm.dev_id, offset, length)
        if n:
            self._note_allocated(n)
        return True

    def _write_data(self, dm: DeviceMeta, data, offset: int, length: int) -> None:
        md = self.md
        maps, space = md.maps, md.space
        p0, p1 = self._pages_of(offset, length)
        maps.prepare(dm.directory, p0, p1, space, allocate=True)
        d = dm.directory.arr
        ps, k = self._kernel_state()
        need = k.count_write_allocs(ps, self._kernel_dev(dm, k is NATIVE), offset, length)
        fresh = self._allocate(need, dm)        # may commit: checksum upkeep comes after
        if self._sums is not None:
            self._sums.before_write(d, maps.pages, offset, length)
        ps, k = self._kernel_state()            # the commit may have grown arrays
        k.write(ps, self._kernel_dev(dm, k is NATIVE), data, offset, length,
                kernels.REQ_GIVEN, fresh)
        if self._sums is not None:
            self._sums.after_write(d, maps.pages)
        self._dirty = True
        self._log.note(dm.dev_id, offset, length)

    def _allocate(self, n: int, dm: DeviceMeta) -> np.ndarray:
        space = self.md.space
        fresh = space.allocate(n)
        if fresh is None and space.pending():
            self.commit()          # chunks freed in this transaction become usable
            fresh = space.allocate(n)
        if fresh is None:
            raise PoolFull(f"pool {self.path} is full: writing to {dm.name!r} needs {n} "
                           f"chunk(s), {space.free()} free; grow the pool, destroy a device or discard data")
        self._note_allocated(n)
        K.prealloc(self.md.data_fio, self.md.chunk_shift, len(space.refs.arr), space.cursor_arr,
                   fresh)
        return fresh

    def _note_allocated(self, n: int) -> None:
        self._since_low_water_check += n
        if self._since_low_water_check * 200 > self.md.space.capacity:   # every 0.5%
            self._check_low_water()

    def _count(self) -> None:
        """Fold the kernels' counters into the pool's (call with the lock held)."""
        kc = self._kc
        c = self._counters
        c["chunks_allocated"] += int(kc[0])
        c["chunks_copied"] += int(kc[1])
        c["bytes_copied"] += int(kc[2])
        c["bytes_written"] += int(kc[3])
        kc[:] = 0

    def _check_low_water(self) -> None:
        """Warn once each time usage crosses the low-water mark (not on every write)."""
        self._since_low_water_check = 0
        space = self.md.space
        over = space.used() >= space.capacity * self.md.low_water_pct / 100
        if over and not self._low_water_crossed:
            log.warning("pool %s is %d%% full (low-water mark %d%%): add capacity or free space",
                        self.path, 100 * space.used() // max(space.capacity, 1),
                        self.md.low_water_pct)
        self._low_water_crossed = over

    def _discard(self, dm: DeviceMeta, offset: int, length: int) -> None:
        with self.lock:
            self._bounds(dm, offset, length, write=True)
            self._zero_range(dm, offset, length, no_hole=False)

    def _write_zeroes(self, dm: DeviceMeta, offset: int, length: int, no_hole: bool) -> None:
        with self.lock:
            self._bounds(dm, offset, length, write=True)
            self._zero_range(dm, offset, length, no_hole)

    def _zero_range(self, dm: DeviceMeta, offset: int, length: int, no_hole: bool) -> None:
        """Make the range read zeros: whole chunks unmapped (or allocated zero), edges zeroed."""
        if length <= 0:
            return
        if no_hole:
            return self._fill_zeros(dm, offset, length)
        cs = self.md.chunk_size
        end = offset + length
        first = -(-offset // cs)
        last = end // cs                 # whole chunks [first, last)
        if first >= last:               # inside one chunk, or straddling two
            self._zero_partial(dm, offset, end)
            return
        self._zero_partial(dm, offset, first * cs)
        self._zero_partial(dm, last * cs, end)
        self._unmap_chunks(dm, first, last - first)

    def _zero_partial(self, dm: DeviceMeta, start: int, end: int) -> None:
        """Zero bytes inside chunks that stay mapped; unmapped ones read zero already."""
        cs = self.md.chunk_size
        pos = start
        while pos < end:
            stop = min(end, (pos // cs + 1) * cs)
            if self._mapped(dm, pos // cs):
                self._write_data(dm, bytes(stop - pos), pos, stop - pos)
            pos = stop

    def _fill_zeros(self, dm: DeviceMeta, offset: int, length: int) -> None:
        step = 8 << 20
        zeros = bytes(min(step, length))
        for pos in range(offset, offset + length, step):
            n = min(step, offset + length - pos)
            self._write_data(dm, memoryview(zeros)[:n], pos, n)

    def _mapped(self, dm: DeviceMeta, v: int) -> bool:
        pid = int(dm.directory.arr[v // FANOUT])
        if not pid:
            return False
        self.md.maps.ensure_loaded([pid])
        return bool(self.md.maps.pages[pid, v % FANOUT])

    def _unmap_chunks(self, dm: DeviceMeta, first: int, n: int) -> None:
        if n <= 0:
            return
        maps, space = self.md.maps, self.md.space
        p0, p1 = first // FANOUT, (first + n - 1) // FANOUT
        maps.prepare(dm.directory, p0, p1, space, allocate=False)
        ps, k = self._kernel_state()
        k.unmap_range(ps, self._kernel_dev(dm, k is NATIVE), first, n)
        self._dirty = True
        cs = self.md.chunk_size
        self._log.note(dm.dev_id, first * cs, min(n * cs, dm.size - first * cs))

    def _extents(self, dm: DeviceMeta, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """(offset, length, mapped) runs of [offset, offset+length). Only the directory
        slots that name a page are translated, a window at a time; the rest is hole
        (the extents of a 1 PiB volume asked for a 384 GiB table)."""
        result: list[tuple[int, int, bool]] = []

        def add(voff: int, ln: int, mapped: bool) -> None:
            if result and result[-1][2] == mapped:
                result[-1] = (result[-1][0], result[-1][1] + ln, mapped)
            else:
                result.append((voff, ln, mapped))

        with self.lock.shared:
            self._bounds(dm, offset, length, write=False)
            if not length:
                return []
            shift, end = self.md.chunk_shift, offset + length
            span = FANOUT << shift                  # bytes under one directory slot
            slots = dm.directory.nonzero_slots()
            slots = slots[(slots >= offset // span) & (slots <= (end - 1) // span)]
            pos = offset
            for lo_slot, hi_slot in _slot_runs(slots):
                lo, hi = max(offset, lo_slot * span), min(end, hi_slot * span)
                if lo > pos:
                    add(pos, lo - pos, False)
                window = _EXTENT_CHUNKS << shift
                for wlo in range(lo, hi, window):
                    whi = min(hi, wlo + window)
                    d = self._load_pages(dm, wlo, whi - wlo)
                    out = np.empty((((whi - wlo) >> shift) + 2, 3), dtype=np.int64)
                    n = K.translate(d, self.md.maps.pages, shift, wlo, whi - wlo, out)
                    for voff, ln, doff in out[:n].tolist():
                        add(voff, ln, doff >= 0)
                pos = hi
            if pos < end:
                add(pos, end - pos, False)
        return result


_EXTENT_CHUNKS = 1 << 20    # chunks translated per call: a table of at most 24 MiB


def _slot_runs(slots: np.ndarray):
    """(first, end) of each run of consecutive directory slots (sorted)."""
    if not len(slots):
        return
    breaks = np.flatnonzero(np.diff(slots) != 1) + 1
    for run in np.split(slots, breaks):
        yield int(run[0]), int(run[-1]) + 1
