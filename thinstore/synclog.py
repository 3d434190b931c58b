"""The intent log: FLUSH and FUA durable without a full commit (DESIGN §8).

A full commit (metadata.py) writes the changed tree, fsyncs ``data`` and ``meta``
and then the superblock; its cost grows with the metadata. A FLUSH only needs
every write acknowledged so far to be found again after a crash. So, as ZFS's
intent log does for sync writes between transaction groups, a flush appends ONE
record to ``POOL/log`` holding the present bytes of every range written, zeroed or
discarded since the last record or commit, and makes that record durable with one
fdatasync of the log (nothing else is synced: the record carries the bytes, so the
data file's own copy of them may still be in the page cache). The periodic full
commit stays the way metadata reaches a consistent tree; it makes everything
durable and starts a new *epoch*: the next record goes to the start of the log.

Invariants:

- A record names the committed tree it applies on top of (generation, commit time,
  pool uuid: its *base*) and its sequence number in the epoch. Opening a pool replays,
  from byte 0, records that are whole (checksum), on the committed base and next in
  sequence, and stops at the first that is not; then it commits (the fold). Records of
  an older epoch, a torn record and stale bytes past the tail are never applied. A
  crash in the fold leaves the old superblock and so the old epoch valid: it is
  replayed again, to the same content, since replay is logical (device, offset,
  bytes), never a reuse of the chunks the crashed process chose.
- A record is built under the pool's shared lock (reads may run, no write does: the
  lane's gate keeps native writes out too) and appended under the log's own mutex, so
  it holds the content after every write that returned before the flush began, and
  records keep the order of their sequence numbers. Its fdatasync runs outside both;
  flushes that arrive while one syncs wait and share the next fdatasync (group
  commit). A flush returns only once a fdatasync that began after its record was
  written has completed. A flush that finds no notes and nothing appended unsynced
  returns without the lock: notes are dropped only after `appended` counts their
  record, and `synced` grows only past a completed fdatasync (or a commit). The full commit (exclusive lock) never runs beside a record
  being built, so it can reset the epoch without the mutex.
- Ranges are noted before a write returns (Device.pwrite after the native lane,
  DataPath under the lock), so a write acknowledged before a flush began is in that
  flush's record or an earlier one. The note list is only appended to and cut from
  its front, so a note racing a flush is kept for the next one, never lost.
- Nothing here changes when a chunk may be reused: a chunk freed in the open
  transaction stays unusable until the commit that frees it (spacemap.py), so the
  committed tree a record builds on is intact whatever the process did after it.
- The work of a flush is proportional to what was written since the last one, never
  to the pool's capacity or device count; past MAX_BATCH bytes, or when the log would
  pass MAX_BYTES, the flush is a full commit instead.

All log I/O goes through the pool's file factory (storage.py), like ``data``/``meta``.
"""

from __future__ import annotations

import logging
import threading

from . import format as fmt
from .native import K

log = logging.getLogger("thinstore")

LOG_NAME = "log"
MAX_BATCH = 32 << 20        # bytes one record may carry; a larger flush commits instead
MAX_BYTES = 512 << 20       # an epoch longer than this commits (which starts a new one)
GROW_STEP = 4 << 20         # the log is written with zeros ahead of its tail in steps
_READ_STEP = 1 << 20


def open_log(store):
    """The pool's log file in `store` (storage.py), created empty when missing (pools made
    before it existed)."""
    if store.has(LOG_NAME):
        return store.open(LOG_NAME)
    fio = store.open(LOG_NAME, create=True)
    fio.fsync()
    return fio


def log_records(store, sb) -> int:
    """How many records the next open of the pool in `store` (committed superblock `sb`)
    will replay: flushed writes the tree does not have yet (not damage)."""
    if not store.has(LOG_NAME):
        return 0
    fio = store.open(LOG_NAME, readonly=True)
    try:
        return sum(1 for _ in SyncLog(fio, fmt.log_base(sb)).records())
    finally:
        fio.close()


