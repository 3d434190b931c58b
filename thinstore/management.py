"""Device management: the namespace operations of a pool and the map moves under them.

create_volume, snapshot, clone, destroy, rename, rollback and resize change which
devices exist and which shared map pages each holds; none of them moves data. A
snapshot or clone copies the source's directory and takes a reference on each of its
map pages (`md.maps.share`); destroy and rollback drop references (`md.maps.drop`),
freeing what no device holds any more. Each operation checks its names and sizes
first, then changes the open transaction under the pool lock and commits before it
returns (`_commit_op`: once per batch() inside a batch), so a failed one changes
nothing.

These are methods of Pool (a mixin): they use its lock, `md`, `_find`, `_exists`,
`_commit_op`, `_check_open`, `_info` and, for shrinking, the data path's
`_zero_range` and `_unmap_chunks`. The receive workspace (hidden.py) builds on the
helpers here (`_new_device`, `_share_device`, `_drop_device`, `_replace_map`).
"""

from __future__ import annotations

import time

import numpy as np

from . import names
from .device import DeviceInfo
from .errors import DeviceBusy, DeviceExists, InvalidName, ReadOnlyDevice, UsageError
from .format import FANOUT, new_uuid
from .metadata import DeviceMeta, dir_length
from .paged import PagedArray
from .units import check_volume_size, format_size


