"""File systems on an attached device: probe, make (only on a blank device), mount, freeze.

A file system is made only when the device is blank: ``blkid -p`` (low-level probe, no
cache) finds no signature of any kind (file system, partition table, RAID member) AND the
first :data:`HEAD_BYTES` and last :data:`TAIL_BYTES` read as zeros.  Anything else is data,
and mkfs over it is refused with :class:`AttachError`.

Supported types: ``ext4`` and ``xfs``.  xfs is always mounted with ``nouuid``: a clone
carries its origin's file system UUID, and xfs refuses a second mount of one UUID.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct

from . import host
from .privileged import AttachError, attempt, run

HEAD_BYTES = 4 << 20
TAIL_BYTES = 1 << 20
FSTYPES = ("ext4", "xfs")

#: mkfs per type: no discard (a thin volume is already unmapped), quiet
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-E", "nodiscard,lazy_itable_init=1,lazy_journal_init=1"],
    "xfs": ["mkfs.xfs", "-q", "-K"],
}
#: _IOR('X', 125, __u32): ext4's EXT4_IOC_SHUTDOWN and xfs's XFS_IOC_GOINGDOWN (one number,
#: one flag set: linux/fs/ext4/ext4.h, fs/xfs/libxfs/xfs_fs.h)
FS_IOC_SHUTDOWN = 0x8004587D
SHUTDOWN_DEFAULT = 0x0          # freeze (syncs data and journal), shut down, thaw
GROW = {"ext4": "resize2fs", "xfs": "xfs_growfs"}
#: fsfreeze -u's words (in the C locale) for a file system that is not frozen (EINVAL)
NOT_FROZEN = "Invalid argument"

log = logging.getLogger("thinstore.attach")


def signature(device: str) -> dict[str, str]:
    """What ``blkid -p -o export`` finds on ``device`` ({} when nothing: exit status 2)."""
    done = run(["blkid", "-p", "-o", "export", device], what=f"probe {device}",
               ok_codes=(0, 2))
    return dict(line.split("=", 1) for line in done.stdout.splitlines() if "=" in line)


def reads_zero(device: str) -> bool:
    """The device's first HEAD_BYTES and last TAIL_BYTES are all zero bytes."""
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        spans = [(0, min(HEAD_BYTES, size)), (max(0, size - TAIL_BYTES), min(TAIL_BYTES, size))]
        for offset, length in spans:
            data = os.pread(fd, length, offset)
            if data.count(0) != len(data):
                return False
        return True
    finally:
        os.close(fd)


def existing_fstype(device: str) -> str | None:
    """The file system on ``device``; None when it is blank.  Raises AttachError when it
    holds something that is neither blank nor a supported file system (never mkfs it)."""
    found = signature(device)
    fstype = found.get("TYPE")
    if fstype in FSTYPES:
        return fstype
    if found:
        kind = fstype or found.get("PTTYPE") and "a partition table" or "a signature"
        raise AttachError(f"{device} holds {kind} ({', '.join(f'{k}={v}' for k, v in sorted(found.items()) if k != 'DEVNAME')}), "
                          f"not one of {', '.join(FSTYPES)}: refusing to mount or format it")
    if not reads_zero(device):
        raise AttachError(f"{device} holds data but no file system signature: refusing to "
                          "make a file system over it")
    return None


def make(device: str, fstype: str) -> None:
    """mkfs ``fstype`` on ``device``, which the caller has found blank."""
    if fstype not in MKFS:
        raise AttachError(f"file system {fstype!r} is not supported (use {', '.join(FSTYPES)})")
    run([*MKFS[fstype], device], what=f"make {fstype} on {device}")


def mount_options(fstype: str, options, read_only: bool) -> list[str]:
    opts = [o for o in options if o]
    if fstype == "xfs" and "nouuid" not in opts:
        opts.append("nouuid")
    opts.insert(0, "ro" if read_only else "rw")
    return opts