class SyncLog:
    """The log of one open pool: noted ranges, the epoch's tail, and group fdatasync."""

    def __init__(self, fio, base: fmt.LogBase):
        self.fio = fio
        self.notes: list = []           # (dev_id, offset, length) written since the last record
        self.base = base
        self.tail = 0                   # where the next record goes
        self.sequence = 0
        self.extent = fio.size()        # bytes of the file already written (zeros or records)
        self.appended = 0               # bytes appended ever: a flush's ticket
        self.synced = 0                 # every byte appended before this is durable
        self._sync = threading.Lock()
        self._append = threading.Lock()  # one record built and appended at a time
        # fdatasync where the storage backend has it, else its fsync
        self._datasync = getattr(fio, "datasync", None) or fio.fsync
        self.counters = {"records": 0, "record_bytes": 0, "syncs": 0, "replayed": 0,
                         "commits_instead": 0}

    # ------------------------------------------------------------ noting
    def note(self, dev_id: int, offset: int, length: int) -> None:
        if length > 0:
            self.notes.append((dev_id, offset, length))

    @property
    def pending(self) -> bool:
        return bool(self.notes)

    # ------------------------------------------------------------ flushing
    def flush(self, pool) -> None:
        """Pool.flush: every write that returned before this call is durable when it
        returns. One record of the ranges noted since the last one (built from the
        present bytes, under the pool's shared lock) and one fdatasync of the log,
        shared with concurrent flushes; a full commit when the log cannot take the
        batch. Nothing noted: only waits for a sync already under way. Raises
        PoolClosed after close(), OSError when the log cannot be written or synced."""
        if not self.notes and self.synced >= self.appended and not pool._closed:
            return          # nothing noted, everything appended durable: no lock needed
        with pool.lock.shared:
            pool._check_open()
            with self._append:
                if not self.notes:
                    ticket = self.appended
                else:
                    record, noted = self.capture(pool)
                    ticket = None if record is None else self.append(record, noted)
        if ticket is None:
            self.counters["commits_instead"] += 1
            pool.commit()
            return
        try:
            self.sync(ticket)
        except OSError:
            if not pool._closed:      # close() committed: everything is durable
                raise

    def capture(self, pool) -> tuple[bytes | None, int]:
        """Under the shared lock and the append mutex: (the next record, how many notes
        it covers); the record is None when the flush must be a full commit instead
        (too much to log, or a noted device gone or resized). Notes appended meanwhile (a native lane
        write finishing its return) stay for the next record."""
        n = len(self.notes)
        ranges = _merge(self.notes[:n])
        if sum(r[2] for r in ranges) > MAX_BATCH:
            return None, n
        entries = []
        for dev_id, off, ln in ranges:
            dm = pool.md.devices.get(dev_id)
            if dm is None or off + ln > dm.size:
                return None, n
            entries.append(_entry(pool, dm, off, ln))
        record = fmt.pack_log_record(self.base, self.sequence, entries)
        if self.tail + len(record) > MAX_BYTES:
            return None, n
        return record, n

    def append(self, record: bytes, noted: int) -> int:
        """Under the shared lock and the append mutex: write `record` at the tail (not yet
        durable) and drop
        the first `noted` notes it covers. Returns the ticket to pass to sync()."""
        end = self.tail + len(record)
        if end > self.extent:
            step = -(-end // GROW_STEP) * GROW_STEP
            self.fio.write_zeros(self.extent, step - self.extent)
            self.extent = step
        self.fio.pwrite(record, self.tail)
        self.tail = end
        self.sequence += 1
        self.appended += len(record)
        del self.notes[:noted]      # after `appended` grew: flush() reads both unlocked
        self.counters["records"] += 1
        self.counters["record_bytes"] += len(record)
        return self.appended

    def sync(self, ticket: int) -> None:
        """Return once every byte appended up to `ticket` is durable (group fdatasync)."""
        if self.synced >= ticket:
            return
        with self._sync:
            if self.synced >= ticket:
                return              # a fdatasync that began after our append covered it
            target = self.appended
            self._datasync()
            self.counters["syncs"] += 1
            self.synced = max(self.synced, target)

    def committed(self, base: fmt.LogBase) -> None:
        """After a full commit (superblock durable): everything is durable, and the next
        record starts a new epoch at the start of the log."""
        self.base = base
        self.tail = 0
        self.sequence = 0
        self.synced = max(self.synced, self.appended)
        del self.notes[:len(self.notes)]

    # ------------------------------------------------------------ replay
    def records(self):
        """Yield the entries of each record the committed base has, in order (at open)."""
        pos, seq, base = 0, 0, self.base    # the base at open, even if replay commits
        size = self.fio.size()
        while pos + fmt.LOG_HEADER.size <= size:
            total = fmt.log_record_length(self.fio.pread(fmt.LOG_HEADER.size, pos), base, seq)
            if not total or pos + total > size:
                break
            entries = fmt.unpack_log_record(self._read(pos, total))
            if entries is None:
                break
            yield entries
            pos += total
            seq += 1
        self.counters["replayed"] += seq

    def _read(self, pos: int, total: int) -> bytes:
        return b"".join(self.fio.pread(min(_READ_STEP, total - i), pos + i)
                        for i in range(0, total, _READ_STEP))


def _merge(notes: list) -> list:
    """Overlapping or touching ranges of one device joined; sorted by device, offset."""
    out: list = []
    for dev_id, off, ln in sorted(notes):
        if out and out[-1][0] == dev_id and off <= out[-1][1] + out[-1][2]:
            last = out[-1]
            out[-1] = (dev_id, last[1], max(last[2], off + ln - last[1]))
        else:
            out.append((dev_id, off, ln))
    return out


def _entry(pool, dm, offset: int, length: int) -> fmt.LogEntry:
    """The present content of a device range as a log entry (a side of the lock is held)."""
    md = pool.md
    buf = bytearray(length)
    d = pool._load_pages(dm, offset, length)
    K.read_range(d, md.maps.pages, md.chunk_shift, md.data_fio, buf, offset, length)
    if K.is_zero(buf):
        return fmt.LogEntry(dm.dev_id, offset, length, fmt.LOG_ZERO, None)
    return fmt.LogEntry(dm.dev_id, offset, length, fmt.LOG_DATA, bytes(buf))


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
