"""The CSI controller's records: what each CSI name was created with.

Idempotency by name (spec.md "CreateVolume": the same name and parameters give the same
answer, other parameters give ALREADY_EXISTS) must survive a restart of the plugin, so the
parameters of every volume and snapshot are kept in a file beside the pool,
``POOL/csi/state``: a state file of :mod:`thinstore.frontends.statefile` (header line,
body; docs/statefile.md) of kind ``thinstore-csi-state``, whose body is
``{"volumes": {CSI name: record}, "snapshots": {CSI name: record}}`` (docs/csi.md, "The
state file").  It is replaced atomically (write a temporary file, fsync it, rename it
over the old one, fsync the directory); files of the earlier layout (a
``thinstore-csi-state 1 <checksum>`` line, then the body) are still read.

A record is written *before* the pool device it describes is made and dropped *after*
that device is destroyed, so a device of the plugin's never exists without its record.
A record without its device is an operation a crash cut short: :meth:`State.reconcile`
drops it at start (the CO's retry makes it again), so nothing is orphaned either way.
The node service keeps its stage and publish records in a second file of the same
layout, ``POOL/csi/node`` ({"stages": {volume_id: record}, "publishes": {target: record}}).
A file of another kind, a newer version, cut short or failing its checksum stops the
plugin with :class:`StateError` naming the file; it is never silently replaced.
"""

from __future__ import annotations

import os
import threading

from thinstore.frontends import statefile

MAGIC = "thinstore-csi-state"
VERSION = statefile.VERSION
ADVICE = "restore it or remove it and re-import the volumes"


class StateError(statefile.StateFileError):
    """The plugin's state file is damaged or of an unknown version."""


def pack(data: dict) -> bytes:
    """The file's bytes for ``data``."""
    return statefile.encode(MAGIC, data)


def unpack(raw: bytes, path: str = "state", kinds=("volumes", "snapshots")) -> dict:
    """``data`` from the file's bytes (either layout); raises StateError naming ``path``."""
    try:
        data = statefile.decode(raw, MAGIC, path)
    except statefile.StateFileError as exc:
        raise StateError(f"{exc}; {ADVICE}") from None
    for kind in kinds:
        data.setdefault(kind, {})
    return data


class State:
    """The records, in memory and on disk.  Callers hold :attr:`lock` across a
    read-decide-write sequence; every ``put``/``drop`` is durable when it returns."""

    def __init__(self, directory: str, name: str = "state",
                 kinds: tuple[str, ...] = ("volumes", "snapshots")):
        self.dir = directory
        self.path = os.path.join(directory, name)
        self.kinds = kinds
        self.lock = threading.RLock()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._file = statefile.StateFile(self.path, MAGIC, error=StateError, advice=ADVICE)
        self.data = self._file.load(default={})
        for kind in kinds:
            self.data.setdefault(kind, {})

    def get(self, kind: str, name: str) -> dict | None:
        return self.data[kind].get(name)

    def items(self, kind: str):
        return self.data[kind].items()

    def by_id(self, kind: str, device: str) -> tuple[str, dict] | None:
        """(CSI name, record) of the record whose device is ``device``."""
        return next(((n, r) for n, r in self.data[kind].items() if r["id"] == device), None)

    def put(self, kind: str, name: str, record: dict) -> None:
        with self.lock:
            self.data[kind][name] = record
            self._save()

    def drop(self, kind: str, name: str) -> None:
        with self.lock:
            if self.data[kind].pop(name, None) is not None:
                self._save()

    def reconcile(self, exists) -> list[str]:
        """Drop records whose device ``exists(device)`` denies; returns their CSI names."""
        with self.lock:
            gone = [(kind, name) for kind in self.kinds
                    for name, rec in self.data[kind].items() if not exists(rec["id"])]
            for kind, name in gone:
                del self.data[kind][name]
            if gone:
                self._save()
            return [name for _, name in gone]

    def _save(self) -> None:
        self._file.save(self.data)
