"""Background writeback: the commit timer and the work it moves out of the commit.

While writes are pending, a thread commits the pool every `commit_interval` seconds
(a transaction group closed on a timer, as ZFS's txg timeout does), or sooner once
the intent log's epoch is half full (`_log_filling`). Before it takes
the pool lock for that commit it does, unlocked, the two slow parts a commit would
otherwise do with every request waiting behind it: it writes the transaction's data
chunks out (paced, `PRESYNC_WINDOW` bytes queued at once) and hashes them for the
data checksums (DataSums.prehash). Between the two, still unlocked, it fdatasyncs the
data file (`_predatasync`), so that the file system's journal commit for the new
chunks' blocks and the disk's cache flush happen before the lock, not under it; the
hashing comes late, so that as few chunks as can be are written again before the
commit, which must hash those again with the lock held; and a second fdatasync after
it takes what was written while it hashed (QD16 4K writes: the data fsync under the
lock went from 28 to 2 ms). None of
this is needed for durability, which comes from the commit's own fsync: a failure
here only leaves the work to the commit.

These are methods of Pool (a mixin), kept apart from pool.py because they run on
another thread and reach only the lock, `_stop`, `_background_io`, `_dirty`, `_lane`,
`_sums` and `md`; close() stops them and waits (`_background_io`) before it closes
the files they use.
"""

from __future__ import annotations

import logging
import time

from .errors import ThinstoreError
from .native import K
from .spacemap import id_runs

log = logging.getLogger("thinstore")

PRESYNC_WINDOW = 1 << 20    # bytes of data writeback queued at once before a commit
_PRESYNC_STEP = 256         # runs per writeback call (close() can stop between calls)
PREHASH_PASSES = 3          # the pre-hash and its catch-up passes (Writeback._prehash)
PREHASH_AGAIN = 16          # chunks written meanwhile worth a catch-up pass
LOG_EARLY = 0.5             # commit early once the intent log's epoch is this much of its
                            # cap (SyncLog.cap: logroom.py), so that no flush finds it full
_POLL = 0.05                # seconds between the timer's looks at the log


