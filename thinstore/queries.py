"""Pool queries: list, info and status, at a cost per device listed.

A mixin of Pool (it uses the pool's lock, `md`, `_find` and `_check_open`). The space
a device uses is counted from its map pages: `used` is every mapped chunk, `exclusive`
the chunks no other device maps (the page is the device's alone and the chunk's
refcount is 1). Snapshots of one volume share most of their pages, so list() counts
each distinct page once and then sums per device over its directory: the cost is the
distinct pages plus the directory slots listed, not devices times pages.
"""

from __future__ import annotations

import os

import numpy as np

from .device import DeviceInfo
from .metadata import FLAG_HIDDEN, DeviceMeta
from .native import BACKEND, K


class Queries:
    """Pool's read-only management queries (see the module docstring)."""

    def list(self) -> list[DeviceInfo]:
        """Every visible device, sorted by name (DeviceInfo, sizes in bytes)."""
        with self.lock:
            self._check_open()
            devs = sorted((d for d in self.md.devices.values() if not d.flags & FLAG_HIDDEN),
                          key=lambda d: d.name)
            used, excl = self._page_counts(devs)
            page_ref = self.md.maps.ref
            out = []
            for dm in devs:
                d = dm.directory
                pids = d.arr[d.nonzero_slots()]       # u64 indexes as well as int64
                solo = pids[page_ref[pids] == 1]
                out.append(self._make_info(dm, int(used[pids].sum()), int(excl[solo].sum())))
            return out

    def _page_counts(self, devs) -> tuple[np.ndarray, np.ndarray]:
        """Per page id: mapped chunks, and chunks with refcount 1 (meaningful where the
        page's own refcount is 1). Only the distinct pages named by `devs` are counted."""
        maps, refs = self.md.maps, self.md.space.refs.arr
        dirs = [d.directory.arr[d.directory.nonzero_slots()] for d in devs]
        allp = np.concatenate(dirs) if dirs else np.zeros(0, np.uint64)
        pids = np.unique(allp).astype(np.int64)
        used = np.zeros(maps.capacity, dtype=np.int64)
        excl = np.zeros(maps.capacity, dtype=np.int64)
        for lo in range(0, len(pids), 4096):      # bounded temporaries, pages not kept
            part = pids[lo:lo + 4096]
            rows = maps.peek(part)
            used[part] = np.count_nonzero(rows, axis=1)
            solo = maps.ref[part] == 1
            if solo.any():
                srows = rows[solo].astype(np.int64)
                excl[part[solo]] = np.count_nonzero((refs[srows] == 1) & (srows != 0), axis=1)
        return used, excl

    def info(self, name: str) -> DeviceInfo:
        with self.lock:
            self._check_open()
            return self._info(self._find(name))

    def _info(self, dm: DeviceMeta) -> DeviceInfo:
        maps, space = self.md.maps, self.md.space
        d = dm.directory
        pids = np.ascontiguousarray(d.arr[d.nonzero_slots()])   # the slots in use, not all
        maps.ensure_loaded(pids)
        used, excl = K.count_mapped(pids, maps.pages, space.refs.arr, maps.ref)
        return self._make_info(dm, used, excl)

    def _make_info(self, dm: DeviceMeta, used: int, excl: int) -> DeviceInfo:
        cs = self.md.chunk_size
        origin = None
        if dm.origin_uuid != bytes(16):     # by the uuid index: no scan of the table
            origin = next((o.name for o in self.md.devices.with_uuid(dm.origin_uuid)), None)
        return DeviceInfo(dm.name, dm.kind, dm.size, dm.read_only, dm.uuid.hex(), origin,
                          dm.created_ns / 1e9, used * cs, excl * cs, (used - excl) * cs)

    def status(self) -> dict:
        with self.lock:
            self._check_open()
            space = self.md.space
            cs = self.md.chunk_size
            used = space.used()
            where = self.path if self.store.kind != "dir" else os.path.abspath(self.path)
            return {"path": where, "uuid": self.uuid, "storage": self.store.kind,
                    "capacity": space.capacity * cs, "used": used * cs,
                    "free": (space.capacity - used) * cs, "chunk_size": cs,
                    "devices": len(self.md.devices) - self.md.devices.hidden_count(),
                    "low_water": self.md.low_water_pct / 100,
                    "low_water_crossed": used >= space.capacity * self.md.low_water_pct / 100,
                    "backend": BACKEND, "generation": self.md.generation,
                    "data_checksums": self.data_checksums,
                    "metadata_bytes": self.md.meta_fio.size(),
                    # free in the space map, bytes not yet given back to the file
                    # system by the background reclaim (reclaim.py)
                    "freeing": self._reclaim.freeing_bytes,
                    "pending_receives": self.pending_receives()}
