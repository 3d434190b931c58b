"""Block maps: shared, reference-counted map pages and the per-device directories.

A device's directory (a PagedArray of uint64) names one map page per FANOUT virtual
chunks; a map page is a row of FANOUT data chunk ids. Pages are shared between a
snapshot and its origin and carry a reference count (how many directory slots name
them). A page is changed only while its count is 1: writing through a shared page
first *shadows* it (copy the row, add a reference to every chunk it names).

Page ids are logical and stable; `locations` (persisted) says which metadata block
holds each committed page. Page refcounts are derived at open from the directories,
so they cannot disagree with them. Pages are read from ``meta`` on first use.
"""

from __future__ import annotations

import threading

import numpy as np

from .format import BT_MAP, FANOUT
from .paged import PagedArray, zeros


class MapStore:
    def __init__(self, locations: PagedArray, store):
        self.locations = locations          # page id -> metadata block (0: not on disk)
        self.store = store
        cap = max(len(locations), 64)
        try:
            self.pages = zeros((cap, FANOUT), np.uint64)     # resident where loaded
        except MemoryError:
            from .errors import CorruptMetadata
            raise CorruptMetadata(f"the page table claims {cap} pages, more than memory "
                                  "can hold") from None
        self.ref = np.zeros(cap, dtype=np.uint32)
        self.dirty = np.zeros(cap, dtype=np.uint8)
        self.loaded = np.zeros(cap, dtype=bool)
        self.loaded[0] = True
        if len(locations) < cap:
            locations.resize(cap)
        self.counters = {"pages_shadowed": 0, "pages_allocated": 0, "pages_written": 0,
                         "pages_read": 0}
        self._loading = threading.Lock()    # readers load pages side by side

    # -- capacity and allocation
    @property
    def capacity(self) -> int:
        return len(self.ref)

    def _grow(self) -> None:
        old = self.capacity
        new = old * 2
        pages = zeros((new, FANOUT), np.uint64)
        rows = np.flatnonzero(self.loaded)           # a row not loaded stays untouched
        pages[rows] = self.pages[rows]
        self.pages = pages
        for name in ("ref", "dirty", "loaded"):
            arr = getattr(self, name)
            setattr(self, name, np.concatenate([arr, np.zeros(new - old, dtype=arr.dtype)]))
        self.locations.resize(new)

    def allocate(self) -> int:
        """A page id free in memory and on disk (ref 0 and no committed block)."""
        while True:
            free = np.flatnonzero((self.ref[1:] == 0) & (self.locations.arr[1:] == 0))
            if len(free):
                pid = int(free[0]) + 1
                self.pages[pid] = 0
                self.loaded[pid] = True
                self.dirty[pid] = 1
                self.ref[pid] = 1
                self.counters["pages_allocated"] += 1
                return pid
            self._grow()

    # -- loading
    def ensure_loaded(self, pids) -> None:
        """Read the pages not in memory yet. Safe from concurrent readers (shared pool
        lock): loading takes its own lock and re-checks, and a row is filled before
        `loaded` says so; a reader that sees it loaded sees it whole."""
        pids = np.asarray(pids, dtype=np.int64)
        if self.loaded[pids].all():
            return
        with self._loading:
            for pid in pids[~self.loaded[pids]].tolist():
                payload = self.store.read_block(int(self.locations.arr[pid]), BT_MAP)
                self.pages[pid] = np.frombuffer(payload, dtype="<u8", count=FANOUT)
                self.loaded[pid] = True
                self.counters["pages_read"] += 1

    def peek(self, pids) -> np.ndarray:
        """The rows of pages `pids` (int64 array), read from ``meta`` where not loaded
        without keeping them: a query over every page (list) does not make the whole
        page table resident."""
        rows = self.pages[pids]
        for i in np.flatnonzero(~self.loaded[pids]).tolist():
            payload = self.store.read_block(int(self.locations.arr[pids[i]]), BT_MAP)
            rows[i] = np.frombuffer(payload, dtype="<u8", count=FANOUT)
        return rows

    def derive_refs(self, directories) -> None:
        """Recompute page refcounts from every directory (done at open); costs the
        directories' populated leaves, not their virtual sizes."""
        self.ref[:] = 0
        # a small directory whole (one concatenation for 10,000 of them), a large one by
        # the slots in use
        arrs = [d.arr if len(d.arr) <= 4096 else d.arr[d.nonzero_slots()] for d in directories]
        if not arrs:
            return
        pids = np.concatenate(arrs)                        # one pass, not one per device
        pids = pids[pids != 0].astype(np.int64)
        if len(pids) and pids.max() >= self.capacity:
            from .errors import CorruptMetadata
            raise CorruptMetadata(f"a directory names page {pids.max()}, beyond the page table")
        self.ref += np.bincount(pids, minlength=self.capacity).astype(self.ref.dtype)

    # -- directory operations (Python: per page, never per chunk)
    def prepare(self, directory: PagedArray, p0: int, p1: int, spacemap, allocate: bool) -> None:
        """Make directory slots p0..p1 point at loaded, exclusive pages.

        Missing pages are created when `allocate`; shared pages are shadowed.
        """
        d = directory.arr
        self.ensure_loaded(d[p0:p1 + 1][d[p0:p1 + 1] != 0])
        for pi in range(p0, p1 + 1):
            pid = int(d[pi])
            if pid == 0:
                if allocate:
                    d[pi] = self.allocate()
                    directory.mark_range(pi, pi + 1)
            elif self.ref[pid] > 1:
                self.shadow(directory, pi, spacemap)

    def shadow(self, directory: PagedArray, pi: int, spacemap) -> int:
        old = int(directory.arr[pi])
        new = self.allocate()
        _k_shadow(self.pages, old, new, spacemap)
        self.ref[old] -= 1
        directory.arr[pi] = new
        directory.mark_range(pi, pi + 1)
        self.counters["pages_shadowed"] += 1
        return new

    def share(self, directory: PagedArray) -> None:
        """One more reference to every page of a directory (snapshot, clone, rollback)."""
        pids = directory.arr[directory.nonzero_slots()].astype(np.int64)
        np.add.at(self.ref, pids, 1)

    def drop(self, directory: PagedArray, spacemap, p0: int = 0) -> None:
        """Drop the references of directory slots p0.. (destroy, rollback, shrink)."""
        slots = directory.nonzero_slots()
        for pid in directory.arr[slots[slots >= p0]].astype(np.int64).tolist():
            self.ref[pid] -= 1
            if self.ref[pid] == 0:
                self.ensure_loaded([pid])
                row = self.pages[pid]
                _k_ref(spacemap, row[row != 0], -1)
                self.pages[pid] = 0
                self.dirty[pid] = 0

    # -- commit
    def commit(self, generation: int) -> None:
        """Write dirty live pages to fresh blocks; free the blocks of dead pages."""
        store = self.store
        locs = self.locations
        dead = np.flatnonzero((self.ref == 0) & (locs.arr != 0))
        for pid in dead.tolist():
            store.free_later(int(locs.arr[pid]))
        locs.arr[dead] = 0
        locs.mark(dead)
        live = np.flatnonzero((self.dirty != 0) & (self.ref > 0))
        for pid in live.tolist():
            old = int(locs.arr[pid])
            if old:
                store.free_later(old)
            payload = self.pages[pid].astype("<u8", copy=False).tobytes()
            locs.arr[pid] = store.write_new(BT_MAP, payload, generation)
        locs.mark(live)
        self.counters["pages_written"] += len(live)
        self.dirty[:] = 0


def _k_shadow(pages, old, new, spacemap):
    spacemap.shadow_page(pages, old, new)


def _k_ref(spacemap, ids, delta):
    spacemap.ref_batch(ids, delta)
