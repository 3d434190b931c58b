"""Paged arrays: a numpy array kept in memory and persisted as a copy-on-write tree.

A `PagedArray` is the unit of copy-on-write for flat metadata (chunk refcounts,
chunk checksums, map page locations, device directories). Its leaves are metadata
blocks holding PAYLOAD_SIZE bytes of the array each; above them a `Tree` of interior
nodes (FANOUT block numbers each, format 2: docs/format.md) leads to one top block, so
that a root costs 16 bytes whatever the array's length — the anchor is dm-thin's
btrees, whose commits write only the changed nodes.

Commit writes only the leaves marked dirty, each to a fresh block, and then the nodes on
their paths to the top; every block replaced goes back to the allocator as
freed-after-commit, so the committed tree is never overwritten. An all-zero leaf or
subtree is not stored (location 0): a 1 PiB sparse volume costs nothing. In memory the
array stays one dense numpy array (the native kernels index it directly); its pages are
allocated zero by the operating system and become resident only where written.
"""

from __future__ import annotations

import functools
import mmap

import numpy as np

from .errors import CorruptMetadata
from .format import BT_LEAF, BT_NODE, FANOUT, PAYLOAD_SIZE, ArrayRoot, TreeRoot, tree_depth

#: the most entries a stored array may claim: a damaged length must not ask for
#: terabytes of address space before it is found out (2**34 u64 = 128 GiB virtual).
MAX_ENTRIES = 1 << 34


_MAPPED = 1 << 20


def zeros(shape, dtype) -> np.ndarray:
    """A zero array whose memory becomes resident only where it is written.

    Large ones are anonymous mappings of their own: numpy's allocator asks the kernel for
    transparent huge pages on arrays over 4 MiB, which makes the first write anywhere in
    a 2 MiB span resident whole (a snapshot of a 100 TiB sparse volume cost 2 MiB of RSS
    and 7 ms of page zeroing for one written directory leaf)."""
    dtype = np.dtype(dtype)
    count = shape if isinstance(shape, int) else shape[0] * shape[1]
    nbytes = count * dtype.itemsize
    if nbytes < _MAPPED:
        return np.zeros(shape, dtype=dtype)
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                        | getattr(mmap, "MAP_NORESERVE", 0))
    except OSError as e:
        raise MemoryError(f"cannot map {nbytes} bytes: {e}") from None
    return np.frombuffer(buf, dtype=dtype, count=count).reshape(shape)


