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
import logging
import os
import stat

from .units import format_size

log = logging.getLogger("thinstore")

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


class LogRoom:
    """SyncLog's room (a mixin, as Pool's are): the cap measured, the file grown within
    it, and cut back. Reaches SyncLog's fio, extent, cap, tail, live, _append,
    _counts, _datasync, _grow, _limits, _cap_for (MAX_BYTES stays synclog's) and
    _AHEAD (how far ahead of the tail the file is grown)."""

    def _measure(self, again: bool = False) -> None:
        """The cap from the host file system's free space now: the epoch's at its
        start; `again` (at a growth, or the timer's look) may only lower it. Says so in
        the log when the log turns off (or on again): FLUSHes become (stop being)
        commits."""
        free = host_free(self.fio)
        was, cap = self.cap, self._cap_for(free)
        self.cap = min(self.cap, cap) if again else cap
        if (was == 0) != (self.cap == 0):       # was is None at open: said quietly
            if self.cap:
                log.info("intent log on again: it may grow to %s", format_size(self.cap))
            else:
                log.log(logging.INFO if was is None else logging.WARNING,
                        "intent log off: %s free on the file system that holds it; FLUSHes "
                        "are full commits until about %s are free there", format_size(free),
                        format_size(int(LOG_FLOOR / LOG_SHARE)))

    def _make_room(self, end: int) -> bool:
        """Grow the file for a record ending at `end`: `_AHEAD` bytes (two growth
        steps) ahead of it where the cap (measured again now) allows, at least to
        `end`. A growth the host file system refuses for want of room (FULL) is undone
        and lowers the cap to the extent: True only if the record fits in what the
        file holds already."""
        self._measure(again=True)
        if end > self.cap:
            return False
        want = min(end + self._AHEAD, self.cap)
        if want <= self.extent:
            return True
        try:
            self._grow(want)
        except OSError as e:
            if e.errno not in FULL:
                raise
            self._counts["grow_failures"] += 1
            log.warning("intent log: no room to grow to %d bytes (%s); until the next "
                        "commit, flushes it cannot hold are full commits", want, e.strerror)
            try:        # the zeros written past the extent: no record is there
                self.fio.truncate(self.extent)
            except OSError:
                pass
            self.cap = min(self.cap, self.extent)
            return end <= self.extent
        return True

    def suspend(self) -> None:
        """After a full commit failed (Pool.commit, exclusive lock held; e.g. ENOSPC for
        its metadata): the open transaction may hold a device created, resized or
        destroyed that the committed tree lacks, and replay stops at a record naming
        such a device, so the records after it -- other devices' FLUSHed writes --
        would be lost with it. So the log is off (cap 0) until a commit succeeds
        (committed() measures the cap again): meanwhile every FLUSH is a full commit,
        which fails, saying why, as long as the failing commit does."""
        with self._append:
            if self.cap:
                log.warning("intent log off until a full commit succeeds: FLUSHes are "
                            "full commits meanwhile")
            self.cap = 0
            self._limits()

    def tighten(self, pool) -> None:
        """From the writeback timer (unlocked; a statvfs when nothing is to do): if the
        host file system is now too tight for the file's extent (the cap measured
        again is below it), lower the cap and cut the file to the larger of the tail
        and the cap. Only zeros lie past the tail (every record written or in flight
        is before it, and appends wait on the mutex), so nothing of the epoch is lost;
        the next commit cuts the rest. Not before the pool's open has replayed and
        folded the log (`live`): until then, records past the tail may be replayed."""
        if not self.live:
            return
        free = host_free(self.fio)
        if self._cap_for(free) >= self.extent:
            return
        with pool.lock.shared:
            if pool._closed:
                return
            with self._append:
                self._measure(again=True)
                keep = max(self.tail, self.cap)
                if keep < self.extent:
                    self._cut(keep)
                self._limits()

    def _trim(self) -> None:
        """After a commit's discard (no record write in flight): a file larger than the
        new cap is cut to it, and the space goes back to the host file system. A crash
        before or during the truncate is harmless: what it cuts is an older epoch's."""
        if self.extent <= self.cap:
            return
        try:
            self._cut(self.cap)
        except OSError as e:
            log.warning("intent log: could not shrink to %d bytes: %s", self.cap, e)

    def _cut(self, size: int) -> None:
        """Truncate the file to `size` and sync that: a journaling file system (ext4)
        reuses the blocks a truncate frees only once its journal has committed it,
        otherwise seconds later, and the space is wanted now."""
        self.fio.truncate(size)
        self.extent = size
        self._counts["trims"] += 1
        self._datasync()