class Writeback:
    """Pool's commit timer and pre-commit writeback (see the module docstring)."""

    def _commit_loop(self, interval: float) -> None:
        due = time.monotonic() + interval
        while not self._stop.wait(min(_POLL, interval)):
            self._garbage = None        # freed here, not under the lock (Pool.commit)
            self._log_tighten()
            if time.monotonic() < due and not self._log_filling():
                continue
            self._presync()
            self._predatasync()
            self._prehash()             # late: the fewer chunks rewritten before the lock
            self._predatasync()         # what was written while it hashed
            with self.lock:
                if self._closed:
                    return
                if self._dirty:
                    try:
                        self.commit()
                    except (OSError, ThinstoreError) as e:
                        log.error("background commit failed: %s", e)
            self._garbage = None
            due = time.monotonic() + interval

    def _commit_for_flush(self) -> None:
        """The full commit a FLUSH makes when the intent log cannot take it (more
        written since the last record than MAX_BATCH, e.g. the first FLUSH after
        seconds of writes without one; or the epoch full): the hashing and the data
        file's fdatasync first, without the lock, as the timer does, then the commit.
        The FLUSH waits for all of it either way; the other requests now wait only
        for the commit (a FLUSH after 5 s of QD16 writes held them 0.4-0.8 s)."""
        self._predatasync()
        self._prehash()
        self.commit()

    def _log_filling(self) -> bool:
        """Unlocked: has the intent log's epoch passed LOG_EARLY of its cap? Then the
        timer commits now, with its writeback and hashing done before the lock, rather
        than leave the flush that finds the log full to make a full commit itself with
        all of that under the lock (a FLUSH of 0.8 s at QD16 flush/16, docs/bench.md).
        ZFS likewise closes a transaction group early once its dirty data passes a
        limit (zfs_dirty_data_sync_percent)."""
        synclog = self._log
        # an empty epoch never: with the log off (cap 0) the timer keeps its interval
        return synclog is not None and 0 < synclog.tail >= LOG_EARLY * synclog.cap

    def _log_tighten(self) -> None:
        """Give back the intent log's file past its tail once the host file system is
        too tight for it (SyncLog.tighten), even while the pool is idle: the space may
        be taken by another writer, and the pool's next write must not fail for want
        of blocks the log holds as zeros."""
        synclog = self._log
        if synclog is None or self._closed:
            return
        try:
            synclog.tighten(self)
        except (OSError, ThinstoreError) as e:      # closed meanwhile: nothing to give
            log.debug("intent log not tightened: %s", e)

    def _written_since_commit(self) -> bool:
        """Unlocked: has anything been written since the last commit? Native lane writes
        set only the lane's flag, folded into _dirty when the lock is next taken."""
        lane = self._lane
        return self._dirty or (lane is not None and lane.c is not None and bool(lane.c.wrote))

    def _prehash(self) -> None:
        """Hash the chunks written so far before the commit takes the lock (DataSums.
        prehash): the commit then hashes only those written again meanwhile, instead of
        every chunk of the transaction with every request waiting. Then up to
        PREHASH_PASSES - 1 catch-up passes over the chunks written during the last one,
        while they are at least PREHASH_AGAIN and at most half the last pass: each pass
        is then shorter than the one before, and the commit is left the few written
        during the last, short one (QD1 4K writes with a FLUSH after each, on a 256 MiB
        clone of 64 KiB chunks: 113 chunks left to the commit's hashing, 6 with the
        passes). Where writes outrun the hashing (QD16 over the same 4096 chunks
        rewrites nearly all of them during a pass) a second pass would only burn the
        CPU the requests need, so it stops. Any failure here only leaves the hashing
        to the commit."""
        sums = self._sums
        if sums is None or self._closed or not self._written_since_commit():
            return
        try:
            last = None
            for again in (False,) + (True,) * (PREHASH_PASSES - 1):
                with self.lock.shared:
                    if self._closed:
                        return
                    plan = sums.prehash_plan(again)
                if plan is None:
                    return
                if again and not PREHASH_AGAIN <= len(plan[2]) <= last // 2:
                    return              # too few to matter, or not converging
                last = len(plan[2])
                with self._background_io:   # close() waits for it before closing the files
                    if self._stop.is_set():
                        return
                    sums.prehash(plan, self._stop)
        except Exception as e:          # noqa: BLE001 -- the commit hashes instead
            log.debug("prehash skipped: %s", e)

    def _presync(self) -> None:
        """Write the chunks written in this transaction out before the commit takes the
        lock, so that the commit's own fsync, which every request waits behind, finds
        little left (a copy on write dirties a whole chunk per small write). Paced
        (K.writeback): at most PRESYNC_WINDOW bytes of it queued at the disk at once, so
        a FLUSH meanwhile (one intent-log write, which must also wait for what the disk
        has queued) waits behind that much, not behind the whole transaction's data.
        Durability still comes from the fsync inside the commit; this only moves work
        out of the lock."""
        if self._closed or not self._written_since_commit():
            return
        try:
            with self.lock.shared:
                if self._closed:
                    return
                ids = self.md.space.written()
                shift = self.md.chunk_shift
            runs = [(start << shift, count << shift) for start, count in id_runs(ids)]
            with self._background_io:   # close() waits for it before closing the files
                for i in range(0, len(runs), _PRESYNC_STEP):
                    if self._stop.is_set():
                        return
                    K.writeback(self.md.data_fio, runs[i:i + _PRESYNC_STEP], PRESYNC_WINDOW)
        except (OSError, AttributeError, ValueError):
            pass          # closed meanwhile, or a file without datasync: the commit syncs

    def _predatasync(self) -> None:
        """fdatasync the data file before the commit takes the lock: what the
        commit's own data fsync would otherwise do with every request waiting -- the
        file system's journal commit for the blocks of the chunks allocated in this
        transaction (copies on write into a sparse file), the disk's cache flush, and
        whatever _presync's writeback left -- happens here, and the fsync under the
        lock finds only what was written in between (the pool counter
        ``commit_data_sync_us``). Durability still comes from that fsync; a failure
        here only leaves the work to it."""
        if self._closed or not self._written_since_commit():
            return
        sync = getattr(self.md.data_fio, "datasync", None)
        if sync is None:
            return            # a file without one (RADOS): the commit's fsync does it all
        try:
            with self._background_io:   # close() waits for it before closing the files
                if not self._stop.is_set():
                    sync()
        except (OSError, ValueError):
            pass
