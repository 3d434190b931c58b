"""The attach state file: which exports are attached where, mounted where, held by whom.

Format (JSON, UTF-8, one object; docs/attach.md describes each field)::

    {"magic": "thinstore-attach-state", "version": 1,
     "crc32": CRC-32 (zlib) of the canonical JSON of "attachments",
     "attachments": {EXPORT: ATTACHMENT, ...}}

The canonical JSON is ``json.dumps(attachments, sort_keys=True, separators=(",", ":"))``
encoded as UTF-8.  An ATTACHMENT is :meth:`Attachment.to_dict`.

Writes are atomic: the new state goes to ``NAME.tmp``, is fsynced, renamed over ``NAME``,
and the directory is fsynced, so a crash leaves the old state or the new one, never a
torn file.  Every step that creates a host object (a FUSE mount, a loop device, a mount)
is recorded *before* it is made (an intent), so that :meth:`Attacher.recover` finds it
after a crash at any point.  A file with another magic, a newer version or a bad checksum
is refused with :class:`AttachError` rather than overwritten: it may describe mounts that
someone must clean up by hand.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zlib

from .privileged import AttachError

MAGIC = "thinstore-attach-state"
VERSION = 1


@dataclasses.dataclass
class Attachment:
    """One export's attachment on this host.

    export      the NBD export (device) name: a volume, clone or snapshot
    transport   "nbdfuse-loop" | "kernel-nbd"; None while nothing is attached
    device      /dev/loopN or /dev/nbdN once connected (kernel-nbd: from just before)
    read_only   attached read-only
    workdir     the transport's own directory (nbdfuse-loop: the FUSE mount point)
    helper_pid  the nbdfuse process serving the FUSE file (nbdfuse-loop), else None
    server      ``PID:STARTTIME`` of the process whose NBD server the device reads
                through; the attachment lives no longer than that process
    owners      owner id -> "device" | "mount": the mount refcount (a set per owner:
                a repeated attach or mount by one owner counts once)
    mount       None, or {"target", "fstype", "options", "read_only", "state"} where
                state is "mounting" (intent written, mount maybe made) or "mounted"
    """

    export: str
    transport: str | None = None
    device: str | None = None
    read_only: bool = False
    workdir: str | None = None
    helper_pid: int | None = None
    server: str | None = None
    owners: dict = dataclasses.field(default_factory=dict)
    mount: dict | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Attachment":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    @property
    def mounted(self) -> bool:
        return bool(self.mount and self.mount.get("state") == "mounted")

    def mount_owners(self) -> list[str]:
        return sorted(o for o, kind in self.owners.items() if kind == "mount")


def _canonical(attachments: dict) -> bytes:
    return json.dumps(attachments, sort_keys=True, separators=(",", ":")).encode()


class StateFile:
    """Load and atomically save the attachments of one :class:`Attacher`."""

    def __init__(self, path: str):
        self.path = os.path.abspath(path)

    def load(self) -> dict[str, Attachment]:
        """The recorded attachments ({} when the file does not exist yet)."""
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return {}
        try:
            doc = json.loads(raw)
            attachments = doc["attachments"]
            magic, version, crc = doc["magic"], doc["version"], doc["crc32"]
        except (ValueError, KeyError, TypeError):
            raise AttachError(f"attach state {self.path} is not a thinstore attach state "
                              "file; move it away to start afresh (and check `losetup -l` "
                              "and `mount` for what it described)") from None
        if magic != MAGIC:
            raise AttachError(f"attach state {self.path}: magic {magic!r}, not {MAGIC!r}")
        if not isinstance(version, int) or version > VERSION:
            raise AttachError(f"attach state {self.path} has version {version}; this thinstore "
                              f"reads version {VERSION}: upgrade thinstore")
        if zlib.crc32(_canonical(attachments)) != crc:
            raise AttachError(f"attach state {self.path} fails its checksum; move it away to "
                              "start afresh (and check `losetup -l` and `mount`)")
        return {name: Attachment.from_dict(rec) for name, rec in attachments.items()}

    def save(self, records: dict[str, Attachment]) -> None:
        """Replace the file with ``records``: tmp + fsync + rename + directory fsync."""
        attachments = {name: rec.to_dict() for name, rec in sorted(records.items())}
        doc = {"magic": MAGIC, "version": VERSION,
               "crc32": zlib.crc32(_canonical(attachments)), "attachments": attachments}
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
