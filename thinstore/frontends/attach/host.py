"""What the host says about mounts, loop devices, NBD devices and processes (read-only).

Sources: ``/proc/self/mountinfo`` (proc(5), "mountinfo"), ``/sys/block/loopN/loop/
backing_file`` (the loop driver's sysfs attributes), ``/sys/block/nbdN/pid`` (the NBD
driver: present while a device is connected), ``/proc/PID/stat`` and ``/proc/PID/cmdline``.
Nothing here changes the host; the privileged steps are in :mod:`.privileged`.
"""

from __future__ import annotations

import glob
import os
import re
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
            stat = f.read()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
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
