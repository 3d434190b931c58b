"""A tolerant loader of the committed metadata, for check, repair and dump.

`Metadata.load` stops at the first damaged block, which is what opening a pool must
do. Check, repair and dump need the whole picture instead: `salvage` reads every
structure it can reach, replaces what it cannot read by "nothing there" (a zero leaf,
a missing page) and records each such loss as a `Problem` naming the device and byte
range it costs. It never writes. What it returns is an ordinary `Metadata` whose
block store marks every readable block of the old tree as used, so a repair commit
writes the new tree beside the old one and a crash during repair loses nothing.

Slots are tried newest first: when the newest superblock's tree cannot be read at all
(its root record is gone), the previous generation is used, and that is reported.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from . import format as fmt
from .blockmap import MapStore
from .errors import CorruptMetadata
from .metadata import MAX_DEVICE_ID, DeviceMeta, Metadata, dir_length
from .metastore import MetaStore
from .paged import MAX_ENTRIES, PagedArray, new_tree
from .spacemap import SpaceMap

# damage classes, most severe first; check's exit code is that of the worst one found
DAMAGE_CODES = {"unreadable": 20, "metadata": 21, "range": 22, "refcount": 23,
                "leak": 24, "superblock": 25, "checksum": 26}


@dataclasses.dataclass
class Problem:
    kind: str                  # a key of DAMAGE_CODES
    message: str
    device: str | None = None
    offset: int | None = None  # byte offset in the device
    length: int | None = None
    chunk: int | None = None   # data chunk id
    block: int | None = None   # metadata block

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class Salvage:
    md: Metadata | None
    problems: list
    slots: list                 # per slot: "generation N" or the reason it is unusable
    lost_pages: dict = dataclasses.field(default_factory=dict)   # page id -> reason


def read_slots(meta_fio) -> tuple[list, list]:
    """(valid superblocks newest first, per-slot description)."""
    found, desc = [], []
    for slot in range(fmt.SUPERBLOCK_SLOTS):
        raw = meta_fio.pread(fmt.BLOCK_SIZE, slot * fmt.BLOCK_SIZE)
        try:
            sb = fmt.unpack_superblock(raw, slot)
            found.append(sb)
            desc.append(f"slot {slot}: generation {sb.generation}")
        except CorruptMetadata as e:
            desc.append(str(e))
    found.sort(key=lambda s: s.generation, reverse=True)
    return found, desc


def salvage(meta_fio, data_fio) -> Salvage:
    """Load what can be loaded; never raises CorruptMetadata (it becomes a Problem)."""
    found, desc = read_slots(meta_fio)
    problems = [Problem("superblock", d) for d in desc if not d.startswith("slot ")]
    if not found:
        problems.append(Problem("unreadable", "no valid superblock in either slot: restore "
                                "the metadata from a dump ('thinstore restore')"))
        return Salvage(None, problems, desc)
    for i, sb in enumerate(found):
        md = Metadata(meta_fio, data_fio)
        md.sb = sb
        try:
            root = fmt.unpack_root(md._read_root_chain())
        except CorruptMetadata as e:
            problems.append(Problem("metadata", f"generation {sb.generation}: {e}"))
            continue
        if i:
            problems.append(Problem("superblock", f"the newest generation is unreadable; "
                                    f"using generation {sb.generation}"))
        sv = Salvage(md, problems, desc)
        _fill(sv, root)
        return sv
    problems.append(Problem("unreadable", "no superblock leads to a readable root record: "
                            "restore the metadata from a dump ('thinstore restore')"))
    return Salvage(None, problems, desc)


def _fill(sv: Salvage, root: fmt.RootRecord) -> None:
    md = sv.md
    md.store = MetaStore(md.meta_fio)
    _claim(sv, md.root_blocks, "root record")
    md.flags, md.low_water_pct, md.next_dev_id = root.flags, root.low_water_pct, root.next_dev_id
    md.loaded_version = root.version
    cap = md.sb.capacity_chunks
    refs = _array(sv, np.uint32, root.refcounts, "refcount table", cap)
    sums = _array(sv, np.uint32, root.checksums, "checksum table", cap)
    md.space = SpaceMap(refs, sums)
    locs = _array(sv, np.uint64, root.page_locations, "page table", None)
    try:
        md.maps = MapStore(locs, md.store)
    except CorruptMetadata as e:          # a damaged length: the stored ids say how many
        sv.problems.append(Problem("metadata", str(e)))
        slots = locs.nonzero_slots()
        locs.resize(int(slots[-1]) + 1 if len(slots) else 64)
        locs.mark_all()
        md.maps = MapStore(locs, md.store)
    _claim(sv, locs.arr[locs.arr != 0], "map pages")
    records = root.devices if root.version == 1 else _device_table(sv, root)
    for rec in records:
        _device(sv, rec)
    if not 0 < md.next_dev_id <= MAX_DEVICE_ID:
        sv.problems.append(Problem("metadata", f"the next device id {md.next_dev_id} is out "
                                   f"of range (1..{MAX_DEVICE_ID})"))
        md.next_dev_id = max([d + 1 for d in md.devices] + [1])
    # whatever is written from here (repair) writes a whole new device table
    md.dev_tree = new_tree(md._dev_leaves_for(min(md.next_dev_id, MAX_DEVICE_ID)))
    md.dev_tree.rebuild = True
    md.devices.changed.update(md.devices.keys())
    _load_pages(sv)


def _claim(sv: Salvage, locations, what: str) -> None:
    """Mark blocks used; out-of-file or doubly claimed blocks become problems."""
    store = sv.md.store
    for loc in np.asarray(locations, dtype=np.int64).tolist():
        if not fmt.SUPERBLOCK_SLOTS <= loc < len(store.used):
            sv.problems.append(Problem("metadata", f"{what} names block {loc}, outside the "
                                       "meta file", block=loc))
        elif store.used[loc]:
            sv.problems.append(Problem("metadata", f"{what} claims block {loc}, which another "
                                       "structure holds", block=loc))
        else:
            store.used[loc] = True


def _array(sv: Salvage, dtype, root, what: str, want: int | None) -> PagedArray:
    """A paged array; unreadable leaves and nodes read as zero and are reported."""
    if isinstance(root, fmt.ArrayRoot):
        return _array_v1(sv, dtype, root, what, want)
    per_leaf = fmt.PAYLOAD_SIZE // np.dtype(dtype).itemsize
    length = root.length
    if want is not None and length != want:
        sv.problems.append(Problem("metadata", f"{what} holds {length} entries, the pool "
                                   f"has {want}"))
    if not 0 <= length <= MAX_ENTRIES:
        length = want or 0

    def lost(first_leaf, nleaves, loc, e):
        lo = first_leaf * per_leaf
        sv.problems.append(Problem("metadata", f"{what}: entries {lo}.."
                                   f"{lo + nleaves * per_leaf - 1} lost: {e}", block=int(loc)))

    pa = PagedArray.load(dtype, fmt.TreeRoot(length, root.root), sv.md.store, on_error=lost)
    _claim(sv, pa.block_locations(), what)
    if want is not None and length != want:
        pa.resize(want)
        pa.mark_all()
    return pa


def _array_v1(sv: Salvage, dtype, root: fmt.ArrayRoot, what: str, want: int | None) -> PagedArray:
    per_leaf = fmt.PAYLOAD_SIZE // np.dtype(dtype).itemsize
    length = root.length if want is None else want
    if want is not None and root.length != want:
        sv.problems.append(Problem("metadata", f"{what} holds {root.length} entries, the pool "
                                   f"has {want}"))
    if length > len(root.leaves) * per_leaf:      # a damaged length: trust the leaves
        sv.problems.append(Problem("metadata", f"{what}: {length} entries cannot fit in "
                                   f"{len(root.leaves)} leaves"))
        length = len(root.leaves) * per_leaf
    pa = PagedArray(dtype, length)
    n = min(len(pa.leaves), len(root.leaves))
    for i, loc in enumerate(root.leaves[:n].tolist()):
        if not loc:
            continue
        try:
            payload = sv.md.store.read_block(int(loc), fmt.BT_LEAF)
        except CorruptMetadata as e:
            lo = i * pa.per_leaf
            sv.problems.append(Problem("metadata", f"{what}: entries {lo}..{lo + pa.per_leaf - 1}"
                                       f" lost: {e}", block=int(loc)))
            pa.dirty.add(i)
            continue
        lo = i * pa.per_leaf
        hi = min(lo + pa.per_leaf, length)
        pa.arr[lo:hi] = np.frombuffer(payload, dtype=pa.dtype, count=hi - lo)
        pa.leaves[i] = loc
        _claim(sv, [loc], what)
    pa.tree.rebuild = True
    if len(root.leaves) != len(pa.leaves):
        pa.mark_all()
    return pa


def _device_table(sv: Salvage, root: fmt.RootRecord) -> list:
    """The device records that can be read; lost leaves and nodes are reported."""
    md, per = sv.md, fmt.DEVS_PER_LEAF
    table = root.device_table
    n = table.length
    if n > md._dev_leaves_for(min(root.next_dev_id, MAX_DEVICE_ID)):
        sv.problems.append(Problem("metadata", f"device table of {n} leaves for "
                                   f"{root.next_dev_id} device ids"))
        n = md._dev_leaves_for(min(root.next_dev_id, MAX_DEVICE_ID))

    def lost(first_leaf, nleaves, loc, e):
        sv.problems.append(Problem("metadata", f"device table: the records of device ids "
                                   f"{first_leaf * per}..{(first_leaf + nleaves) * per - 1} "
                                   f"lost: {e}", block=int(loc)))

    tree = new_tree(n)
    tree.load(table.root, md.store, on_error=lost)
    records = []
    for i in np.flatnonzero(tree.leaves).tolist():
        loc = int(tree.leaves[i])
        try:
            recs = fmt.unpack_device_leaf(md.store.read_block(loc, fmt.BT_DEVICES))
        except CorruptMetadata as e:
            lost(i, 1, loc, e)
            tree.leaves[i] = 0
            continue
        for rec in recs:
            if rec.dev_id // per != i:
                sv.problems.append(Problem("metadata", f"device table leaf {loc} holds device "
                                           f"id {rec.dev_id}, not one of its own; dropped",
                                           block=loc, device=rec.name))
                continue
            records.append(rec)
    _claim(sv, tree.locations(), "device table")
    if len(records) != root.device_count:
        sv.problems.append(Problem("metadata", f"the device table holds {len(records)} "
                                   f"devices; the root record says {root.device_count}"))
    return records


def _device(sv: Salvage, rec: fmt.DeviceRecord) -> None:
    md = sv.md
    want = dir_length(rec.size, md.chunk_shift)
    if isinstance(rec.directory, fmt.ArrayRoot):
        room = len(rec.directory.leaves) * (fmt.PAYLOAD_SIZE // 8)
    else:
        room = rec.directory.length if 0 <= rec.directory.length <= MAX_ENTRIES else 0
    if want > room:
        size = room * fmt.FANOUT << md.chunk_shift
        sv.problems.append(Problem("metadata", f"device {rec.name!r}: size {rec.size} does not "
                                   f"fit its directory; taking {size}", device=rec.name))
        rec, want = rec._replace(size=size), room
    d = _array(sv, np.uint64, rec.directory, f"device {rec.name!r} directory", want)
    slots = d.nonzero_slots()
    bad = slots[d.arr[slots] >= len(md.maps.locations)]
    for pi in bad.tolist():
        _lost_slot(sv, rec.name, pi, f"names page {int(d.arr[pi])}, beyond the page table")
    d.arr[bad] = 0
    d.mark(bad)
    md.devices[rec.dev_id] = DeviceMeta(rec.dev_id, rec.uuid, rec.kind, rec.size,
                                        rec.created_ns, rec.origin_uuid, rec.name, d, rec.flags)


def _lost_slot(sv: Salvage, name: str, pi: int, why: str) -> None:
    span = fmt.FANOUT << sv.md.chunk_shift
    sv.problems.append(Problem("metadata", f"device {name!r}: bytes {pi * span}.."
                               f"{(pi + 1) * span - 1} unreadable: directory slot {pi} {why}",
                               device=name, offset=pi * span, length=span))


def _load_pages(sv: Salvage) -> None:
    """Read every page a directory names; unreadable or missing ones are dropped."""
    md = sv.md
    maps = md.maps
    maps.derive_refs([d.directory for d in md.devices.values()])
    for pid in np.flatnonzero(maps.ref > 0).tolist():
        loc = int(maps.locations.arr[pid])
        try:
            if not loc:
                raise CorruptMetadata("it has no block")
            maps.ensure_loaded([pid])
        except CorruptMetadata as e:
            sv.lost_pages[pid] = str(e)
    if not sv.lost_pages:
        return
    lost = np.fromiter(sv.lost_pages, dtype=np.int64)
    for dev in md.devices.values():
        d = dev.directory
        slots = d.nonzero_slots()
        for pi in slots[np.isin(d.arr[slots], lost)].tolist():
            pid = int(d.arr[pi])
            _lost_slot(sv, dev.name, pi, f"names map page {pid}: {sv.lost_pages[pid]}")
            d.arr[pi] = 0
            d.mark_range(pi, pi + 1)
    maps.ref[lost] = 0
    maps.locations.arr[lost] = 0
    maps.locations.mark(lost)


def owners(md: Metadata, chunks) -> dict:
    """chunk id -> [(device name, byte offset), ...] for every map entry naming it."""
    chunks = np.asarray(sorted(set(int(c) for c in chunks)), dtype=np.uint64)
    out: dict = {int(c): [] for c in chunks}
    if not len(chunks):
        return out
    maps = md.maps
    for dev in sorted(md.devices.values(), key=lambda d: d.name):
        d = dev.directory.arr
        slots = dev.directory.nonzero_slots()
        if not len(slots):
            continue
        maps.ensure_loaded(d[slots])
        rows = maps.pages[d[slots].astype(np.int64)]
        hit_r, hit_c = np.nonzero(np.isin(rows, chunks))
        for r, c in zip(hit_r.tolist(), hit_c.tolist()):
            v = int(slots[r]) * fmt.FANOUT + c
            out[int(rows[r, c])].append((dev.name, v << md.chunk_shift))
    return out
