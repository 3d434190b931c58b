"""The plugin's own record of its volumes' options (what the pool does not keep).

A state file of :mod:`thinstore.frontends.statefile` (docs/statefile.md) of kind
``thinstore-docker-volumes``, whose body is (docs/docker.md)::

    {NAME: {"fs": "ext4"|"xfs", "from": "VOL@SNAP"|null, "state": "creating"|"ready"}}

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

    def put(self, name: str, **entry) -> None:
        with self._lock:
            self.volumes[name] = entry
            self._save()

    def drop(self, name: str) -> None:
        with self._lock:
            if self.volumes.pop(name, None) is not None:
                self._save()

    def settle(self, exists) -> list[str]:
        """After a restart: "creating" entries become "ready" where ``exists(name)``,
        else are dropped; entries of volumes gone from the pool are dropped too.
        Returns the names dropped."""
        with self._lock:
            gone = [n for n in self.volumes if not exists(n)]
            for name in gone:
                del self.volumes[name]
            for entry in self.volumes.values():
                entry["state"] = "ready"
            self._save()
            return gone

    def _save(self) -> None:
        self._file.save(dict(sorted(self.volumes.items())))
