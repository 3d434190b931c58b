"""Read-only access for online readers: a pinned committed generation, a device's map.

Check, dump, diff and the NBD diff context run while the pool is served. These are
the two public hooks they use, joined to Pool as a mixin (like datapath.py, hidden.py):

- `pinned_generation` keeps the committed metadata tree on disk intact while a reader
  walks it, with commits going on;
- `map_view` copies the part of a device's block map a diff compares.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from .errors import NoSuchDevice
from .format import BLOCK_SIZE, FANOUT, SUPERBLOCK_SLOTS


class MapView(NamedTuple):
    """Part of a device's block map (Pool.map_view): the shape thinstore.diff compares."""

    size: int              # bytes of the device this part covers
    chunk_size: int
    dirarr: np.ndarray     # uint64 page id per FANOUT virtual chunks, 0 = no page
    rows: object           # page ids (k,) -> their entries (k, FANOUT) uint64


class Readers:
    """Pool methods for readers that run beside the data path."""

    @contextlib.contextmanager
    def pinned_generation(self):
        """Hold the committed generation still while a reader walks it on disk.

        Yields the two superblock slots (2 x 4096 bytes, docs/format.md) as they are
        at entry; the tree the newer one names stays intact in ``meta`` until the
        block exits: commits go on, but no metadata block they free is reused before
        then (the way dm-thin's reserved metadata snapshot lets thin_dump run live).
        The lock is held only to read the slots; data chunks are not held (a reader
        of chunk contents holds a snapshot open instead).
        """
        with self.lock:
            self._check_open()
            fio = self.md.meta_fio
            slots = [fio.pread(BLOCK_SIZE, i * BLOCK_SIZE) for i in range(SUPERBLOCK_SLOTS)]
            self.md.store.pins += 1
        try:
            yield slots
        finally:
            with self.lock:
                self.md.store.unpin()

    def map_view(self, name: str, first_slot: int = 0, nslots: int | None = None) -> MapView:
        """A device's block map, or its part from directory slot `first_slot` (a slot
        maps FANOUT=508 chunks) for `nslots` slots, copied: what a diff compares.

        Call with ``pool.lock`` held for as long as ``rows`` is used: page ids name
        pages that a write may shadow and a destroy may free. NoSuchDevice if `name`
        is not a device; a receive's hidden workspace is one, by its hidden name.
        """
        try:
            dm = self._find(name)
        except NoSuchDevice:
            dm = self._hidden(name)
            if dm is None:
                raise
        d = dm.directory.arr
        end = len(d) if nslots is None else min(len(d), first_slot + nslots)
        first = min(first_slot, end)
        maps = self.md.maps

        def rows(ids):
            maps.ensure_loaded(ids)
            return maps.pages[ids.astype("int64")]

        span = FANOUT * self.md.chunk_size
        size = max(0, min(dm.size - first * span, (end - first) * span))
        return MapView(size, self.md.chunk_size, d[first:end].copy(), rows)
