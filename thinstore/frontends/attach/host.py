"""What the host says about mounts, loop devices, NBD devices and processes (read-only).

Sources: ``/proc/self/mountinfo`` and ``/proc/PID/mountinfo`` (proc(5), "mountinfo"), ``/sys/block/loopN/loop/
backing_file`` (the loop driver's sysfs attributes), ``/sys/block/nbdN/pid`` (the NBD
driver: present while a device is connected), ``/proc/PID/stat`` and ``/proc/PID/cmdline``.
Nothing here changes the host; the privileged steps are in :mod:`.privileged`.
"""

from __future__ import annotations

import glob
import os
import re
import stat
from typing import NamedTuple

DELETED = " (deleted)"


class Mount(NamedTuple):
    """One line of mountinfo: where, what file system type, from which source."""
    target: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as \\NNN (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts() -> list[Mount]:
    """Every mount this process sees, in mount order."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and len(tail) >= 2:
                out.append(Mount(_unescape(fields[4]), tail[0], _unescape(tail[1])))
    return out


def mount_at(target: str) -> Mount | None:
    """The mount on ``target`` (the last one stacked there), or None."""
    target = os.path.realpath(target)
    found = [m for m in mounts() if m.target == target]
    return found[-1] if found else None


class DeviceMount(NamedTuple):
    """A mount of one block device's file system, in some mount namespace.

    target     the mount point as that namespace sees it
    path       a path this process can open to reach it: ``target`` in our own namespace,
               ``/proc/PID/root/TARGET`` in another (a container's, a shim's)
    pid        a process of that namespace (None for our own)
    """
    target: str
    path: str
    pid: int | None


def device_number(device: str) -> str | None:
    """``"MAJOR:MINOR"`` of block device ``device`` (mountinfo's third field), None if it
    is not a block device (gone)."""
    try:
        st = os.stat(device)
    except OSError:
        return None
    if not stat.S_ISBLK(st.st_mode):
        return None
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"


def mounts_of(device: str) -> list[DeviceMount]:
    """Every mount of ``device``'s file system in every mount namespace of the host (each
    namespace read once, through ``/proc/PID/mountinfo`` of one of its processes), ours
    first; matched by major:minor, so any path naming the device (/dev/loopN, a
    symlink, a bind mount of a sub-directory) counts.  A container's bind mount of a
    volume is one of these: the file system lives on while any remains."""
    number = device_number(device)
    if number is None:
        return []
    own = _namespace("self")
    seen, found = set(), []
    pids = ["self"] + sorted((e for e in os.listdir("/proc") if e.isdigit()), key=int)
    for pid in pids:
        ns = _namespace(pid)
        if ns is None or ns in seen:
            continue
        seen.add(ns)
        try:
            with open(f"/proc/{pid}/mountinfo") as f:
                lines = f.readlines()
        except OSError:
            continue                        # the process ended while we looked
        for line in lines:
            fields = line.partition(" - ")[0].split()
            if len(fields) >= 5 and fields[2] == number:
                target = _unescape(fields[4])
                if ns == own:
                    found.append(DeviceMount(target, target, None))
                else:
                    found.append(DeviceMount(target, f"/proc/{pid}/root{target}", int(pid)))
    return found


def holders(device: str) -> list[str]:
    """Block devices stacked on ``device`` (device-mapper, md): /sys/block/X/holders."""
    try:
        return sorted(os.listdir(f"/sys/block/{os.path.basename(device)}/holders"))
    except OSError:
        return []


def _namespace(pid: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def loops_backed_by(prefix: str) -> dict[str, str]:
    """Loop devices whose backing file lies under ``prefix`` -> /dev/loopN: backing path.

    A backing file that is gone reads as its old path with " (deleted)" appended.
    """
    prefix = os.path.realpath(prefix).rstrip("/") + "/"
    found = {}
    for attr in glob.glob("/sys/block/loop*/loop/backing_file"):
        try:
            with open(attr) as f:
                backing = f.read().rstrip("\n")
        except OSError:
            continue                    # detached while we looked
        if backing.removesuffix(DELETED).startswith(prefix):
            found["/dev/" + attr.split("/")[3]] = backing
    return found


def loop_backing(device: str) -> str | None:
    """The backing file of loop ``device``, or None when it is not set up."""
    try:
        with open(f"/sys/block/{os.path.basename(device)}/loop/backing_file") as f:
            return f.read().rstrip("\n")
    except OSError:
        return None


def block_size_bytes(device: str) -> int | None:
    """A block device's size in bytes (sysfs counts 512-byte sectors), None if absent."""
    try:
        with open(f"/sys/block/{os.path.basename(device)}/size") as f:
            return int(f.read()) * 512
    except (OSError, ValueError):
        return None


def nbd_connected(device: str) -> bool:
    """True while kernel NBD ``device`` (/dev/nbdN) has a server connection."""
    return os.path.exists(f"/sys/block/{os.path.basename(device)}/pid")


def kernel_nbd_available() -> bool:
    """The host has the kernel NBD client (the module loaded, or its devices present)."""
    return os.path.exists("/sys/module/nbd") or os.path.exists("/dev/nbd0")


def process_identity(pid: int | None = None) -> str | None:
    """``"PID:STARTTIME"`` of a live process (start time in clock ticks since boot, field
    22 of /proc/PID/stat), which a reused PID does not repeat; None if it is gone."""
    pid = os.getpid() if pid is None else pid
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return f"{pid}:{fields[19]}" if len(fields) > 19 else None


def cmdline(pid: int) -> list[str]:
    """The argument vector of ``pid`` ([] when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return []


def processes_mentioning(text: str, program: str) -> list[int]:
    """PIDs of live ``program`` processes with ``text`` in one of their arguments."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            argv = cmdline(int(entry))
            if argv and os.path.basename(argv[0]) == program and any(text in a for a in argv):
                found.append(int(entry))
    return found
