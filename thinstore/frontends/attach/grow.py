"""Grow a volume's file system to its device at mount, when the device is the larger.

A clone made larger than its snapshot (Docker's ``-o from=VOL@SNAP -o size=BIGGER``, a
CSI CreateVolume from a snapshot with a larger capacity) and a volume resized since its
file system was made (``thinstore resize``, CSI's offline ControllerExpandVolume) have a
device larger than the file system on it; users expect ``df`` to show the size they
asked for.  :func:`mount_grown` mounts so; at a fresh mount (the volume not attached yet):

* ext4 is grown offline, before it is mounted: ``e2fsck -f -p`` (resize2fs requires a
  checked file system; -p also replays a journal, e.g. of a clone of an unfrozen
  snapshot), then ``resize2fs DEVICE``.  Offline because growing a mounted ext4 needs
  CAP_SYS_RESOURCE, which container hosts often withhold; offline needs nothing more
  than the mount itself.
* xfs only grows mounted: ``xfs_growfs MOUNTPOINT`` right after the mount
  (:meth:`Attacher.grow_filesystem`).

A read-only mount is not grown (both tools write).  A failed grow is logged and the
volume is mounted at its old size (its data is there; the next fresh mount tries
again).  Tools: e2fsprogs (dumpe2fs, e2fsck, resize2fs), xfsprogs (xfs_info), all run
through :func:`.privileged.run`.
"""

from __future__ import annotations

import logging
import os
import re

from thinstore.errors import ThinstoreError

from . import filesystem
from .privileged import run

log = logging.getLogger("thinstore.attach")

#: the hold on a device while its ext4 is checked and grown, before the mount's own; a
#: frontend drops it at start (:func:`forget_holds`) in case a crash cut a grow short
OWNER = "thinstore-grow"
#: the name the Docker plugin gave that hold before it moved here
OLD_OWNERS = ("thinstore-docker-grow",)
#: a device at most this much larger than its file system is left alone (mkfs may leave
#: a tail too small for a block group; growing would not use it either)
SLACK = 8 << 20


def device_size(device: str) -> int:
    """Bytes of block device ``device`` (seek to its end)."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def ext4_size(device: str) -> int:
    """Bytes of the ext4 on ``device``: Block count x Block size (``dumpe2fs -h``)."""
    out = run(["dumpe2fs", "-h", device], what=f"read the ext4 super block of {device}").stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return int(fields["Block count"]) * int(fields["Block size"])


def xfs_size(target: str) -> int:
    """Bytes of the data section of the xfs mounted on ``target`` (``xfs_info``)."""
    out = run(["xfs_info", target], what=f"read the xfs geometry of {target}").stdout
    data = re.search(r"^data\s*=\s*bsize=(\d+)\s+blocks=(\d+)", out, re.M)
    if data is None:
        raise ThinstoreError(f"xfs_info {target}: no data section in {out[:200]!r}")
    return int(data.group(1)) * int(data.group(2))


def ext4_offline(name: str, device: str) -> bool:
    """Before the mount: grow an ext4 smaller than ``device`` to fill it.  True if grown;
    False if there was nothing to do or it failed (logged)."""
    try:
        if filesystem.signature(device).get("TYPE") != "ext4":
            return False
        have, want = ext4_size(device), device_size(device)
        if want <= have + SLACK:
            return False
        log.info("attach: growing %s's ext4 from %d to %d bytes", name, have, want)
        run(["e2fsck", "-f", "-p", device], what=f"check {name}'s ext4 before growing it",
            ok_codes=(0, 1))
        run(["resize2fs", device], what=f"grow {name}'s ext4 to its device")
        return True
    except (ThinstoreError, OSError, KeyError, ValueError) as exc:
        log.warning("attach: %s keeps its file system's size: growing it failed: %s",
                    name, exc)
        return False


def xfs_online(attacher, name: str, device: str, target: str) -> bool:
    """After the mount: grow an xfs smaller than ``device``.  True if grown."""
    try:
        if device_size(device) <= xfs_size(target) + SLACK:
            return False
        attacher.grow_filesystem(name)
        return True
    except (ThinstoreError, OSError) as exc:
        log.warning("attach: %s keeps its file system's size: growing it failed: %s",
                    name, exc)
        return False


def mount_grown(attacher, export: str, target: str, owner: str, fstype: str = "ext4",
                options=(), read_only: bool = False) -> str:
    """:meth:`Attacher.mount` (same arguments and errors), and at a fresh mount the file
    system grown to fill its device first (ext4, offline) or right after (xfs).  A mount
    already made is shared as it is (its device keeps the size it had when attached)."""
    if (attacher.attached().get(export) or {}).get("device"):
        return attacher.mount(export, target, owner, fstype=fstype, options=options,
                              read_only=read_only)
    device = attacher.attach(export, OWNER, read_only=read_only)
    try:
        if not read_only:
            ext4_offline(export, device)
        target = attacher.mount(export, target, owner, fstype=fstype, options=options,
                                read_only=read_only)
    finally:
        attacher.detach(export, OWNER)
    mount = (attacher.attached().get(export) or {}).get("mount") or {}
    if mount.get("fstype") == "xfs" and not read_only:
        xfs_online(attacher, export, device, target)
    return target


def forget_holds(attacher) -> None:
    """At a frontend's start: drop the grow holds a crash left (they hold nothing)."""
    for export in attacher.attached():
        for owner in (OWNER, *OLD_OWNERS):
            attacher.detach(export, owner)


def fits_device(attacher, export: str) -> bool:
    """The mounted file system of ``export`` fills its device (within :data:`SLACK`)."""
    info = attacher.attached().get(export) or {}
    mount, device = info.get("mount") or {}, info.get("device")
    if not device or not mount:
        return True
    if mount.get("fstype") == "xfs":
        return device_size(device) <= xfs_size(mount["target"]) + SLACK
    return device_size(device) <= ext4_size(device) + SLACK