def mount(device: str, target: str, fstype: str, options, read_only: bool) -> None:
    os.makedirs(target, mode=0o755, exist_ok=True)
    run(["mount", "-t", fstype, "-o", ",".join(mount_options(fstype, options, read_only)),
         device, target], what=f"mount {device} on {target}")


def unmount(target: str) -> None:
    """Unmount ``target`` if something is mounted there (a frozen one is thawed first)."""
    if host.mount_at(target) is None:
        return
    thaw(target, quiet=True)
    run(["umount", target], what=f"unmount {target}")


def unmount_dead(target: str) -> None:
    """Clean-up after a crash: unmount, lazily when busy (a container's bind mount holds the
    old file system; it detaches when that goes)."""
    if host.mount_at(target) is None:
        return
    thaw(target, quiet=True)
    if not attempt(["umount", target], what=f"unmount {target}"):
        run(["umount", "-l", target], what=f"lazily unmount {target}")


def sync(target: str) -> None:
    """Write the file system's dirty data out to its device (``sync -f``: syncfs(2))."""
    run(["sync", "-f", target], what=f"sync {target}", timeout=300)


def flush_device(device: str) -> None:
    """fsync(2) the block device: the kernel sends a cache flush down the stack (loop ->
    the FUSE file -> nbdfuse's NBD_CMD_FLUSH; or the kernel NBD client's flush), so that
    what the file system wrote is durable in the pool before the device goes."""
    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise AttachError(f"flush {device}: {exc.strerror}") from None
    try:
        os.fsync(fd)
    except OSError as exc:
        raise AttachError(f"flush {device}: {exc.strerror}") from None
    finally:
        os.close(fd)


def shut_down(path: str) -> None:
    """Shut the file system mounted at ``path`` down (FS_IOC_SHUTDOWN, default mode: the
    kernel freezes it, which writes out its dirty data and journal, sets it shut down and
    thaws it, so no write slips in between the sync and the shutdown): every later read
    or write, through any of its mounts, fails with EIO.  For a
    file system that outlives its device (a container's bind mount still holds it while
    the device is detached): loud errors instead of writes accepted into the page cache
    and then dropped.  Failure is logged, not raised (the device goes regardless)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        log.warning("shut down the file system at %s: %s", path, exc.strerror)
        return
    try:
        fcntl.ioctl(fd, FS_IOC_SHUTDOWN, struct.pack("I", SHUTDOWN_DEFAULT))
        log.warning("shut down the file system at %s: its device is going while it is "
                    "still mounted; later I/O there fails with EIO", path)
    except OSError as exc:
        log.warning("shut down the file system at %s: %s", path, exc.strerror)
    finally:
        os.close(fd)


def freeze(target: str) -> None:
    run(["fsfreeze", "-f", target], what=f"freeze {target}", timeout=120)


def thaw(target: str, quiet: bool = False) -> None:
    """``fsfreeze -u``; quiet (clean-up, where the file system is usually not frozen):
    nothing raised, and the kernel's EINVAL for a file system that is not frozen
    ("unfreeze failed: Invalid argument") is logged at debug only; any other failure
    (no such mount, no permission, a missing tool) is still a warning."""
    if not quiet:
        run(["fsfreeze", "-u", target], what=f"thaw {target}", timeout=120)
        return
    try:
        done = run(["fsfreeze", "-u", target], what=f"thaw {target}", ok_codes=(0, 1),
                   timeout=60, env=dict(os.environ, LC_ALL="C"))
    except AttachError as exc:
        log.warning("%s", exc)
        return
    detail = (done.stderr or done.stdout).strip()
    if done.returncode == 0:
        return
    if NOT_FROZEN in detail:
        log.debug("thaw %s: not frozen (%s)", target, detail)
    else:
        log.warning("thaw %s failed (exit %d): %s", target, done.returncode, detail)


def grow(device: str, target: str, fstype: str) -> None:
    """Grow the mounted file system to fill its device (both grow online)."""
    if fstype == "xfs":
        run([GROW[fstype], target], what=f"grow xfs on {target}")
    else:
        run([GROW[fstype], device], what=f"grow ext4 on {device}")