@functools.lru_cache(maxsize=4096)     # 10,000 snapshots of a volume share one shape
def _shape(nleaves: int) -> tuple[int, ...]:
    """Entries per level: level 0 the leaves, the last level one entry (the top)."""
    sizes = [nleaves]
    for _ in range(tree_depth(nleaves)):
        sizes.append(-(-sizes[-1] // FANOUT))
    return tuple(sizes)


def new_tree(nleaves: int) -> "Tree":
    """A Tree for a leaf count read from disk: one that cannot be held is damage."""
    try:
        return Tree(nleaves)
    except MemoryError:
        raise CorruptMetadata(f"a table claims {nleaves} leaves, more than memory "
                              "can hold") from None


class Tree:
    """The interior nodes over a row of leaf blocks.

    `levels[0][i]` is the block of leaf i (0: none); `levels[k][j]` (k >= 1) the block of
    the node over entries j*FANOUT .. j*FANOUT+FANOUT-1 of level k-1; the last level has
    one entry, the top. With one leaf the leaf itself is the top (depth 0).
    """

    def __init__(self, nleaves: int):
        shape = _shape(nleaves)
        if len(shape) == 1 and nleaves < 4096:          # one leaf: most directories
            self.levels = [np.zeros(nleaves, dtype=np.uint64)]
        else:
            self.levels = [zeros(n, np.uint64) for n in shape]
        self.stale = [set() for _ in self.levels]      # node indices to rewrite, per level
        self.rebuild = False      # every node is rewritten (after a resize or an upgrade)
        self._old_nodes: list[np.ndarray] = []    # blocks of nodes a resize replaced

    @property
    def leaves(self) -> np.ndarray:
        return self.levels[0]

    @property
    def depth(self) -> int:
        return len(self.levels) - 1

    def top(self) -> int:
        top = self.levels[-1]
        return int(top[0]) if len(top) else 0

    def set_leaf(self, i: int, loc: int) -> None:
        self.levels[0][i] = loc
        for k in range(1, len(self.levels)):
            i //= FANOUT
            self.stale[k].add(i)

    def needs_flush(self) -> bool:
        return self.rebuild or any(self.stale[1:])

    def resize(self, nleaves: int) -> None:
        """A new leaf count; the nodes are all rewritten at the next flush."""
        leaves = np.zeros(nleaves, dtype=np.uint64)
        keep = min(nleaves, len(self.levels[0]))
        leaves[:keep] = self.levels[0][:keep]
        self._old_nodes.append(self.node_locations())
        self.levels = [leaves] + [np.zeros(n, dtype=np.uint64) for n in _shape(nleaves)[1:]]
        self.stale = [set() for _ in self.levels]
        self.rebuild = True

    def flush(self, store, generation: int) -> None:
        """Write the stale nodes (all of them on a rebuild) bottom up to fresh blocks."""
        if self.rebuild:
            for locs in self._old_nodes + [self.node_locations()]:
                for loc in locs.tolist():
                    store.free_later(int(loc))
            self._old_nodes = []
            for k in range(1, len(self.levels)):
                self.levels[k][:] = 0
        for k in range(1, len(self.levels)):
            below, here = self.levels[k - 1], self.levels[k]
            if self.rebuild:
                todo = np.unique(np.flatnonzero(below) // FANOUT).tolist()
            else:
                todo = sorted(self.stale[k])
            for j in todo:
                old = int(here[j])
                if old:
                    store.free_later(old)
                kids = below[j * FANOUT:(j + 1) * FANOUT]
                if not kids.any():
                    here[j] = 0
                    continue
                payload = np.zeros(FANOUT, dtype="<u8")
                payload[:len(kids)] = kids
                here[j] = store.write_new(BT_NODE, payload.tobytes(), generation)
            self.stale[k].clear()
        self.rebuild = False

    def load(self, top: int, store, on_error=None) -> None:
        """Read the nodes under `top`, filling every level down to the leaves' blocks.

        A node that cannot be read raises CorruptMetadata, or with `on_error` is handed
        to it as on_error(first_leaf, leaves_spanned, location, error) and its subtree
        reads as absent (salvage)."""
        if self.depth == 0:
            if len(self.levels[0]):
                self.levels[0][0] = top
            elif top:
                e = CorruptMetadata("an empty table names a block")
                if on_error is None:
                    raise e
                on_error(0, 0, top, e)
            return
        self.levels[-1][0] = top
        for k in range(self.depth, 0, -1):
            below, here = self.levels[k - 1], self.levels[k]
            for j in np.flatnonzero(here).tolist():
                loc = int(here[j])
                lo = j * FANOUT
                hi = min(lo + FANOUT, len(below))
                try:
                    kids = np.frombuffer(store.read_block(loc, BT_NODE), dtype="<u8",
                                         count=FANOUT)
                    if kids[hi - lo:].any():
                        raise CorruptMetadata(f"tree node {loc} names blocks past the end "
                                              "of its table")
                except CorruptMetadata as e:
                    if on_error is None:
                        raise
                    on_error(lo * FANOUT ** (k - 1), FANOUT ** k, loc, e)
                    here[j] = 0
                    self.rebuild = True
                    continue
                below[lo:hi] = kids[:hi - lo]

    def node_locations(self) -> np.ndarray:
        if len(self.levels) == 1:
            return np.zeros(0, dtype=np.uint64)
        nodes = np.concatenate(self.levels[1:])
        return nodes[nodes != 0]

    def locations(self) -> np.ndarray:
        """Every block of the tree: leaves and nodes."""
        leaves = self.levels[0]
        if len(self.levels) == 1 and len(leaves) <= 1:      # the common small table
            return leaves.copy() if len(leaves) and leaves[0] else leaves[:0].copy()
        return np.concatenate([leaves[leaves != 0], self.node_locations()])


class PagedArray:
    def __init__(self, dtype, length: int):
        self.dtype = np.dtype(dtype)
        self.per_leaf = PAYLOAD_SIZE // self.dtype.itemsize
        self.arr = zeros(length, self.dtype)
        self.tree = Tree(self.nleaves_for(length))
        self.dirty: set[int] = set()       # leaves to rewrite at the next flush
        self._dropped: list[int] = []      # leaf blocks cut off by a shrink
        self.watch = None                  # called when a clean array is first marked
        self._nz = None                    # nonzero_slots(), until the next mark
        # whether every change is marked when made (directories); the space map's arrays
        # are changed by the kernels and marked only at commit (SpaceMap.commit_prepare)
        self.exact_marks = True

    def nleaves_for(self, length: int) -> int:
        return -(-length // self.per_leaf)

    def __len__(self) -> int:
        return len(self.arr)

    @property
    def leaves(self) -> np.ndarray:
        """The block of each leaf (0: none stored)."""
        return self.tree.leaves

    @classmethod
    def load(cls, dtype, root, store, expect: int | None = None, on_error=None) -> "PagedArray":
        """Read the array under `root` (a TreeRoot, or a format-1 ArrayRoot whose nodes
        the next flush writes) through the metadata store.

        `expect`: the length the caller knows it must have. A length that does not fit
        (a leaf count that does not match, or past MAX_ENTRIES) is damage, reported as
        CorruptMetadata before any memory is asked for it. `on_error` as Tree.load, and
        also for unreadable leaves (their entries read as zero)."""
        length = root.length
        if length < 0 or length > MAX_ENTRIES or (expect is not None and length != expect):
            raise CorruptMetadata(f"a table claims {length} entries"
                                  + (f", {expect} expected" if expect is not None else ""))
        try:
            pa = cls(dtype, length)
        except MemoryError:
            raise CorruptMetadata(f"a table claims {length} entries, more than memory "
                                  "can hold") from None
        if isinstance(root, ArrayRoot):
            if len(root.leaves) != len(pa.leaves):
                raise CorruptMetadata(f"a table of {length} entries cannot have "
                                      f"{len(root.leaves)} leaves")
            pa.leaves[:] = root.leaves
            pa.tree.rebuild = True
        else:
            pa.tree.load(root.root, store, on_error)
        leaves = pa.leaves
        stored = ([0] if leaves[0] else []) if len(leaves) == 1 else np.flatnonzero(leaves).tolist()
        for i in stored:
            loc = int(leaves[i])
            lo = i * pa.per_leaf
            hi = min(lo + pa.per_leaf, length)
            try:
                payload = store.read_block(loc, BT_LEAF)
            except CorruptMetadata as e:
                if on_error is None:
                    raise
                on_error(i, 1, loc, e)
                pa.leaves[i] = 0
                pa.dirty.add(i)
                continue
            pa.arr[lo:hi] = np.frombuffer(payload, dtype=pa.dtype, count=hi - lo)
        return pa

    def populated(self) -> np.ndarray:
        """Indices of the leaves that may hold a nonzero entry (stored or dirty)."""
        stored = np.flatnonzero(self.leaves)
        if not self.dirty:
            return stored
        return np.union1d(stored, np.fromiter(self.dirty, dtype=np.int64, count=len(self.dirty)))

    def nonzero_slots(self) -> np.ndarray:
        """Indices of the nonzero entries, sorted; costs the stored leaves, not the length.
        Kept until the array is next marked (valid for arrays with exact marks)."""
        nz = self._nz
        if nz is None:
            if len(self.arr) <= self.per_leaf * 8:
                nz = np.flatnonzero(self.arr)
            else:
                nz = self._nonzero_slots()
            self._nz = nz if self.exact_marks else None
        return nz

    def _nonzero_slots(self) -> np.ndarray:
        out = []
        for i in self.populated().tolist():
            lo = i * self.per_leaf
            hits = np.flatnonzero(self.arr[lo:lo + self.per_leaf])
            if len(hits):
                out.append(hits + lo)
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def copy(self) -> "PagedArray":
        """A new array with the same contents; the leaves holding data are dirty (they have
        no blocks yet). Costs the populated leaves, not the length."""
        pa = PagedArray(self.dtype, len(self.arr))
        live = self.populated().tolist()
        for i in live:
            lo = i * self.per_leaf
            pa.arr[lo:lo + self.per_leaf] = self.arr[lo:lo + self.per_leaf]
        pa.dirty.update(live)
        return pa

    def _touch(self, leaves) -> None:
        self._nz = None
        if not self.dirty and self.watch is not None:
            self.watch()
        self.dirty.update(leaves)

    def mark(self, indices) -> None:
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size:
            self._touch(np.unique(idx // self.per_leaf).tolist())

    def mark_all(self) -> None:
        """Every leaf is rewritten at the next flush (a rebuilt table: restore, repair)."""
        self._touch(range(len(self.leaves)))

    def mark_range(self, lo: int, hi: int) -> None:
        if hi > lo:
            self._touch(range(lo // self.per_leaf, (hi - 1) // self.per_leaf + 1))

    def resize(self, length: int) -> None:
        self._nz = None
        old = len(self.arr)
        arr = zeros(length, self.dtype)
        keep_entries = min(old, length)
        if not self.exact_marks:
            arr[:keep_entries] = self.arr[:keep_entries]
        for i in self.populated().tolist() if self.exact_marks else ():   # not every zero
            lo = i * self.per_leaf
            if lo < keep_entries:
                hi = min(lo + self.per_leaf, keep_entries)
                arr[lo:hi] = self.arr[lo:hi]
        self.arr = arr
        n = self.nleaves_for(length)
        keep = min(n, len(self.leaves))
        cut = self.leaves[keep:]
        self._dropped.extend(int(x) for x in cut[cut != 0])
        self.dirty = {i for i in self.dirty if i < n}
        self.tree.resize(n)
        if keep:
            self._touch([keep - 1])    # a shrunk or grown last leaf changes
        elif self.watch is not None:
            self.watch()

    def flush(self, store, generation: int) -> bool:
        """Write dirty leaves to fresh blocks, then the nodes above them; old blocks are
        freed after commit. Returns whether the top block may have changed."""
        tree = self.tree
        if not self.dirty and not self._dropped and not tree.needs_flush():
            return False
        for loc in self._dropped:
            store.free_later(loc)
        self._dropped = []
        leaves = tree.leaves
        for i in sorted(self.dirty):
            lo = i * self.per_leaf
            chunk = self.arr[lo:lo + self.per_leaf]
            old = int(leaves[i])
            if old:
                store.free_later(old)
            if not chunk.any():
                if old:
                    tree.set_leaf(i, 0)
                continue
            payload = chunk.astype(self.dtype.newbyteorder("<"), copy=False).tobytes()
            tree.set_leaf(i, store.write_new(BT_LEAF, payload, generation))
        self.dirty.clear()
        tree.flush(store, generation)
        return True

    def release(self, store) -> None:
        """Free every block of this array after commit (the array is being dropped)."""
        for loc in self.tree.locations().tolist() + self._dropped:
            store.free_later(int(loc))
        for locs in self.tree._old_nodes:
            for loc in locs.tolist():
                store.free_later(int(loc))
        self.tree = Tree(len(self.tree.leaves))
        self._dropped = []

    def root(self) -> TreeRoot:
        return TreeRoot(len(self.arr), self.tree.top())

    def block_locations(self) -> np.ndarray:
        return self.tree.locations()
