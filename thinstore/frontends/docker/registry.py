"""The plugin's own record of its volumes' options (what the pool does not keep).

Format (JSON, UTF-8; docs/docker.md)::

    {"magic": "thinstore-docker-volumes", "version": 1,
     "crc32": CRC-32 (zlib) of the canonical JSON of "volumes",
     "volumes": {NAME: {"fs": "ext4"|"xfs", "from": "VOL@SNAP"|null,
                        "state": "creating"|"ready"}}}

The canonical JSON is ``json.dumps(volumes, sort_keys=True, separators=(",", ":"))``.
Written atomically (tmp + fsync + rename + directory fsync).  A Create records its entry
as "creating" *before* the pool makes the volume, so that after a crash :meth:`settle`
finds either a volume with its options (kept, made "ready") or no volume (entry dropped).
"""

from __future__ import annotations

import json
import os
import threading
import zlib

from thinstore.frontends.attach.privileged import AttachError

MAGIC = "thinstore-docker-volumes"
VERSION = 1


def _canonical(volumes: dict) -> bytes:
    return json.dumps(volumes, sort_keys=True, separators=(",", ":")).encode()


class Registry:
    """name -> options of the volumes this plugin created; thread-safe."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)
        self._lock = threading.Lock()
        self.volumes: dict[str, dict] = self._load()

    def _load(self) -> dict:
        try:
            with open(self.path, "rb") as f:
                doc = json.loads(f.read())
            volumes, ok = doc["volumes"], doc["magic"] == MAGIC
            ok = ok and isinstance(doc["version"], int) and doc["version"] <= VERSION
            ok = ok and zlib.crc32(_canonical(volumes)) == doc["crc32"]
        except FileNotFoundError:
            return {}
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise AttachError(f"volume registry {self.path} is damaged or of a newer "
                              "thinstore; move it away to start afresh (volumes then "
                              "mount as the file system they hold)")
        return volumes

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
        volumes = dict(sorted(self.volumes.items()))
        doc = {"magic": MAGIC, "version": VERSION, "crc32": zlib.crc32(_canonical(volumes)),
               "volumes": volumes}
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
