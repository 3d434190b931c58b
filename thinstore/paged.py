"""Paged arrays: a numpy array kept in memory and persisted as metadata leaves.

A `PagedArray` is the unit of copy-on-write for flat metadata (chunk refcounts,
chunk checksums, map page locations, device directories). Its leaves are metadata
blocks holding PAYLOAD_SIZE bytes of the array each. Commit writes only the leaves
marked dirty, each to a fresh block, and hands the block it replaces back to the
allocator as freed-after-commit, so the committed tree is never overwritten. An
all-zero leaf is not stored (location 0) — a 1 TiB sparse volume costs nothing.
"""

from __future__ import annotations

import numpy as np

from .errors import CorruptMetadata
from .format import BT_LEAF, PAYLOAD_SIZE, ArrayRoot


class PagedArray:
    def __init__(self, dtype, length: int, leaves=None):
        self.dtype = np.dtype(dtype)
        self.per_leaf = PAYLOAD_SIZE // self.dtype.itemsize
        self.arr = np.zeros(length, dtype=self.dtype)
        n = self.nleaves_for(length)
        self.leaves = np.zeros(n, dtype=np.uint64) if leaves is None else np.array(leaves, dtype=np.uint64)
        if len(self.leaves) != n:
            raise ValueError("leaf count does not match length")
        self.dirty = np.zeros(n, dtype=bool)
        self._dropped = ()

    def nleaves_for(self, length: int) -> int:
        return -(-length // self.per_leaf)

    def __len__(self) -> int:
        return len(self.arr)

    @classmethod
    def load(cls, dtype, root: ArrayRoot, store) -> "PagedArray":
        """Read every stored leaf of `root` through the metadata store.

        A root whose leaf count does not fit its length is damage, reported as such
        (the count also bounds the memory a damaged length could ask for).
        """
        per_leaf = PAYLOAD_SIZE // np.dtype(dtype).itemsize
        if root.length < 0 or -(-root.length // per_leaf) != len(root.leaves):
            raise CorruptMetadata(f"a table of {root.length} entries cannot have "
                                  f"{len(root.leaves)} leaves")
        pa = cls(dtype, root.length, root.leaves)
        for i, loc in enumerate(pa.leaves.tolist()):
            if loc:
                payload = store.read_block(loc, BT_LEAF)
                lo = i * pa.per_leaf
                hi = min(lo + pa.per_leaf, len(pa.arr))
                pa.arr[lo:hi] = np.frombuffer(payload, dtype=pa.dtype, count=hi - lo)
        return pa

    def copy(self) -> "PagedArray":
        """A new array with the same contents, all of it dirty (it has no blocks yet)."""
        pa = PagedArray(self.dtype, len(self.arr))
        pa.arr[:] = self.arr
        pa.dirty[:] = True
        return pa

    def mark(self, indices) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size:
            self.dirty[idx // self.per_leaf] = True

    def mark_range(self, lo: int, hi: int) -> None:
        if hi > lo:
            self.dirty[lo // self.per_leaf:(hi - 1) // self.per_leaf + 1] = True

    def resize(self, length: int) -> None:
        old = len(self.arr)
        arr = np.zeros(length, dtype=self.dtype)
        arr[:min(old, length)] = self.arr[:min(old, length)]
        self.arr = arr
        n = self.nleaves_for(length)
        leaves = np.zeros(n, dtype=np.uint64)
        dirty = np.zeros(n, dtype=bool)
        keep = min(n, len(self.leaves))
        leaves[:keep] = self.leaves[:keep]
        dirty[:keep] = self.dirty[:keep]
        self._dropped = self.leaves[keep:].copy()
        self.leaves, self.dirty = leaves, dirty
        if keep:
            self.dirty[keep - 1] = True   # a shrunk or grown last leaf changes
        self.dirty[keep:] = True

    def flush(self, store, generation: int) -> bool:
        """Write dirty leaves to fresh blocks; old blocks are freed after commit.
        Returns whether any leaf location changed (the array's root with it)."""
        if not len(self._dropped) and not self.dirty.any():
            return False
        for loc in self._dropped:
            if loc:
                store.free_later(int(loc))
        self._dropped = ()
        for i in np.flatnonzero(self.dirty).tolist():
            lo = i * self.per_leaf
            chunk = self.arr[lo:lo + self.per_leaf]
            old = int(self.leaves[i])
            if old:
                store.free_later(old)
            if not chunk.any():
                self.leaves[i] = 0
                continue
            payload = chunk.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            self.leaves[i] = store.write_new(BT_LEAF, payload, generation)
        self.dirty[:] = False
        return True

    def release(self, store) -> None:
        """Free every block of this array after commit (the array is being dropped)."""
        for loc in list(self.leaves.tolist()) + [int(x) for x in self._dropped]:
            if loc:
                store.free_later(int(loc))
        self.leaves[:] = 0

    def root(self) -> ArrayRoot:
        return ArrayRoot(len(self.arr), self.leaves.copy())

    def block_locations(self) -> np.ndarray:
        return self.leaves[self.leaves != 0]
