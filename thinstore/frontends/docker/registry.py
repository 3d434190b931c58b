"""The plugin's own record of its volumes' options (what the pool does not keep).

A state file of :mod:`thinstore.frontends.statefile` (docs/statefile.md) of kind
``thinstore-docker-volumes``, whose body is (docs/docker.md)::

    {NAME: {"fs": "ext4"|"xfs", "from": "VOL@SNAP"|null, "state": "creating"|"ready",
            "uuid": UUID|null}}

``uuid`` is the pool device's UUID (DeviceInfo.uuid), which a rename keeps: an entry
follows its volume to a new name (``thinstore rename``, with the plugin running or not)
through :meth:`Registry.follow`, so a blank volume made with ``-o fs=xfs`` and renamed
before its first mount still gets xfs.  It is null while "creating" (the pool has not
made the device yet) and in files of the earlier layout until :meth:`Registry.settle`.

Files of the earlier layout (one JSON object ``{"magic", "version": 1, "crc32",
"volumes"}``) are still read.  Written atomically (tmp + fsync + rename + directory
fsync).  A Create records its entry as "creating" *before* the pool makes the volume, so
that after a crash :meth:`settle` finds either a volume with its options (kept, made
"ready") or no volume (entry dropped).
"""

from __future__ import annotations

import threading

from thinstore.frontends import statefile
from thinstore.frontends.attach.privileged import AttachError

MAGIC = "thinstore-docker-volumes"


class Registry:
    """name -> options of the volumes this plugin created; thread-safe."""

    def __init__(self, path: str):
        self._lock = threading.Lock()
        self._file = statefile.StateFile(
            path, MAGIC, legacy_key="volumes", error=AttachError,
            advice="move it away to start afresh (volumes then mount as the file system "
                   "they hold)")
        self.path = self._file.path
        self.volumes: dict[str, dict] = self._file.load(default={})

    def get(self, name: str) -> dict | None:
        with self._lock:
            entry = self.volumes.get(name)
            return dict(entry) if entry else None

    def snapshot(self) -> dict:
        """A copy of every entry ({NAME: entry}), e.g. for the plugin's holds."""
        with self._lock:
            return {name: dict(entry) for name, entry in self.volumes.items()}

    def put(self, name: str, **entry) -> None:
        with self._lock:
            self.volumes[name] = entry
            self._save()

    def drop(self, name: str, uuid: str | None = None) -> None:
        """Forget ``name``'s entry (only if it is device ``uuid``'s, when given)."""
        with self._lock:
            entry = self.volumes.get(name)
            if entry is not None and (uuid is None or entry.get("uuid") in (None, uuid)):
                del self.volumes[name]
                self._save()

    def known(self, uuid: str) -> bool:
        """Some entry is device ``uuid``'s (under whatever name)."""
        with self._lock:
            return any(e.get("uuid") == uuid for e in self.volumes.values())

    def follow(self, devices: dict[str, str]) -> bool:
        """Move each entry to the current name of its device (``devices``: the pool's
        name -> uuid): renames made since are followed.  An entry whose device is not in
        ``devices`` stays where it is (it may be being created: :meth:`settle` drops the
        gone ones).  True if anything moved."""
        names = {uuid: name for name, uuid in devices.items()}
        with self._lock:
            moved: dict[str, dict] = {}
            for name, entry in self.volumes.items():
                new = names.get(entry.get("uuid"), name)
                there = moved.get(new)
                if there is None or there.get("uuid") != devices.get(new):
                    moved[new] = entry
            if moved == self.volumes:
                return False
            self.volumes = moved
            self._save()
            return True

    def settle(self, devices: dict[str, str]) -> list[str]:
        """After a restart, given the pool's devices (name -> uuid): entries follow
        renames (:meth:`follow`); "creating" entries become "ready" where their volume
        exists, else are dropped; entries of volumes gone from the pool are dropped too;
        an entry without a uuid (of the earlier layout) takes its volume's.  Returns
        the names dropped."""
        self.follow(devices)
        with self._lock:
            gone = [n for n, e in self.volumes.items()
                    if devices.get(n) is None or e.get("uuid") not in (None, devices[n])]
            for name in gone:
                del self.volumes[name]
            for name, entry in self.volumes.items():
                entry["state"], entry["uuid"] = "ready", devices[name]
            self._save()
            return gone

    def _save(self) -> None:
        self._file.save(dict(sorted(self.volumes.items())))
