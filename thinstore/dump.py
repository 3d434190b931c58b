"""Dump and restore of a pool's metadata in a readable form (like thin_dump/thin_restore).

The JSON form holds everything the metadata means, nothing of where it lies::

    {"format": "thinstore-metadata", "version": 1,
     "pool": {uuid, chunk_size, capacity_chunks, generation, data_checksums,
              low_water_pct, next_dev_id},
     "devices": [{id, name, kind, size, uuid, origin_uuid, created_ns, flags,
                  "directory": [[slot, page], ...]}],          # nonzero slots only
     "pages": {"<page>": [[slot, chunk, count], ...]},          # runs: slot+i -> chunk+i
     "checksums": [[chunk, mmh3], ...]}                         # mapped chunks only

Page ids are kept, so what snapshots share stays shared after a restore; reference
counts are not dumped (restore derives them from the maps, as repair does). Restore
writes a complete new ``meta`` beside the old one and renames it into place (the old
file is kept as ``meta.old``), so it is atomic; it never writes to ``data``.
The text form (`dump_text`) is for reading only: per device, runs of virtual chunks and
the data chunks they map to.
"""

from __future__ import annotations

import json
import os

import numpy as np

from . import format as fmt
from .blockmap import MapStore
from .errors import CorruptMetadata, UsageError
from .metadata import DeviceMeta, Metadata, dir_length
from .metastore import MetaStore
from .paged import PagedArray
from .pool import POOL_FLAG_DATA_CHECKSUMS
from .salvage import salvage
from .spacemap import SpaceMap
from .storage import DirLock, FileIO, is_rados, locked_store, private_dir

FORMAT = "thinstore-metadata"
DUMP_VERSION = 1      # the JSON document's layout (not the pool's on-disk format)


def _runs(row: np.ndarray) -> list:
    """[[slot, chunk, count], ...] for the nonzero entries of a page row."""
    out = []
    for slot in np.flatnonzero(row).tolist():
        c = int(row[slot])
        if out and out[-1][0] + out[-1][2] == slot and out[-1][1] + out[-1][2] == c:
            out[-1][2] += 1
        else:
            out.append([slot, c, 1])
    return out


def dump_metadata(md) -> dict:
    maps = md.maps
    devices, pages = [], {}
    for dev in sorted(md.devices.values(), key=lambda d: d.dev_id):
        d = dev.directory.arr
        slots = dev.directory.nonzero_slots()
        for pid in d[slots].astype(np.int64).tolist():
            if str(pid) not in pages:
                maps.ensure_loaded([pid])
                pages[str(pid)] = _runs(maps.pages[pid])
        devices.append({"id": dev.dev_id, "name": dev.name, "kind": dev.kind, "size": dev.size,
                        "uuid": dev.uuid.hex(), "origin_uuid": dev.origin_uuid.hex(),
                        "created_ns": dev.created_ns, "flags": dev.flags,
                        "directory": [[int(s), int(d[s])] for s in slots.tolist()]})
    sums = md.space.sums.arr
    mapped = np.flatnonzero((md.space.refs.arr != 0) & (sums != 0))
    return {"format": FORMAT, "version": DUMP_VERSION,
            "pool": {"uuid": md.sb.pool_uuid.hex(), "chunk_size": md.chunk_size,
                     "capacity_chunks": int(md.sb.capacity_chunks),
                     "generation": md.generation,
                     "data_checksums": bool(md.flags & POOL_FLAG_DATA_CHECKSUMS),
                     "low_water_pct": md.low_water_pct, "next_dev_id": md.next_dev_id},
            "devices": devices, "pages": pages,
            "checksums": [[int(c), int(sums[c])] for c in mapped.tolist()]}


def dump_text(doc: dict) -> str:
    p = doc["pool"]
    lines = [f"pool {p['uuid']} generation {p['generation']} chunk_size {p['chunk_size']} "
             f"capacity {p['capacity_chunks'] - 1} chunks data_checksums "
             f"{'on' if p['data_checksums'] else 'off'}"]
    for dev in doc["devices"]:
        lines.append(f"device {dev['id']} {dev['name']} {dev['kind']} size {dev['size']} "
                     f"uuid {dev['uuid']}")
        for slot, pid in dev["directory"]:
            for s, c, n in doc["pages"].get(str(pid), []):
                v = slot * fmt.FANOUT + s
                span = f"{v}..{v + n - 1}" if n > 1 else f"{v}"
                chunks = f"{c}..{c + n - 1}" if n > 1 else f"{c}"
                lines.append(f"  virtual {span} -> chunk {chunks}  (page {pid})")
    return "\n".join(lines) + "\n"


