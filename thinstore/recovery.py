"""What opening a pool does before anything reads: recovery after an unclean shutdown.

A mixin of Pool (like datapath.py and hidden.py). In this order, because a commit
before the replay would end the intent log's epoch (synclog.py):

1. data checksums: re-checksum the write-intent regions written in place since the
   last commit (datasums.py, docs/integrity.md);
2. the intent log: replay the records of flushes since the last commit;
3. one commit (the fold) when either found anything.
"""

from __future__ import annotations

import logging

from .datasums import DataSums, open_intent
from .format import log_base
from . import format as fmt
from .native import K
from .synclog import SyncLog, open_log

log = logging.getLogger("thinstore")


class Recovery:
    """Pool's open-time recovery (see the module docstring)."""

    def _attach(self) -> None:
        """After an unclean shutdown, before anything reads: re-checksum what was written
        in place (docs/integrity.md), replay the intent log (synclog.py), then commit
        once -- in that order, as a commit before the replay would end the log's epoch."""
        try:
            recovered = self._attach_sums()
            self._log = SyncLog(open_log(self.store), log_base(self.md.sb))
            replayed = replay(self)
            if replayed:
                log.warning("pool %s was not shut down cleanly: replayed %d intent log "
                            "record(s)", self.path, replayed)
            if recovered or replayed:
                self.commit()
            self._log.live = True       # nothing past the tail is needed any more
        except BaseException:
            self._closed = True
            self._stop.set()
            for f in (self.md.data_fio, self.md.meta_fio, self._log,
                      self._sums and self._sums.intent.fio):
                if f is not None:
                    f.close()
            self._owner.release()
            self.store.close()
            raise

    def _attach_sums(self) -> bool:
        """Data checksums: hook them into commit, read and write; True when the intent
        bitmap says regions were re-checksummed (the caller commits)."""
        if not self.data_checksums:
            return False
        self._sums = DataSums(self.md, open_intent(self.store),
                              track_fresh=self._lane is None)
        self._checksum_hook = self._sums.on_commit
        changed = self._sums.recover()
        if self._sums.intent.any:
            log.warning("pool %s was not shut down cleanly: re-checksummed the regions "
                        "written in place since the last commit (%d chunk(s) changed)",
                        self.path, changed)
        return self._sums.intent.any


def replay(pool) -> int:
    """Apply the log's records to the freshly opened pool (before anything else runs);
    returns how many were applied. The caller commits (the fold)."""
    slog = pool._log
    n = 0
    with pool.lock:
        for entries in slog.records():
            for e in entries:
                dm = pool.md.devices.get(e.dev_id)
                if dm is None or e.offset + e.length > dm.size:
                    log.warning("intent log: record %d names %s, which the committed tree "
                                "lacks; the replay stops there", n, e)
                    return n
                if e.kind == fmt.LOG_ZERO or K.is_zero(e.data):
                    pool._zero_range(dm, e.offset, e.length, no_hole=False)
                else:
                    pool._write_data(dm, e.data, e.offset, e.length)
            n += 1
    return n
