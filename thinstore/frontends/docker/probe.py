"""What a volume's file system is, read without attaching or changing anything.

:func:`read_only` tells a mounted file system that has stopped writing after errors.
(What file system a device holds, read from the pool without attaching it, is
:func:`thinstore.frontends.attach.fsbounds.probe_fs`.)
"""

from __future__ import annotations

import os
import re


def read_only(target: str) -> bool:
    """The file system mounted on ``target`` is read-only now: the mount or its super
    block says ``ro``, or ext4 has stopped writing after errors (Linux 6.x shows it as
    the super option ``emergency_ro`` while the mount still says rw).  Source:
    /proc/self/mountinfo (proc(5)), the last mount stacked on ``target``."""
    try:
        if os.statvfs(target).f_flag & os.ST_RDONLY:
            return True
        real = os.path.realpath(target)
        found = None
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields, tail = left.split(), right.split()
                if len(fields) >= 6 and len(tail) >= 3 and _unescape(fields[4]) == real:
                    found = fields[5].split(",") + tail[2].split(",")
    except OSError:
        return False
    return bool(found) and bool({"ro", "emergency_ro"} & set(found))


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as \\NNN (octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)
