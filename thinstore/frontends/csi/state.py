"""The CSI controller's records: what each CSI name was created with.

Idempotency by name (spec.md "CreateVolume": the same name and parameters give the same
answer, other parameters give ALREADY_EXISTS) must survive a restart of the plugin, so the
parameters of every volume and snapshot are kept in a file beside the pool,
``POOL/csi/state``, replaced atomically (write a temporary file, fsync it, rename it over
the old one, fsync the directory).  Layout (docs/csi.md, "The state file")::

    line 1   "thinstore-csi-state <version> <checksum>\\n"   ASCII; version 1; checksum
             = mmh3 x86 32-bit (seed 0, unsigned) of the body, 8 lowercase hex digits
    body     UTF-8 JSON: {"volumes": {CSI name: record}, "snapshots": {CSI name: record}}

A record is written *before* the pool device it describes is made and dropped *after*
that device is destroyed, so a device of the plugin's never exists without its record.
A record without its device is an operation a crash cut short: :meth:`State.reconcile`
drops it at start (the CO's retry makes it again), so nothing is orphaned either way.
The node service keeps its stage and publish records in a second file of the same
layout, ``POOL/csi/node`` ({"stages": {volume_id: record}, "publishes": {target: record}}).
A file whose magic, version or checksum is wrong stops the plugin with
:class:`StateError` naming the file; it is never silently replaced.
"""

from __future__ import annotations

import json
import os
import threading

import mmh3

MAGIC = "thinstore-csi-state"
VERSION = 1


class StateError(Exception):
    """The plugin's state file is damaged or of an unknown version."""


def _checksum(body: bytes) -> str:
    return f"{mmh3.hash(body, 0, signed=False):08x}"


def pack(data: dict) -> bytes:
    body = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return f"{MAGIC} {VERSION} {_checksum(body)}\n".encode() + body


def unpack(raw: bytes, path: str = "state", kinds=("volumes", "snapshots")) -> dict:
    head, sep, body = raw.partition(b"\n")
    fields = head.decode("ascii", "replace").split(" ")
    if not sep or len(fields) != 3 or fields[0] != MAGIC:
        raise StateError(f"{path} is not a thinstore CSI state file")
    if fields[1] != str(VERSION):
        raise StateError(f"{path} has version {fields[1]}; this thinstore reads {VERSION}")
    if fields[2] != _checksum(body):
        raise StateError(f"{path} fails its checksum (torn or edited); restore it or remove "
                         "it and re-import the volumes")
    data = json.loads(body)
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
        try:
            with open(self.path, "rb") as f:
                self.data = unpack(f.read(), self.path, kinds)
        except FileNotFoundError:
            self.data = {kind: {} for kind in kinds}

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
        tmp = self.path + ".tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(pack(self.data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
