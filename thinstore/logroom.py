"""How much of the host file system the intent log may take (docs/integrity.md).

The intent log (synclog.py) is the pool's own bookkeeping: it must never take the
space the pool's data and its commits need. So the size its file may reach in an
epoch, its *cap*, follows the free space of the host file system that holds it:

- at each epoch's start (the log's creation at open, and every full commit) the cap
  is LOG_SHARE of the space the log could have: the file system's free space as an
  unprivileged user sees it (``statvfs`` f_bavail; what root keeps back is left to
  root) plus the bytes the log's file holds already, rounded down to whole growth
  steps and never above synclog.MAX_BYTES;
- at each growth of the file within the epoch it is measured again and may only
  shrink: data filling the file system lowers it, so the log stops growing, the
  next flush that does not fit is a full commit instead, and that commit (the new
  epoch) shrinks the file to the new cap;
- a share below LOG_FLOOR turns the log off for the epoch (cap 0): every flush is a
  full commit, which is slower but writes only what the commit needs.

Numbers. LOG_SHARE 1/8: seven eighths of what is free stays for data and metadata;
from 4 GiB free the eighth passes MAX_BYTES (512 MiB), so only a tight file system
sees a smaller log. ZFS likewise bounds its dirty data by a share of memory
(zfs_dirty_data_max, 10%). LOG_FLOOR 8 MiB: the log keeps two 1 MiB growth steps
written ahead of its tail and the writeback timer commits once half of the cap is
used (writeback.LOG_EARLY); below 8 MiB that leaves a few MiB of records between
commits, not worth the space the file takes from a file system that tight.

Where the log is not a local file (a RADOS object: rados_file.py, no descriptor; or
a block device) there is no host file system to measure: the cap is MAX_BYTES, as
before this rule.
"""

from __future__ import annotations

import errno
import os
import stat

LOG_SHARE = 1 / 8           # the log may take this share of (free space + its own file)
LOG_FLOOR = 8 << 20         # a share below this turns the log off for the epoch
#: errors of a write that only mean "no room": a growth of the log failing with one of
#: them makes the flush a full commit instead (SyncLog._make_room)
FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def host_free(fio) -> int | None:
    """Bytes free on the file system that holds `fio` (f_bavail * f_frsize), or None
    where `fio` is not a local regular file (no descriptor: RADOS; a block device)."""
    fd = getattr(fio, "fd", None)
    if not isinstance(fd, int) or fd < 0 or getattr(fio, "block", False):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        sv = os.fstatvfs(fd)
    except OSError:
        return None
    return sv.f_bavail * sv.f_frsize


def cap(free: int | None, held: int, most: int, step: int) -> int:
    """The size in bytes the log's file may reach: LOG_SHARE of `free` (bytes free on
    the host file system, None: not measurable) plus `held` (bytes its file holds now),
    rounded down to whole `step`s, at most `most`; 0 (the log is off) below LOG_FLOOR."""
    if free is None:
        return most
    share = int((free + held) * LOG_SHARE) // step * step
    return 0 if share < LOG_FLOOR else min(share, most)
