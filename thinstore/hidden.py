"""Hidden devices: the workspace a receive writes into before it publishes.

A hidden device is persisted like any other (an interrupted receive resumes into it)
but list() omits it and no lookup by name finds it, so a half-received stream is
never visible. Its name, ``%receive/VOL``, holds characters no device name may
contain, so no user name can meet it: ``create``, ``destroy`` and ``receive`` of any
valid name never collide with a workspace. While one exists, VOL cannot be destroyed
or renamed (the receive would publish into a volume that is gone), and status()
reports the space it holds. `publish_hidden` turns it into `vol@snap` (and `vol`) in ONE commit,
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
from .units import check_device_size, format_size

#: Workspace names start with this; '%' and '/' are in no device name (names.py).
WORKSPACE_PREFIX = "%receive/"
_LEGACY_PREFIX = ".receive."   # pools written before the namespace: in the user's names


def workspace_name(volume: str) -> str:
    """The hidden workspace of a receive into `volume`."""
    return WORKSPACE_PREFIX + volume


def _check_workspace_name(name: str) -> None:
    if not (isinstance(name, str) and name.startswith(WORKSPACE_PREFIX)):
        raise InvalidName(f"hidden device names start with {WORKSPACE_PREFIX!r}, not {name!r}")
    names.check_name(name[len(WORKSPACE_PREFIX):], snapshot=False)


class HiddenDevices:
    """Pool's receive hooks (see the module docstring)."""

    def create_hidden(self, name: str, size: int, like: str | None = None) -> None:
        """A writable device that list() omits and no lookup by name finds.

        It is a receive's workspace: persisted like any device (so an interrupted
        receive resumes into it) yet never visible half-made. It starts empty, or
        sharing every map page of snapshot `like` (as a clone), then takes `size`.
        """
        _check_workspace_name(name)
        check_device_size(size, self.md.chunk_size)
        with self.lock:
            self._check_open()
            self._need_free_name(name)
            if like is None:
                d = PagedArray(np.uint64, dir_length(size, self.md.chunk_shift))
                self._new_device(name, "volume", size, d, bytes(16), FLAG_HIDDEN)
            else:
                dm = self._share_device(self._find(like), name, "clone", FLAG_HIDDEN)
                self._set_size(dm, size)
            self.commit()

    def _hidden(self, name: str) -> DeviceMeta | None:
        return next((dm for dm in self.md.devices.named(name) if dm.flags & FLAG_HIDDEN), None)

    def _workspace_of(self, volume: str) -> DeviceMeta | None:
        return self._hidden(workspace_name(volume)) or self._hidden(_LEGACY_PREFIX + volume)

    def _refuse_pending_receive(self, volume: str, action: str) -> None:
        """Destroy and rename of a volume with a pending receive would strand the receive
        (it publishes into VOL) and hide the space its workspace holds, and a new device
        taking the name would make it fail only after its whole stream was read; refuse,
        with the fix."""
        dm = self._workspace_of(volume)
        if dm is None:
            return
        held = format_size(self._info(dm).exclusive)
        raise DeviceBusy(f"a receive into {volume!r} is pending (its workspace holds {held}): "
                         f"finish it or drop it before you {action} {volume!r} "
                         f"('thinstore receive --resume {volume}' or '--abort {volume}'; "
                         "replication.receive(resume=True) or abort_receive)")

    def pending_receives(self) -> dict[str, int]:
        """{volume: bytes its receive workspace alone holds} for every pending receive."""
        with self.lock:
            self._check_open()
            found = {}
            for dm in self.md.devices.values():
                if dm.flags & FLAG_HIDDEN:
                    volume = dm.name.removeprefix(WORKSPACE_PREFIX).removeprefix(_LEGACY_PREFIX)
                    found[volume] = self._info(dm).exclusive
            return found

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

