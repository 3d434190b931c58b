"""Transactions: loading the committed tree, and committing the open one atomically.

The committed state is whatever the valid superblock slot with the highest
generation reaches. Commit order (DESIGN §3), each step only ever writing blocks
that the committed tree does not reach:

1. map pages changed in this transaction, each to a fresh block;
2. data checksums of chunks written since the last commit (when enabled);
3. dirty leaves of the paged arrays (refcounts, checksums, page locations, the
   directories of the devices changed), then the tree nodes on their paths;
4. the device table leaves of the devices changed and their nodes; the root record
   (five tree roots and counters, docs/format.md) in a fresh block;
5. fsync ``data`` (started before step 1, run beside steps 1-4 where ``data`` is a
   real file) and ``meta``: everything the new superblock names is durable;
6. the superblock into the *other* slot (generation + 1, mmh3 checksum); fsync ``meta``;
7. only now: blocks and chunks the old tree used become free.

A crash before 6 completes leaves the old superblock valid; a torn write in 6 fails
its checksum and the other slot (the previous generation) is used.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import numpy as np

from . import format as fmt
from .blockmap import MapStore
from .errors import CorruptMetadata, OldFormat
from .metastore import MetaStore
from .paged import PagedArray, Tree, new_tree
from .spacemap import SpaceMap

log = logging.getLogger("thinstore")

FLAG_HIDDEN = 1

#: device ids are never reused; the device table is indexed by id, so a damaged
#: next id must not ask for an index beyond this (2**31 ids: a device a second for 68 years)
MAX_DEVICE_ID = 1 << 31


@dataclasses.dataclass
class DeviceMeta:
    """What the pool knows of one device. `directory` is its block map's first level."""
    dev_id: int
    uuid: bytes
    kind: str
    size: int
    created_ns: int
    origin_uuid: bytes
    name: str
    directory: PagedArray
    flags: int = 0
    opens: int = 0          # open Device handles (memory only)

    def __setattr__(self, key, value):
        if key == "opens":
            object.__setattr__(self, key, value)
            return
        self.__dict__["_packed"] = None      # its record bytes change with it
        table = self.__dict__.get("_table")
        if table is not None:
            table.changed.add(self.dev_id)   # its device table leaf is rewritten at commit
            if key == "directory":
                table._watch(self, value)
        if key not in _INDEXED:
            object.__setattr__(self, key, value)
            return
        if table is not None:
            table._unindex(self)
        object.__setattr__(self, key, value)
        if table is not None:
            table._index(self)

    @classmethod
    def from_record(cls, rec: fmt.DeviceRecord, directory: PagedArray) -> "DeviceMeta":
        """The device a record describes (what __init__ does, without a __setattr__ per
        field: opening a pool of 10,000 devices called it 100,000 times)."""
        dm = object.__new__(cls)
        dm.__dict__.update(dev_id=rec.dev_id, uuid=rec.uuid, kind=rec.kind, size=rec.size,
                           created_ns=rec.created_ns, origin_uuid=rec.origin_uuid,
                           name=rec.name, directory=directory, flags=rec.flags, opens=0)
        return dm

    @property
    def read_only(self) -> bool:
        return self.kind == "snapshot"

    def packed(self) -> bytes:
        """This device's record bytes (format.pack_device), kept until a field or its
        directory's root changes."""
        data = self.__dict__.get("_packed")
        if data is None:
            data = fmt.pack_device(self.record())
            self.__dict__["_packed"] = data
        return data

    def record(self) -> fmt.DeviceRecord:
        return fmt.DeviceRecord(self.dev_id, self.uuid, self.kind, self.size, self.created_ns,
                                self.origin_uuid, self.name, self.directory.root(), self.flags)


_INDEXED = ("name", "uuid", "flags")