class Management:
    """Pool's device management operations (see the module docstring)."""

    def _new_device(self, name: str, kind: str, size: int, directory: PagedArray,
                    origin_uuid: bytes, flags: int = 0) -> DeviceMeta:
        md = self.md
        dm = DeviceMeta(md.next_dev_id, new_uuid(), kind, size, time.time_ns(), origin_uuid,
                        name, directory, flags)
        md.next_dev_id += 1
        md.devices[dm.dev_id] = dm
        return dm

    def _need_free_name(self, name: str) -> None:
        if self._exists(name):
            raise DeviceExists(f"device {name!r} exists already; choose another name "
                               "or destroy it first")
        if "@" not in name:     # a pending receive will publish a volume of this name
            self._refuse_pending_receive(name, "use the name")

    def create_volume(self, name: str, size: int) -> DeviceInfo:
        """A new empty volume of `size` bytes; `name` as names.check_new_name allows."""
        names.check_new_name(name)
        check_volume_size(size, self.md.chunk_size)
        with self.lock:
            self._check_open()
            self._need_free_name(name)
            d = PagedArray(np.uint64, dir_length(size, self.md.chunk_shift))
            dm = self._new_device(name, "volume", size, d, bytes(16))
            self._commit_op()
            return self._info(dm)

    def snapshot(self, name: str) -> DeviceInfo:
        """Take a read-only snapshot `vol@snap`: the map pages are shared, nothing copied."""
        names.check_name(name, snapshot=True)
        base, _ = names.split(name)
        with self.lock:
            self._check_open()
            parent = self._find(base)
            self._need_free_name(name)
            dm = self._share_device(parent, name, "snapshot")
            self._commit_op()
            return self._info(dm)

    def clone(self, snapshot: str, name: str) -> DeviceInfo:
        """A writable device that starts as the snapshot's exact content."""
        names.check_name(snapshot, snapshot=True)
        names.check_new_name(name)
        with self.lock:
            self._check_open()
            snap = self._find(snapshot)
            self._need_free_name(name)
            dm = self._share_device(snap, name, "clone")
            self._commit_op()
            return self._info(dm)

    def _share_device(self, src: DeviceMeta, name: str, kind: str, flags: int = 0) -> DeviceMeta:
        directory = src.directory.copy()
        self.md.maps.share(directory)
        return self._new_device(name, kind, src.size, directory, src.uuid, flags)

    def destroy(self, name: str, force: bool = False) -> None:
        """Destroy one device. Every other device, its snapshots included, stays whole."""
        names.check_name(name)
        with self.lock:
            self._check_open()
            dm = self._find(name)
            self._refuse_pending_receive(name, "destroy")
            if dm.opens and not force:
                raise DeviceBusy(f"device {name!r} is in use ({dm.opens} open handle(s)); "
                                 "disconnect its clients or force")
            self._drop_device(dm)
            self._commit_op()

    def _drop_device(self, dm: DeviceMeta) -> None:
        self.md.maps.drop(dm.directory, self.md.space)
        dm.directory.release(self.md.store)
        del self.md.devices[dm.dev_id]
        dm.opens = -1   # handles still open see it gone

    def rename(self, old: str, new: str) -> None:
        """Rename a device; a volume's snapshots follow it (vol@s -> new@s), not those
        of an earlier, destroyed volume of the same name (their origin is another)."""
        names.check_name(old)
        if "@" in new:
            names.check_name(new)
        else:
            names.check_new_name(new)
        with self.lock:
            self._check_open()
            dm = self._find(old)
            self._refuse_pending_receive(old, "rename")
            obase, osnap = names.split(old)
            nbase, nsnap = names.split(new)
            if (osnap is None) != (nsnap is None) or (osnap and obase != nbase):
                raise InvalidName(f"cannot rename {old!r} to {new!r}: a snapshot keeps its "
                                  "volume part (vol@a -> vol@b); a volume takes a plain name")
            self._need_free_name(new)
            moves = [(dm, new)]
            if osnap is None:
                for other in self.md.devices.values():
                    b, s = names.split(other.name)
                    if s is not None and b == old and other.origin_uuid == dm.uuid:
                        moves.append((other, f"{new}@{s}"))
                for _, target in moves[1:]:
                    names.check_name(target)
                    self._need_free_name(target)
            for d, target in moves:
                d.name = target
            self._commit_op()

    def rollback(self, snapshot: str) -> None:
        """Bring volume `vol` back to `vol@snap` (newer snapshots are kept)."""
        names.check_name(snapshot, snapshot=True)
        base, _ = names.split(snapshot)
        with self.lock:
            self._check_open()
            snap = self._find(snapshot)
            vol = self._find(base)
            if vol.kind == "snapshot":
                raise InvalidName(f"{base!r} is not writable")
            if snap.origin_uuid != vol.uuid:
                raise InvalidName(f"{snapshot!r} was taken of an earlier device named {base!r}, "
                                  f"not of this one; clone it instead "
                                  f"('thinstore clone {snapshot} NEWNAME')")
            self._replace_map(vol, snap)
            self._commit_op()

    def resize(self, name: str, size: int, shrink: bool = False) -> DeviceInfo:
        names.check_name(name)
        check_volume_size(size, self.md.chunk_size)
        with self.lock:
            self._check_open()
            dm = self._find(name)
            if dm.read_only:
                raise ReadOnlyDevice(f"{name!r} is a snapshot; snapshots cannot be resized")
            if size < dm.size and not shrink:
                raise UsageError(f"{name!r} is {format_size(dm.size)}; shrinking it to "
                                 f"{format_size(size)} discards the data past that: pass "
                                 "shrink=True to do it")
            self._set_size(dm, size)
            self._commit_op()
            return self._info(dm)

    def _set_size(self, dm: DeviceMeta, size: int) -> None:
        if size < dm.size:
            self._truncate(dm, size)
        dm.directory.resize(dir_length(size, self.md.chunk_shift))
        dm.size = size

    def _truncate(self, dm: DeviceMeta, size: int) -> None:
        """Unmap everything past `size` (the tail of the last chunk is zeroed)."""
        cs = self.md.chunk_size
        if size % cs:
            self._zero_range(dm, size, min(dm.size, -(-size // cs) * cs) - size, no_hole=False)
        first = -(-size // cs)
        keep = dir_length(size, self.md.chunk_shift)
        # within the last page kept, chunk by chunk; the pages past it are dropped whole
        # (a shrink of a 2 PiB volume walked all of its 67M page slots)
        self._unmap_chunks(dm, first, min(-(-dm.size // cs), keep * FANOUT) - first)
        self.md.maps.drop(dm.directory, self.md.space, keep)   # the resize cuts the slots

    def _replace_map(self, vol: DeviceMeta, src: DeviceMeta) -> None:
        """`vol` takes `src`'s content and size by sharing its pages (O(pages), no data)."""
        directory = src.directory.copy()
        self.md.maps.share(directory)
        self.md.maps.drop(vol.directory, self.md.space)
        vol.directory.release(self.md.store)
        vol.directory = directory
        vol.size = src.size
