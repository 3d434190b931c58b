"""The snapshotter's metadata store: containerd keys -> pool devices, with transactions.

containerd names a snapshot by a key of arbitrary text ("default/12/extract-... sha256:...",
slashes and spaces included); pool device names allow only ``[A-Za-z0-9_.:-]``.  So each
snapshot gets a number ``id`` and its pool device is named from the number alone
(``ctd-<id>`` for an active snapshot or a view, ``ctd-<id>@c`` once committed); the store
maps the key to the record and the record to the device, so the mapping runs both ways and
no key text ever reaches a device name.

One file beside the pool, ``POOL/containerd/snapshots.json``: a state file of
:mod:`thinstore.frontends.statefile` (docs/statefile.md) of kind
``thinstore-containerd-snapshots``, whose body is (docs/containerd.md)::

    {"generation": 7,              # +1 per transaction
     "fs_type": "ext4",            # the base's file system, once made
     "next_id": 13,                # never reused, even after a crash
     "snapshots": {KEY: {"id": 5, "kind": "committed" | "active" | "view",
                         "parent": KEY or "", "device": "ctd-5@c",
                         "labels": {...}, "created": NS, "updated": NS}},
     "intents": [{"op": "prepare" | "commit", "key": KEY, "id": 12, ...}]}

Files of the earlier layout (one JSON object ``{"magic", "version": 1, "checksum",
"body"}``) are still read.  A transaction copies the body, lets the caller change the
copy and writes it whole: a temporary file, fsync, rename over the old one, fsync of the
directory.  A crash leaves either the old file or the new one, never a mix; a file of
another kind, a newer version, cut short or failing its checksum raises
:class:`~thinstore.errors.CorruptMetadata` naming the file rather than guessing.

Intent, act, record: an operation that makes a device first records its intent (and takes
its id) in one transaction, then acts on the pool, then records the result and drops the
intent in another.  Recovery (:meth:`thinstore.frontends.containerd.snapshotter.
Snapshotter.recover`) undoes what an intent left behind.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading

from thinstore.errors import CorruptMetadata
from thinstore.frontends import statefile

MAGIC = "thinstore-containerd-snapshots"
FILENAME = "snapshots.json"

KINDS = ("view", "active", "committed")


def empty_body() -> dict:
    return {"generation": 0, "next_id": 1, "snapshots": {}, "intents": []}


class Store:
    """The records of one snapshotter, kept in ``directory/snapshots.json``.

    Readers use :attr:`body` (do not change it); writers use :meth:`transaction`.  The
    object's own lock serializes transactions; callers that read, decide and then write
    hold :attr:`lock` around all three.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.path = os.path.join(directory, FILENAME)
        self.lock = threading.RLock()
        os.makedirs(directory, exist_ok=True)
        self.fresh = not os.path.lexists(self.path)     # no records were ever kept here
        self._file = statefile.StateFile(self.path, MAGIC, legacy_key="body",
                                         error=CorruptMetadata,
                                         advice="restore it from a backup, or move "
                                                "it aside and destroy the ctd- devices "
                                                "the next start names, to start afresh")
        self.body = self._file.load(default=empty_body())

    @contextlib.contextmanager
    def transaction(self):
        """Yield a copy of the body to change; it replaces the stored one, durably, when
        the block ends without an exception (and is thrown away when it raises)."""
        with self.lock:
            new = copy.deepcopy(self.body)
            yield new
            new["generation"] = self.body["generation"] + 1
            self._write(new)
            self.body = new

    def _write(self, body: dict) -> None:
        self._file.save(body)

    # ------------------------------------------------------------ queries
    def get(self, key: str) -> dict | None:
        return self.body["snapshots"].get(key)

    def children(self, key: str) -> list[str]:
        return [k for k, r in self.body["snapshots"].items() if r["parent"] == key]

    def devices(self) -> set[str]:
        """Every pool device some record names."""
        return {r["device"] for r in self.body["snapshots"].values()}