class DeviceTable(dict):
    """dev_id -> DeviceMeta, with indexes by name and by uuid kept in step with every
    insertion, removal, rename or uuid change, so that a lookup costs the same with 10
    or 10,000 devices (a scan of the table per lookup made list and snapshot quadratic).

    Names and uuids are unique in a healthy pool, but a damaged one (dump, salvage) may
    repeat them: each index maps a key to {dev_id: DeviceMeta}, in insertion order.

    `changed` holds the ids whose record or directory changed since the last commit
    (added, removed, renamed, written through): a commit flushes those directories and
    rewrites their device table leaves, and nothing of the others.
    """

    def __init__(self):
        super().__init__()
        self._by_name: dict[str, dict[int, "DeviceMeta"]] = {}
        self._by_uuid: dict[bytes, dict[int, "DeviceMeta"]] = {}
        self._hidden: set[int] = set()
        self.changed: set[int] = set()

    def __setitem__(self, dev_id, dm) -> None:
        if dev_id in self:
            del self[dev_id]
        super().__setitem__(dev_id, dm)
        object.__setattr__(dm, "_table", self)
        self._index(dm)
        self._watch(dm, dm.directory)
        self.changed.add(dev_id)

    def __delitem__(self, dev_id) -> None:
        dm = self[dev_id]
        self._unindex(dm)
        object.__setattr__(dm, "_table", None)
        dm.directory.watch = None
        super().__delitem__(dev_id)
        self.changed.add(dev_id)

    def _watch(self, dm, directory) -> None:
        changed, dev_id = self.changed, dm.dev_id
        directory.watch = lambda: changed.add(dev_id)

    def named(self, name: str) -> list["DeviceMeta"]:
        """Every device called `name` (hidden ones included)."""
        return list(self._by_name.get(name, {}).values())

    def with_uuid(self, uuid: bytes) -> list["DeviceMeta"]:
        return list(self._by_uuid.get(uuid, {}).values())

    def hidden_count(self) -> int:
        return len(self._hidden)

    def _index(self, dm) -> None:
        if dm.flags & 1:        # FLAG_HIDDEN
            self._hidden.add(dm.dev_id)
        self._by_name.setdefault(dm.name, {})[dm.dev_id] = dm
        self._by_uuid.setdefault(dm.uuid, {})[dm.dev_id] = dm

    def _unindex(self, dm) -> None:
        self._hidden.discard(dm.dev_id)
        for index, key in ((self._by_name, dm.name), (self._by_uuid, dm.uuid)):
            group = index.get(key)
            if group is not None and group.get(dm.dev_id) is dm:
                del group[dm.dev_id]
                if not group:
                    del index[key]


def _start_fsync(fio):
    """Start `fio.fsync()` on a thread of its own when `fio` is a real file (it has a
    descriptor; os.fsync lets go of the GIL), and return the call that waits for it
    and raises what it raised. Other files (a RADOS object, the test doubles, which are
    not thread-safe) are synced by that call itself, in order, as before."""
    if not isinstance(getattr(fio, "fd", None), int):
        return fio.fsync
    failed: list = []

    def run() -> None:
        try:
            fio.fsync()
        except BaseException as e:      # noqa: BLE001 -- raised again by the waiter
            failed.append(e)

    thread = threading.Thread(target=run, name="thinstore-data-fsync", daemon=True)
    thread.start()

    def wait() -> None:
        thread.join()
        if failed:
            raise failed[0]
    return wait


def _join_quietly(wait) -> None:
    """Wait for a started fsync while another error is on its way out (the caller may
    close the file next); that error is the one to report."""
    if getattr(wait, "__self__", None) is None:      # a started thread, not fio.fsync
        try:
            wait()
        except BaseException:           # noqa: BLE001
            pass