def dump_path(path: str, fileio=FileIO) -> tuple[dict, list]:
    """(the dump, problems met while reading) of the committed metadata at `path`."""
    with locked_store(path, fileio) as store:
        meta = store.open("meta", readonly=True)
        data = store.open("data", readonly=True)
        try:
            sv = salvage(meta, data)
            if sv.md is None:
                raise CorruptMetadata("; ".join(str(p) for p in sv.problems))
            return dump_metadata(sv.md), sv.problems
        finally:
            meta.close()
            data.close()


def dump_served(pool) -> tuple[dict, list]:
    """dump_path for an open pool (a server's): its committed generation, read through
    the pool's own meta file and pinned while it is read (see check.check_served)."""
    from .check import PinnedMeta
    with pool.pinned_generation() as slots:
        sv = salvage(PinnedMeta(pool.md.meta_fio, slots), pool.md.data_fio)
        if sv.md is None:
            raise CorruptMetadata("; ".join(str(p) for p in sv.problems))
        return dump_metadata(sv.md), sv.problems


# ---------------------------------------------------------------- restore
def restore_path(path: str, doc: dict, fileio=FileIO) -> int:
    """Replace the metadata of the pool at `path` by `doc`; return the new generation."""
    try:
        _validate(doc)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise UsageError(f"restore: malformed dump ({type(e).__name__}: {e})") from None
    if is_rados(path):
        raise UsageError(f"restore into a rados:// pool ({path}) is not supported: restore "
                         "into a directory pool and copy it across with send/receive")
    private_dir(path)
    lockfd = DirLock(path)
    tmp = os.path.join(path, "meta.restore")
    try:
        if os.path.exists(tmp):
            os.unlink(tmp)
        meta = fileio(tmp, create=True)
        data = _open_data(path, doc, fileio)
        try:
            gen = _build(meta, data, doc)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise UsageError(f"restore: malformed dump ({type(e).__name__}: {e})") from None
        finally:
            meta.close()
            data.close()
        _swap_in(path, tmp)
        return gen
    finally:
        lockfd.release()


def _open_data(path: str, doc: dict, fileio):
    full = os.path.join(path, "data")
    if os.path.exists(full):
        return fileio(full, readonly=True)
    data = fileio(full, create=True)
    data.truncate(doc["pool"]["capacity_chunks"] * doc["pool"]["chunk_size"])
    return data


def _swap_in(path: str, tmp: str) -> None:
    """The new meta replaces the old, which is kept under the first free name of meta.old,
    meta.old.1, meta.old.2, ...: a second restore must not delete the only copy of the
    original metadata that the first one kept."""
    meta = os.path.join(path, "meta")
    if os.path.exists(meta):
        os.link(meta, os.path.join(path, _free_old_name(path)))
    os.replace(tmp, meta)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _free_old_name(path: str) -> str:
    n = 0
    while os.path.lexists(os.path.join(path, _old_name(n))):
        n += 1
    return _old_name(n)


def _old_name(n: int) -> str:
    return "meta.old" if n == 0 else f"meta.old.{n}"


def newest_kept_metadata(path: str) -> str | None:
    """The name of the meta file the last restore kept (meta.old, meta.old.1, ...)."""
    n = 0
    while os.path.lexists(os.path.join(path, _old_name(n))):
        n += 1
    return _old_name(n - 1) if n else None


