"""Grow a volume's file system to its device at mount, when the device is the larger.

A clone made with ``-o from=VOL@SNAP -o size=BIGGER`` and a volume resized with
``thinstore resize`` have a device larger than the file system on it; Docker users expect
``df`` to show the size they asked for.  At a fresh mount (the volume not attached yet):

* ext4 is grown offline, before it is mounted: ``e2fsck -f -p`` (resize2fs requires a
  checked file system; -p also replays a journal, e.g. of a clone of an unfrozen
  snapshot), then ``resize2fs DEVICE``.  Offline because growing a mounted ext4 needs
  CAP_SYS_RESOURCE, which container hosts often withhold; offline needs nothing more
  than the mount itself.
* xfs only grows mounted: ``xfs_growfs MOUNTPOINT`` right after the mount
  (:meth:`Attacher.grow_filesystem`).

A failed grow is logged and the volume is mounted at its old size (its data is there;
the next fresh mount tries again).  Tools: e2fsprogs (dumpe2fs, e2fsck, resize2fs),
xfsprogs (xfs_info), all run through the attach module's :func:`privileged.run`.
"""

from __future__ import annotations

import logging
import os
import re

from thinstore.errors import ThinstoreError
from thinstore.frontends.attach import filesystem
from thinstore.frontends.attach.privileged import run

log = logging.getLogger("thinstore.docker")

#: the hold on a device while its ext4 is checked and grown, before the mount's own
OWNER = "thinstore-docker-grow"
#: a device at most this much larger than its file system is left alone (mkfs may leave
#: a tail too small for a block group; growing would not use it either)
SLACK = 8 << 20


def device_size(device: str) -> int:
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
        log.info("docker plugin: growing %s's ext4 from %d to %d bytes", name, have, want)
        run(["e2fsck", "-f", "-p", device], what=f"check {name}'s ext4 before growing it",
            ok_codes=(0, 1))
        run(["resize2fs", device], what=f"grow {name}'s ext4 to its device")
        return True
    except (ThinstoreError, OSError, KeyError, ValueError) as exc:
        log.warning("docker plugin: %s keeps its file system's size: growing it failed: %s",
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
        log.warning("docker plugin: %s keeps its file system's size: growing it failed: %s",
                    name, exc)
        return False