def dir_length(size: int, chunk_shift: int) -> int:
    nchunks = (size + (1 << chunk_shift) - 1) >> chunk_shift
    return -(-nchunks // fmt.FANOUT)


class Metadata:
    """The in-memory image of the committed tree plus the open transaction."""

    def __init__(self, meta_fio, data_fio):
        self.meta_fio = meta_fio
        self.data_fio = data_fio
        self.store = MetaStore(meta_fio)
        self.sb: fmt.Superblock | None = None
        self.slot_warning: str | None = None
        self.root_blocks: list[int] = []
        self.devices: DeviceTable = DeviceTable()
        self.next_dev_id = 1
        self.low_water_pct = 90
        self.flags = 0
        self.commits = 0
        self.last_commit: dict[str, int] = {}   # the last commit's parts, ns (commit())
        self.reclaim = None      # called with the chunk ids a commit freed (reclaim.py)
        self.dev_tree = Tree(0)  # the device table's leaves (DEVS_PER_LEAF ids each)
        self.loaded_version = fmt.VERSION

    # ------------------------------------------------------------ creation
    @classmethod
    def format_new(cls, meta_fio, data_fio, chunk_size: int, capacity_chunks: int,
                   flags: int = 0, low_water_pct: int = 90) -> "Metadata":
        md = cls(meta_fio, data_fio)
        meta_fio.truncate(fmt.SUPERBLOCK_SLOTS * fmt.BLOCK_SIZE)
        md.store = MetaStore(meta_fio)
        md.flags = flags
        md.low_water_pct = low_water_pct
        md.sb = fmt.Superblock(0, chunk_size, capacity_chunks, fmt.new_uuid(), 0, 0, 0, 0)
        md.space = SpaceMap(PagedArray(np.uint32, capacity_chunks),
                            PagedArray(np.uint32, capacity_chunks))
        md.maps = MapStore(PagedArray(np.uint64, 64), md.store)
        md.commit()
        md.commit()   # both slots valid from the start: a bad slot later means damage
        return md

    @property
    def chunk_size(self) -> int:
        return self.sb.chunk_size

    @property
    def chunk_shift(self) -> int:
        return self.sb.chunk_size.bit_length() - 1

    @property
    def generation(self) -> int:
        return self.sb.generation

    # ------------------------------------------------------------ loading
    def load(self, upgrade: bool = False) -> None:
        """Read the committed tree. A pool of an older format raises OldFormat unless
        `upgrade`: then it is read, and the next commit writes it in this format."""
        self.sb = self._pick_superblock()
        root = fmt.unpack_root(self._read_root_chain())
        self.loaded_version = root.version
        if root.version != fmt.VERSION and not upgrade:
            raise OldFormat(f"its metadata is in format {root.version}; this thinstore "
                            f"reads format {fmt.VERSION}")
        store = self.store
        store.mark_used(self.root_blocks)
        self.flags = root.flags
        self.low_water_pct = root.low_water_pct
        self.next_dev_id = root.next_dev_id
        cap = self.sb.capacity_chunks
        refs = self._load_array(np.uint32, root.refcounts, "refcount table", cap)
        sums = self._load_array(np.uint32, root.checksums, "checksum table", cap)
        self.space = SpaceMap(refs, sums)
        locs = self._load_array(np.uint64, root.page_locations, "page table")
        self.maps = MapStore(locs, store)
        store.mark_used(locs.arr[locs.arr != 0])
        records = root.devices if root.version == 1 else self._load_device_table(root)
        dir_blocks = []          # marked once for all: a per-device check cost O(n) each
        for rec in records:
            try:
                d = PagedArray.load(np.uint64, rec.directory, store,
                                    expect=dir_length(rec.size, self.chunk_shift))
            except CorruptMetadata as e:
                raise CorruptMetadata(f"device {rec.name}: directory: {e}") from None
            dir_blocks.append(d.block_locations())
            self.devices[rec.dev_id] = DeviceMeta.from_record(rec, d)
        if dir_blocks:
            store.mark_used(np.concatenate(dir_blocks))
        if root.version == 1:        # the upgrade's commit writes every leaf of the table
            self.dev_tree = new_tree(self._dev_leaves_for(self.next_dev_id))
            self.dev_tree.rebuild = True
        else:
            self.devices.changed.clear()
        self.maps.derive_refs([d.directory for d in self.devices.values()])
        orphans = np.flatnonzero((self.maps.ref > 0) & (self.maps.locations.arr == 0))
        if len(orphans):
            raise CorruptMetadata(f"map page {orphans[0]} is referenced but has no block")

    def _load_device_table(self, root: fmt.RootRecord) -> list:
        """The device records under the device table's tree, in id order."""
        table = root.device_table
        if root.next_dev_id > MAX_DEVICE_ID or \
                table.length > self._dev_leaves_for(root.next_dev_id):
            raise CorruptMetadata(f"device table of {table.length} leaves for "
                                  f"{root.next_dev_id} ids")
        self.dev_tree = new_tree(table.length)
        self.dev_tree.load(table.root, self.store)
        records = []
        for i in np.flatnonzero(self.dev_tree.leaves).tolist():
            loc = int(self.dev_tree.leaves[i])
            for rec in fmt.unpack_device_leaf(self.store.read_block(loc, fmt.BT_DEVICES)):
                if rec.dev_id // fmt.DEVS_PER_LEAF != i or rec.dev_id >= root.next_dev_id:
                    raise CorruptMetadata(f"device table leaf {loc} holds device id "
                                          f"{rec.dev_id}, not one of its own")
                records.append(rec)
        self.store.mark_used(self.dev_tree.locations())
        if len(records) != root.device_count:
            raise CorruptMetadata(f"device table holds {len(records)} devices, the root "
                                  f"record says {root.device_count}")
        return records

    @staticmethod
    def _dev_leaves_for(next_dev_id: int) -> int:
        """Device table leaves for ids below `next_dev_id`, rounded up to whole nodes so
        that the tree is reshaped once per FANOUT leaves, not once per leaf."""
        n = -(-next_dev_id // fmt.DEVS_PER_LEAF)
        return -(-n // fmt.FANOUT) * fmt.FANOUT

    def _load_array(self, dtype, root, what: str, expect: int | None = None) -> PagedArray:
        try:
            arr = PagedArray.load(dtype, root, self.store, expect=expect)
        except CorruptMetadata as e:
            raise CorruptMetadata(f"{what}: {e}") from None
        self.store.mark_used(arr.block_locations())
        return arr

    def _pick_superblock(self) -> fmt.Superblock:
        found, errors = [], []
        for slot in range(fmt.SUPERBLOCK_SLOTS):
            raw = self.meta_fio.pread(fmt.BLOCK_SIZE, slot * fmt.BLOCK_SIZE)
            try:
                found.append(fmt.unpack_superblock(raw, slot))
            except CorruptMetadata as e:
                errors.append(str(e))
        if not found:
            raise CorruptMetadata("no valid superblock: " + "; ".join(errors))
        found.sort(key=lambda sb: sb.generation, reverse=True)
        if errors:
            self.slot_warning = f"{errors[0]}; using generation {found[0].generation}"
            log.warning("superblock: %s", self.slot_warning)
        return found[0]

    def _read_root_chain(self) -> bytes:
        sb = self.sb
        parts, loc, total = [], sb.root_location, 0
        self.root_blocks = []
        while loc:
            if len(self.root_blocks) > sb.root_length // fmt.CHAIN_DATA + 1:
                raise CorruptMetadata("root record chain is longer than its length")
            self.root_blocks.append(loc)
            loc, data = fmt.unpack_chain_payload(self.store.read_block(loc, fmt.BT_ROOT))
            parts.append(data)
            total += len(data)
        data = b"".join(parts)
        if len(data) != sb.root_length or fmt.checksum(data) != sb.root_checksum:
            raise CorruptMetadata("root record does not match its superblock (length or checksum)")
        return data

    # ------------------------------------------------------------ commit
    def commit(self, checksum_hook=None) -> None:
        """Steps 1-7 of the module docstring, in that order, except that the data
        file's fsync of step 5 starts first, on a thread of its own, and runs while
        steps 1-4 build the tree (they write only ``meta``, and every data write the
        tree names was issued before: the caller holds the pool lock); step 6 still
        waits for it. `last_commit` then holds how long each part took, in ns:
        ``tree`` (steps 1-4), ``data_sync`` (what was left of the data fsync once the
        tree was written), ``meta_sync`` (the rest of step 5), ``superblock`` (step 6
        with its fsync) and ``release`` (step 7)."""
        clock = time.perf_counter_ns
        t0 = clock()
        self.space.freeze()
        try:
            data_synced = _start_fsync(self.data_fio)   # step 5's first half, beside 1-4
            try:
                sb = self.write_tree(checksum_hook)
            except BaseException:
                _join_quietly(data_synced)
                raise
            t1 = clock()
            data_synced()
            t2 = clock()
            self.meta_fio.fsync()
            t3 = clock()
            self.write_superblock(sb)
            self.meta_fio.fsync()
            t4 = clock()
            self.release(sb)
        finally:
            self.space.thaw()
        self.last_commit = {"tree": t1 - t0, "data_sync": t2 - t1, "meta_sync": t3 - t2,
                            "superblock": t4 - t3, "release": clock() - t4}

    def write_tree(self, checksum_hook=None) -> fmt.Superblock:
        """Steps 1-4: the new tree in free blocks; returns the superblock naming it."""
        gen = self.sb.generation + 1
        store = self.store
        self.maps.commit(gen)
        if checksum_hook is not None:
            checksum_hook(gen)
        self.space.commit_prepare()
        for arr in (self.space.refs, self.space.sums, self.maps.locations):
            arr.flush(store, gen)
        table = self._write_device_table(gen)
        root = fmt.RootRecord(self.space.refs.root(), self.space.sums.root(),
                              self.maps.locations.root(), self.next_dev_id, [],
                              self.low_water_pct, self.flags, table, len(self.devices))
        data = fmt.pack_root(root)
        for loc in self.root_blocks:
            store.free_later(loc)
        self.root_blocks = self._write_root_chain(data, gen)
        return self.sb._replace(generation=gen, root_location=self.root_blocks[0],
                                root_length=len(data), root_checksum=fmt.checksum(data),
                                commit_time_ns=time.time_ns(), version=fmt.VERSION)

    def _write_device_table(self, gen: int) -> fmt.TreeRoot:
        """The directories of changed devices, then their device table leaves and the
        nodes above them: a commit costs the devices it changed, not the device count."""
        store, devices, tree = self.store, self.devices, self.dev_tree
        changed = devices.changed
        for dev_id in sorted(changed):
            dm = devices.get(dev_id)
            if dm is not None and dm.directory.flush(store, gen):
                dm.__dict__["_packed"] = None
        want = self._dev_leaves_for(self.next_dev_id)
        if want != len(tree.leaves):
            tree.resize(want)
        per = fmt.DEVS_PER_LEAF
        for li in sorted({i // per for i in changed}):
            recs = [devices[i].packed() for i in range(li * per, li * per + per) if i in devices]
            old = int(tree.leaves[li])
            if old:
                store.free_later(old)
            loc = store.write_new(fmt.BT_DEVICES, fmt.pack_device_leaf(recs), gen) if recs else 0
            if loc or old:
                tree.set_leaf(li, loc)
        changed.clear()
        tree.flush(store, gen)
        return fmt.TreeRoot(len(tree.leaves), tree.top())

    def mark_all(self) -> None:
        """Every structure is rewritten by the next commit (repair, upgrade)."""
        self.devices.changed.update(self.devices.keys())
        self.dev_tree.rebuild = True
        for arr in [self.space.refs, self.space.sums, self.maps.locations] + \
                [d.directory for d in self.devices.values()]:
            arr.mark_all()

    def sync(self) -> None:
        """Step 5: every block the new superblock will name is durable."""
        self.data_fio.fsync()
        self.meta_fio.fsync()

    def write_superblock(self, sb: fmt.Superblock) -> None:
        """Step 6 (without its fsync): the other slot, so the previous one stays whole."""
        data = fmt.pack_superblock(sb)
        offset = (sb.generation % fmt.SUPERBLOCK_SLOTS) * fmt.BLOCK_SIZE
        put = getattr(self.meta_fio, "write_superblock", None)   # test doubles: pwrite
        if put is not None:
            put(data, offset, sb.generation)
        else:
            self.meta_fio.pwrite(data, offset)

    def release(self, sb: fmt.Superblock) -> None:
        """Step 7, once `sb` is durable: what the old tree used becomes free."""
        self.sb = sb
        self.store.release_pending()
        self.space.commit_done(self.data_fio, self.chunk_shift, self.reclaim)
        self.commits += 1

    def _write_root_chain(self, data: bytes, gen: int) -> list[int]:
        pieces = [data[i:i + fmt.CHAIN_DATA] for i in range(0, len(data), fmt.CHAIN_DATA)] or [b""]
        locs = [self.store.allocate() for _ in pieces]
        for i, piece in enumerate(pieces):
            nxt = locs[i + 1] if i + 1 < len(locs) else 0
            block = bytearray(fmt.BLOCK_SIZE)
            payload = fmt.pack_chain_payload(nxt, piece)
            block[fmt.HEADER_SIZE:fmt.HEADER_SIZE + len(payload)] = payload
            self.meta_fio.pwrite(fmt.seal_block(block, fmt.BT_ROOT, locs[i], gen),
                                 locs[i] * fmt.BLOCK_SIZE)
        return locs
