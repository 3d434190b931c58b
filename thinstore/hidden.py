"""Hidden devices: the workspace a receive writes into before it publishes.

A hidden device is persisted like any other (an interrupted receive resumes into it)
but list() omits it and no lookup by name finds it, so a half-received stream is
never visible. `publish_hidden` turns it into `vol@snap` (and `vol`) in ONE commit,
which is what makes a receive atomic. These are methods of Pool (a mixin): they use
its lock, `_find`, `_share_device`, `_drop_device`, `_replace_map` and `_info`.
"""

from __future__ import annotations

import numpy as np

from . import names
from .device import Device, DeviceInfo
from .errors import DeviceBusy, InvalidName, NoSuchDevice
from .metadata import FLAG_HIDDEN, DeviceMeta, dir_length
from .paged import PagedArray
from .units import check_device_size


class HiddenDevices:
    """Pool's receive hooks (see the module docstring)."""

    def create_hidden(self, name: str, size: int, like: str | None = None) -> None:
        """A writable device that list() omits and no lookup by name finds.

        It is a receive's workspace: persisted like any device (so an interrupted
        receive resumes into it) yet never visible half-made. It starts empty, or
        sharing every map page of snapshot `like` (as a clone), then takes `size`.
        """
        names.check_name(name, snapshot=False)
        check_device_size(size, self.md.chunk_size)
        with self.lock:
            self._check_open()
            self._need_free_name(name)
            if like is None:
                d = PagedArray(np.uint64, dir_length(size, self.md.chunk_shift))
                d.dirty[:] = True
                self._new_device(name, "volume", size, d, bytes(16), FLAG_HIDDEN)
            else:
                dm = self._share_device(self._find(like), name, "clone", FLAG_HIDDEN)
                self._set_size(dm, size)
            self.commit()

    def _hidden(self, name: str) -> DeviceMeta | None:
        return next((dm for dm in self.md.devices.named(name) if dm.flags & FLAG_HIDDEN), None)

    def hidden_exists(self, name: str) -> bool:
        with self.lock:
            return self._hidden(name) is not None

    def open_hidden(self, name: str) -> Device:
        with self.lock:
            self._check_open()
            dm = self._hidden(name)
            if dm is None:
                raise NoSuchDevice(f"no unfinished receive {name!r} in pool {self.path}")
            dm.opens += 1
            return Device(self, dm)

    def destroy_hidden(self, name: str) -> None:
        """Drop a hidden device and commit; absent is fine (an abort may repeat)."""
        with self.lock:
            self._check_open()
            dm = self._hidden(name)
            if dm is not None:
                self._drop_device(dm)
                self.commit()

    def publish_hidden(self, hidden: str, snapshot: str, uuid: bytes) -> DeviceInfo:
        """In ONE commit: snapshot `vol@snap` (carrying `uuid`) and volume `vol` take the
        hidden device's map, and the hidden device goes.

        `vol` is created when absent, else its map is replaced as rollback does. One
        commit is what makes a receive atomic: before it nothing shows, after it all.
        """
        names.check_name(snapshot, snapshot=True)
        vol_name, _ = names.split(snapshot)
        with self.lock:
            self._check_open()
            src = self._hidden(hidden)
            if src is None:
                raise NoSuchDevice(f"no unfinished receive {hidden!r} in pool {self.path}")
            if src.opens:
                raise DeviceBusy(f"{hidden!r} is still open")
            self._need_free_name(snapshot)
            vol = self._publish_volume(src, vol_name)
            snap = self._share_device(src, snapshot, "snapshot")
            snap.uuid, snap.origin_uuid = bytes(uuid), vol.uuid
            self._drop_device(src)
            self.commit()
            return self._info(snap)

    def _publish_volume(self, src: DeviceMeta, vol_name: str) -> DeviceMeta:
        try:
            vol = self._find(vol_name)
        except NoSuchDevice:
            vol = self._share_device(src, vol_name, "volume")
            vol.origin_uuid = bytes(16)
            return vol
        if vol.kind == "snapshot":
            raise InvalidName(f"{vol_name!r} is not writable")
        self._replace_map(vol, src)
        return vol