def _build(meta_fio, data_fio, doc: dict) -> int:
    p = doc["pool"]
    flags = POOL_FLAG_DATA_CHECKSUMS if p.get("data_checksums", True) else 0
    md = Metadata(meta_fio, data_fio)
    meta_fio.truncate(fmt.SUPERBLOCK_SLOTS * fmt.BLOCK_SIZE)
    md.store = MetaStore(meta_fio)
    md.flags, md.low_water_pct = flags, int(p.get("low_water_pct", 90))
    cap = int(p["capacity_chunks"])
    md.sb = fmt.Superblock(int(p.get("generation", 0)), int(p["chunk_size"]), cap,
                           bytes.fromhex(p["uuid"]), 0, 0, 0, 0)
    md.space = SpaceMap(PagedArray(np.uint32, cap), PagedArray(np.uint32, cap))
    npages = max([int(k) for k in doc["pages"]] + [0]) + 1
    md.maps = MapStore(PagedArray(np.uint64, max(npages, 64)), md.store)
    _fill_pages(md, doc["pages"], cap)
    known = {int(k) for k in doc["pages"]}
    for dev in doc["devices"]:
        _add_device(md, dev, known)
    md.next_dev_id = max([int(p.get("next_dev_id", 1))]
                         + [d.dev_id + 1 for d in md.devices.values()])
    _derive_counts(md)
    for c, s in doc.get("checksums", []):
        if 0 < int(c) < cap:
            md.space.sums.arr[int(c)] = int(s)
    md.space.sums.mark_all()
    md.commit()
    md.commit()       # both slots valid, as for a new pool
    return md.generation


def _fill_pages(md, pages: dict, cap: int) -> None:
    maps = md.maps
    for key, runs in pages.items():
        pid = int(key)
        if pid <= 0:
            raise UsageError(f"restore: page id {pid} is invalid (ids start at 1)")
        for slot, chunk, count in runs:
            if not (0 <= slot and count >= 1 and slot + count <= fmt.FANOUT
                    and 0 < chunk and chunk + count <= cap):
                raise UsageError(f"restore: page {pid} run {[slot, chunk, count]} lies outside "
                                 f"the page ({fmt.FANOUT} slots) or the pool ({cap} chunks)")
            maps.pages[pid, slot:slot + count] = np.arange(chunk, chunk + count, dtype=np.uint64)
        maps.loaded[pid] = True
        maps.dirty[pid] = 1


def _add_device(md, dev: dict, known: set) -> None:
    size = int(dev["size"])
    d = PagedArray(np.uint64, dir_length(size, md.chunk_shift))
    for slot, pid in dev["directory"]:
        if not (0 <= slot < len(d) and pid in known):
            raise UsageError(f"restore: device {dev['name']!r} directory entry {[slot, pid]} "
                             "is outside its directory or names no page")
        d.arr[slot] = pid
    d.mark_all()
    if dev["kind"] not in fmt.DEVICE_KINDS:
        raise UsageError(f"restore: device {dev['name']!r} has unknown kind {dev['kind']!r}")
    dm = DeviceMeta(int(dev["id"]), bytes.fromhex(dev["uuid"]), dev["kind"], size,
                    int(dev.get("created_ns", 0)), bytes.fromhex(dev.get("origin_uuid", "00" * 16)),
                    dev["name"], d, int(dev.get("flags", 0)))
    if dm.dev_id in md.devices:
        raise UsageError(f"restore: device id {dm.dev_id} appears twice")
    md.devices[dm.dev_id] = dm


def _derive_counts(md) -> None:
    """Page and chunk reference counts from the maps, exactly as check recomputes them."""
    maps = md.maps
    maps.derive_refs([d.directory for d in md.devices.values()])
    maps.dirty[maps.ref == 0] = 0
    live = np.flatnonzero(maps.ref > 0)
    ents = maps.pages[live].ravel()
    ents = ents[ents != 0].astype(np.int64)
    refs = md.space.refs
    np.add.at(refs.arr, ents, 1)
    refs.mark_all()


def _validate(doc: dict) -> None:
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise UsageError(f"restore: not a thinstore metadata dump (format must be {FORMAT!r})")
    if int(doc.get("version", 0)) > DUMP_VERSION:
        raise UsageError(f"restore: dump version {doc['version']} is newer than {DUMP_VERSION}")
    p = doc.get("pool", {})
    geometry_ok = fmt.valid_chunk_size(int(p.get("chunk_size", 0)))
    if not geometry_ok or int(p.get("capacity_chunks", 0)) < 2:
        raise UsageError("restore: the dump's chunk size or capacity is invalid")
    names = [d["name"] for d in doc.get("devices", [])]
    if len(set(names)) != len(names):
        raise UsageError("restore: two devices share a name")


def load_dump(text: str) -> dict:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"restore: the dump is not valid JSON ({e})") from None
