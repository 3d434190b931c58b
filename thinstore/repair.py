"""Repair of a pool's metadata: what thin_repair does, done as one ordinary commit.

What repair does, in order, and why it is safe:

1. salvage the newest readable tree (salvage.py): unreadable leaves read as zero,
   unreadable map pages are dropped from the directories that named them;
2. drop map entries naming chunks outside the pool (or the reserved chunk 0);
3. rebuild every data chunk's reference count from the maps, and free-space with it
   (a chunk is free exactly when no map names it); forget checksums of free chunks;
4. rewrite the whole tree to blocks the old tree does not use and commit it with a
   new superblock generation. Until that superblock is on disk the old tree is intact,
   so a crash during repair leaves the pool as it was.

It never writes to ``data``: lost mappings read as zeros afterwards, the bytes stay
where they were (a dump of the old tree names them). Damaged data chunks are not
repairable here; `scrub` names them and the devices that use them.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .check import check_metadata, refcount_differences
from .datasums import chunk_sum
from .format import FANOUT
from .pool import POOL_FLAG_DATA_CHECKSUMS
from .salvage import salvage
from .storage import FileIO, locked_store


@dataclasses.dataclass
class RepairReport:
    path: str
    changes: list            # what repair changed, one line each
    unfixable: list          # what it could not fix
    generation: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def repair_path(path: str, fileio=FileIO, dry_run: bool = False) -> RepairReport:
    """Repair the pool at `path`; refuses (PoolLocked) while another process holds it."""
    with locked_store(path, fileio) as store:
        return _repair_store(path, store, dry_run)


def _repair_store(path: str, store, dry_run: bool) -> RepairReport:
    meta = store.open("meta")
    data = store.open("data", readonly=True)
    try:
        sv = salvage(meta, data)
        if sv.md is None:
            return RepairReport(path, [], [str(p) for p in sv.problems])
        report = RepairReport(path, [str(p) for p in sv.problems], [])
        _fix(sv.md, report)
        if dry_run:
            return report
        if report.changes:
            _rewrite_all(sv.md)
            sv.md.commit()
        report.generation = sv.md.generation
        report.unfixable += [str(p) for p in check_metadata(sv.md)]
        return report
    finally:
        meta.close()
        data.close()


def _fix(md, report: RepairReport) -> None:
    _drop_outside(md, report)
    maps = md.maps
    n = min(len(maps.ref), len(maps.locations.arr))
    for pid in np.flatnonzero((maps.locations.arr[:n] != 0) & (maps.ref[:n] == 0)).tolist():
        report.changes.append(f"freed map page {pid} (block {int(maps.locations.arr[pid])}): "
                              "no device names it")      # the commit frees dead pages
    bad, stored, expect, mapped, _ = refcount_differences(md)
    for c, old, new in list(zip(bad.tolist(), stored.tolist(), expect.tolist()))[:50]:
        report.changes.append(f"chunk {c}: refcount {old} -> {new}"
                              + (" (freed: no map names it)" if not new else ""))
    if len(bad) > 50:
        report.changes.append(f"... {len(bad) - 50} more refcounts rebuilt")
    refs = md.space.refs
    refs.arr[bad] = expect.astype(refs.dtype)
    refs.mark(bad)
    sums = md.space.sums.arr
    if md.flags & POOL_FLAG_DATA_CHECKSUMS:
        mapped = mapped[(mapped != 0) & (mapped < len(sums))]
        _rehash_missing(md, mapped[sums[mapped] == 0], report)


def _rehash_missing(md, chunks: np.ndarray, report: RepairReport) -> None:
    """Mapped chunks whose checksum was lost get one from their present bytes (read only)."""
    if not len(chunks):
        return
    cs = md.chunk_size
    for c in chunks.tolist():
        md.space.sums.arr[c] = chunk_sum(md.data_fio.pread(cs, c * cs))
    report.changes.append(f"checksummed {len(chunks)} mapped chunk(s) whose checksum was lost "
                          "(their present bytes are taken as good)")


def _drop_outside(md, report: RepairReport) -> None:
    """Map entries naming chunk 0 or a chunk past the pool end become unmapped."""
    maps, nchunks = md.maps, len(md.space.refs)
    for dev in md.devices.values():
        d = dev.directory.arr
        for pi in dev.directory.nonzero_slots().tolist():
            pid = int(d[pi])
            row = maps.pages[pid]
            bad = np.flatnonzero((row >= nchunks))
            for slot in bad.tolist():
                off = (pi * FANOUT + slot) << md.chunk_shift
                report.changes.append(f"device {dev.name!r} at byte {off}: dropped a map entry "
                                      f"naming chunk {int(row[slot])}, outside the pool")
            if len(bad):
                row[bad] = 0
                maps.dirty[pid] = 1


def _rewrite_all(md) -> None:
    """Mark every structure dirty so commit writes a complete tree beside the old one."""
    maps = md.maps
    live = np.flatnonzero(maps.ref > 0)
    maps.dirty[live] = 1
    md.mark_all()
