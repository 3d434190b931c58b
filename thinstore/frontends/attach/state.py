"""The attach state file: which exports are attached where, mounted where, held by whom.

A state file of :mod:`thinstore.frontends.statefile` (header line, then the body;
docs/statefile.md) of kind ``thinstore-attach-state`` whose body is one JSON object
``{EXPORT: ATTACHMENT, ...}``, an ATTACHMENT being :meth:`Attachment.to_dict`
(docs/attach.md describes each field).  Files of the earlier layout (one JSON object
``{"magic", "version": 1, "crc32", "attachments"}``) are still read.

Writes are atomic (tmp + fsync + rename + directory fsync), so a crash leaves the old
state or the new one, never a torn file.  Every step that creates a host object (a FUSE
mount, a loop device, a mount) is recorded *before* it is made (an intent), so that
:meth:`Attacher.recover` finds it after a crash at any point.  A file of another kind,
a newer version, cut short or with a bad checksum is refused with :class:`AttachError`
rather than overwritten: it may describe mounts that someone must clean up by hand.
"""

from __future__ import annotations

import dataclasses

from thinstore.frontends import statefile

from .privileged import AttachError

MAGIC = "thinstore-attach-state"
VERSION = statefile.VERSION


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
    unfinished_mkfs  the file system type whose mkfs began on this (blank) device and has
                not finished; a crash leaves it set, and the next mount makes it again
                rather than refusing the partial file system as "data"
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
    unfinished_mkfs: str | None = None

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


class StateFile:
    """Load and atomically save the attachments of one :class:`Attacher`."""

    def __init__(self, path: str):
        self._file = statefile.StateFile(
            path, MAGIC, legacy_key="attachments", error=AttachError,
            advice="move it away to start afresh (and check `losetup -l` and `mount` for "
                   "what it described)")
        self.path = self._file.path

    def load(self) -> dict[str, Attachment]:
        """The recorded attachments ({} when the file does not exist yet)."""
        attachments = self._file.load(default={})
        return {name: Attachment.from_dict(rec) for name, rec in attachments.items()}

    def save(self, records: dict[str, Attachment]) -> None:
        """Replace the file with ``records``, durably."""
        self._file.save({name: rec.to_dict() for name, rec in sorted(records.items())})
