"""The metadata block store: allocation and checked I/O of 4096-byte blocks in ``meta``.

Which blocks are in use is derived, not stored: at open, every block the committed
superblock reaches is marked used, and the rest are free. A block that the open
transaction replaces stays used until the commit that stops referencing it is on
disk (`free_later`), so a crash always finds the previous tree intact.
"""

from __future__ import annotations

import numpy as np

from .errors import CorruptMetadata
from .format import BLOCK_SIZE, HEADER_SIZE, SUPERBLOCK_SLOTS, open_block, seal_block

_GROW_MIN = 256


class MetaStore:
    def __init__(self, fio):
        self.fio = fio
        nblocks = max(fio.size() // BLOCK_SIZE, SUPERBLOCK_SLOTS)
        self.used = np.zeros(nblocks, dtype=bool)
        self.used[:SUPERBLOCK_SLOTS] = True
        self.pending: list[int] = []
        self.cursor = SUPERBLOCK_SLOTS
        self.blocks_written = 0
        self.pins = 0              # readers of a committed generation (Pool.pinned_generation)
        self.held: list[int] = []  # blocks freed while pinned: free again at the last unpin

    def mark_used(self, locations) -> None:
        locs = np.asarray(locations, dtype=np.int64)
        if not locs.size:
            return
        if locs.min() < SUPERBLOCK_SLOTS or locs.max() >= len(self.used):
            bad = locs[(locs < SUPERBLOCK_SLOTS) | (locs >= len(self.used))][0]
            raise CorruptMetadata(f"metadata points at block {bad}, outside the meta file")
        if self.used[locs].any() or len(np.unique(locs)) != len(locs):
            raise CorruptMetadata("two metadata structures claim the same block")
        self.used[locs] = True

    def read_block(self, location: int, btype: int) -> memoryview:
        if not SUPERBLOCK_SLOTS <= location < len(self.used):
            raise CorruptMetadata(f"metadata block {location} lies outside the meta file")
        return open_block(self.fio.pread(BLOCK_SIZE, location * BLOCK_SIZE), btype, location)

    def allocate(self) -> int:
        free = np.flatnonzero(~self.used[self.cursor:])
        if not len(free):
            free = np.flatnonzero(~self.used[SUPERBLOCK_SLOTS:]) + SUPERBLOCK_SLOTS - self.cursor
        if not len(free):
            self._grow()
            return self.allocate()
        loc = self.cursor + int(free[0])
        self.used[loc] = True
        self.cursor = loc + 1
        return loc

    def _grow(self) -> None:
        n = len(self.used)
        extra = max(_GROW_MIN, n // 4)
        self.used = np.concatenate([self.used, np.zeros(extra, dtype=bool)])
        self.fio.truncate((n + extra) * BLOCK_SIZE)

    def write_new(self, btype: int, payload: bytes, generation: int) -> int:
        """Write payload to a fresh block; return its location."""
        loc = self.allocate()
        block = bytearray(BLOCK_SIZE)
        block[HEADER_SIZE:HEADER_SIZE + len(payload)] = payload
        self.fio.pwrite(seal_block(block, btype, loc, generation), loc * BLOCK_SIZE)
        self.blocks_written += 1
        return loc

    def free_later(self, location: int) -> None:
        self.pending.append(location)

    def release_pending(self) -> None:
        """After a commit is durable: blocks the old tree used become free, unless a
        reader has pinned a generation: then they wait in `held` for the last unpin."""
        if self.pins:
            self.held += self.pending
            self.pending.clear()
        elif self.pending:
            self.used[np.asarray(self.pending, dtype=np.int64)] = False
            self.pending.clear()
        self.cursor = SUPERBLOCK_SLOTS

    def unpin(self) -> None:
        """One reader of a pinned generation is done; the last one frees what was held."""
        self.pins -= 1
        if not self.pins and self.held:
            self.used[np.asarray(self.held, dtype=np.int64)] = False
            self.held.clear()

    def free_count(self) -> int:
        return int(np.count_nonzero(~self.used))
