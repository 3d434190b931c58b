"""The intent log: FLUSH and FUA durable without a full commit (DESIGN §8).

A full commit (metadata.py) writes the changed tree, fsyncs ``data`` and ``meta``
and then the superblock; its cost grows with the metadata. A FLUSH only needs
every write acknowledged so far to be found again after a crash. So, as ZFS's
intent log does for sync writes between transaction groups, a flush appends ONE
record to ``POOL/log`` holding the present bytes of every range written, zeroed or
discarded since the last record or commit, and makes that record durable: one
O_DIRECT|O_DSYNC write of it (the native log writer), or one fdatasync of the log
(nothing else is synced: the record carries the bytes, so the data file's own copy
of them may still be in the page cache). The periodic full
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
  records keep the order of their sequence numbers. Making it durable happens
  outside both: on the native log writer (intentlog.c: an O_DIRECT|O_DSYNC write,
  Linux AIO or a writer thread) where the log has a descriptor, else one fdatasync
  here; flushes that arrive meanwhile share the next one (group commit). A flush
  returns only once every record up to its own is durable. A flush that finds no
  notes takes no lock: it waits (if need be) for the records appended so far, as
  notes are dropped only after `appended` counts their record, and `synced` grows
  only past a durable write (or a commit). The full commit (exclusive lock) never
  runs beside a record being built, so it can reset the epoch without the mutex;
  it drains the records in flight first.
- Ranges are noted before a write returns (Device.pwrite after the native lane,
  DataPath under the lock), so a write acknowledged before a flush began is in that
  flush's record or an earlier one. The note list is only appended to and cut from
  its front, so a note racing a flush is kept for the next one, never lost.
- Nothing here changes when a chunk may be reused: a chunk freed in the open
  transaction stays unusable until the commit that frees it (spacemap.py), so the
  committed tree a record builds on is intact whatever the process did after it.
- The work of a flush is proportional to what was written since the last one, never
  to the pool's capacity or device count; past MAX_BATCH bytes, or when the log would
  pass its cap, the flush is a full commit instead.
- The log's file never takes the space data needs (logroom.py): it may reach a cap
  that follows the host file system's free space (at most MAX_BYTES; 0: the log is
  off, every flush commits); a growth that finds no room makes the flush a full commit;
  after a commit a file larger than the new cap is truncated to it. Its size is not
  part of the format: records past the tail are never read as the epoch's.

All log I/O goes through the pool's file factory (storage.py), like ``data``/``meta``.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading

from . import format as fmt
from . import logroom, native
from .native import K

log = logging.getLogger("thinstore")

LOG_NAME = "log"
MAX_BATCH = 32 << 20        # bytes one record may carry; a larger flush commits instead
MAX_BYTES = 512 << 20       # an epoch longer than this commits (which starts a new one)
GROW_STEP = 1 << 20         # the log is written with zeros ahead of its tail in steps,
                            # at least two steps ahead (see SyncLog._grow)
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


class SyncLog(logroom.LogRoom):
    """The log of one open pool: noted ranges, the epoch's tail, and group fdatasync;
    its room on the host file system is logroom.LogRoom's."""

    _AHEAD = 2 * GROW_STEP      # the file is grown this far past a record's end

    def __init__(self, fio, base: fmt.LogBase):
        self.fio = fio
        self.notes: list = []           # (dev_id, offset, length) written since the last record
        self.base = base
        self.extent = fio.size()        # bytes of the file already written (zeros or records)
        self.cap = None                 # the size the file may reach this epoch (logroom.py)
        self.live = False               # opened, replayed and folded: tighten() may cut
        self.synced = 0                 # every byte appended before this is durable
        self._sync = threading.Lock()
        # fdatasync where the storage backend has it, else its fsync
        self._datasync = getattr(fio, "datasync", None) or fio.fsync
        # the native log writer (started at the first append) where the log has a file
        # descriptor and the native backend runs; else the waiter syncs itself
        self._async = native.BACKEND == "native" and native._fd(fio) is not None
        self._syncer = None
        self._dio_fd = -1
        # the append cursor (tail, sequence, appended, ...): with the log writer, the
        # native ts_log the NBD loop appends through too, and its mutex; else Python's
        if self._async:
            self._c = native.LogCursor()
            self._cur, self._append = self._c.c, self._c
        else:
            self._c, self._cur, self._append = None, _Cursor(), threading.Lock()
        self._counts = {"records": 0, "record_bytes": 0, "syncs": 0, "replayed": 0,
                        "commits_instead": 0, "grow_failures": 0, "trims": 0}
        self._pack_head()
        self._measure()
        self._limits()

    @property
    def counters(self) -> dict:
        """records, record_bytes, syncs (fdatasyncs of the log), replayed,
        commits_instead, grow_failures (growths of the file refused for want of room),
        trims (truncations after a commit): totals since open; records and
        record_bytes count the native NBD loop's own records too (ts_log_own),
        loop_records those alone; direct: the log writer's syncs done by
        O_DIRECT|O_DSYNC writes alone. Gauges, not totals: size_now (bytes of the
        file) and cap_now (the size it may reach this epoch, 0: the log is off)."""
        out = dict(self._counts)
        out["size_now"], out["cap_now"] = self.extent, self.cap
        out["direct"] = 0
        if self._syncer is not None:
            stats = self._syncer.stats()
            out["syncs"] += stats[1]
            out["direct"] = stats[3]
        out["records"] += self._cur.records
        out["record_bytes"] += self._cur.record_bytes
        out["loop_records"] = self._cur.records
        return out

    # the append cursor (module docstring; under the append mutex)
    tail = property(lambda self: self._cur.tail, doc="where the next record goes")
    sequence = property(lambda self: self._cur.sequence, doc="the next record's number")
    appended = property(lambda self: self._cur.appended,
                        doc="bytes appended ever: a flush's ticket")

    def cursor(self):
        """The native ts_log (``ts_log *``) the NBD loop appends its own records through
        (nbd/burst.py), or None where the log has no native writer."""
        return None if self._c is None else self._c.c

    def _pack_head(self) -> None:
        """The epoch's record header (sequence 0) for the native cursor."""
        if self._c is not None:
            head = bytearray(fmt.LOG_HEADER.size)
            fmt.LOG_HEADER.pack_into(head, 0, fmt.LOG_MAGIC, 0, fmt.LOG_VERSION, 0, 0, 0, 0,
                                     *self.base)
            self._c.set_head(head)

    def _limits(self, closed: bool = False) -> None:
        """Where a record appended by the native loop may end (and its batch limit):
        before the grown extent's last two steps and the cap; nowhere once closed."""
        cur = self._cur
        cur.room = 0 if closed else max(0, min(self.extent - 2 * GROW_STEP, self.cap))
        cur.max_batch = MAX_BATCH

    def _cap_for(self, free: int | None) -> int:
        """logroom.cap for this log: `free` bytes free on the host, its file's extent,
        MAX_BYTES (read here, at each call) and GROW_STEP."""
        return logroom.cap(free, self.extent, MAX_BYTES, GROW_STEP)

    # ------------------------------------------------------------ noting
    def note(self, dev_id: int, offset: int, length: int) -> None:
        """Add a write's range to the notes (before the write returns)."""
        if length > 0:
            self.notes.append((dev_id, offset, length))
            if self._c is not None:
                self._c.pending(1)

    def note_many(self, notes: list, counted: bool = False) -> None:
        """Add (dev_id, offset, length) notes at once; `counted`: the native loop has
        counted them in the cursor's pending writes already (ts_log_pending)."""
        self.notes.extend(notes)
        if self._c is not None and not counted:
            self._c.pending(len(notes))

    @property
    def pending(self) -> bool:
        return bool(self.notes)

    # ------------------------------------------------------------ flushing
    def flush(self, pool, wait: bool = True) -> bool:
        """Pool.flush: every write that returned before this call is durable when it
        returns. One record of the ranges noted since the last one (built from the
        present bytes, under the pool's shared lock) and one fdatasync of the log,
        shared with concurrent flushes; a full commit when the log cannot take the
        batch. Nothing noted: only waits for a sync already under way. Raises
        PoolClosed after close(), OSError when the log cannot be written or synced.

        With `wait` False the record is appended and its fdatasync started on the
        log writer, and flush returns at once (True); a later flush waits for it.
        Without a log writer (no native backend, or a log without a descriptor)
        nothing is done and it returns False: the caller flushes later instead.
        Returns True."""
        if not wait and not self._async:
            return False
        if not self.notes and not pool._closed:
            # Nothing noted: no lock is needed. Notes are dropped only after `appended`
            # counts their record, so every write that returned before this call is
            # in a record up to `appended` (read after the notes).
            ticket = self.appended
            if self.synced >= ticket:
                return True
        else:
            with pool.lock.shared:
                pool._check_open()
                with self._append:
                    if not self.notes:
                        ticket = self.appended
                    else:
                        record, noted = self.capture(pool)
                        ticket = None if record is None else self.append(record, noted)
        if ticket is None:
            self._counts["commits_instead"] += 1
            getattr(pool, "_commit_for_flush", pool.commit)()
            return True
        if not wait:
            self.kick(ticket)
            return True
        try:
            self.sync(ticket)
        except OSError as e:
            if pool._closed:          # close() committed: everything is durable
                return True
            if e.errno not in logroom.FULL:
                raise
            # the record could not be written for want of room: a full commit makes
            # the same writes durable (and its discard drops the record)
            self._counts["commits_instead"] += 1
            getattr(pool, "_commit_for_flush", pool.commit)()
        return True

    def capture(self, pool) -> tuple[memoryview | None, int]:
        """Under the shared lock and the append mutex: (the next record, how many notes
        it covers); the record is None when the flush must be a full commit instead
        (too much to log, or a noted device gone or resized). Notes appended meanwhile (a native lane
        write finishing its return) stay for the next record. The record is built
        by one native call (ts_log_record) where it can be, else here."""
        n = len(self.notes)
        ranges = _merge(self.notes[:n])
        head = fmt.log_record_head(len(ranges))
        size = fmt.log_record_size(head + sum(r[2] for r in ranges))
        if size - head > MAX_BATCH or self.tail + size > self.cap:
            return None, n
        dms: dict = {}
        for dev_id, off, ln in ranges:
            dm = dms.get(dev_id) or pool.md.devices.get(dev_id)
            if dm is None or off + ln > dm.size:
                return None, n
            dms[dev_id] = dm
        out = bytearray(size)
        fmt.LOG_HEADER.pack_into(out, 0, fmt.LOG_MAGIC, 0, fmt.LOG_VERSION, 0, 0, 0,
                                 self.sequence, *self.base)
        total = _build(pool, dms, ranges, out)
        if total is not None:
            return memoryview(out)[:total], n
        entries, pos = [], head
        for dev_id, off, ln in ranges:
            zero = _gather(pool, dms[dev_id], off, ln, memoryview(out)[pos:pos + ln])
            entries.append((dev_id, off, ln, fmt.LOG_ZERO if zero else fmt.LOG_DATA))
            pos += 0 if zero else ln
        return fmt.finish_log_record(out, pos, self.base, self.sequence, entries), n

    def append(self, record: bytes, noted: int) -> int | None:
        """Under the shared lock and the append mutex: write `record` at the tail (not yet
        durable) and drop the first `noted` notes it covers. Returns the ticket to pass
        to sync(), or None (nothing written, the notes kept) when the file cannot grow
        to hold it: the flush must be a full commit instead."""
        cur = self._cur
        end = cur.tail + len(record)
        if end + 2 * GROW_STEP > self.extent and not self._make_room(end):
            self._limits()
            return None
        if self._async:     # the writer thread writes it (and makes it durable)
            self._thread().append(record, cur.tail, cur.appended + len(record))
        else:
            self.fio.pwrite(record, cur.tail)
        cur.tail = end
        cur.sequence += 1
        cur.appended += len(record)
        del self.notes[:noted]      # after `appended` grew: flush() reads both unlocked
        if self._c is not None:
            self._c.pending(-noted)
        self._limits()
        self._counts["records"] += 1
        self._counts["record_bytes"] += len(record)
        return self.appended

    def _grow(self, want: int) -> None:
        """Write zeros from the log's extent up to `want` (rounded up to GROW_STEP), and
        start their writeback at once (posix_fadvise DONTNEED starts it without
        waiting), so the file system has allocated and written those blocks before a
        record reaches them: a record written into blocks still waiting for
        allocation (ext4's delayed allocation) first writes them back and then needs
        a journal commit for them, one per record, which made the first epoch of a
        new pool's log ~10% slower (p99.9 1.4 ms against 0.3 ms). append() keeps the
        extent two steps ahead of the tail, so no record but the log's first lands in a
        step grown by the same call. Steps of 1 MiB: a 4 MiB writeback queued at once delayed the
        log writes behind it (worst FLUSH 8-16 ms against 4-8)."""
        step = -(-want // GROW_STEP) * GROW_STEP
        start = self.extent
        self.fio.write_zeros(start, step - start)
        self.extent = step
        fd = native._fd(self.fio)
        if fd is not None and hasattr(os, "posix_fadvise"):
            try:
                os.posix_fadvise(fd, start, step - start, os.POSIX_FADV_DONTNEED)
            except OSError:         # advice only: the records are written either way
                pass

    def kick(self, ticket: int) -> None:
        """Start making every byte appended up to `ticket` durable (log writer only)."""
        if self.synced < ticket:
            self._thread().kick(ticket)

    def sync(self, ticket: int) -> None:
        """Return once every byte appended up to `ticket` is durable (group fdatasync:
        on the log writer, or here under a mutex)."""
        if self.synced >= ticket:
            return
        if self._async:
            done = self._thread().wait(ticket)
            with self._sync:
                self.synced = max(self.synced, done)
            return
        with self._sync:
            if self.synced >= ticket:
                return              # a fdatasync that began after our append covered it
            target = self.appended
            self._datasync()
            self._counts["syncs"] += 1
            self.synced = max(self.synced, target)

    def _thread(self):
        syncer = self._syncer
        if syncer is None:
            with self._sync:
                if self._syncer is None:
                    self._dio_fd = _open_direct(self.fio)
                    self._syncer = native.LogSyncer(native._fd(self.fio), self._dio_fd)
                    self._c.attach(self._syncer)
                syncer = self._syncer
        return syncer

    def close(self) -> None:
        """Stop the writer thread (a wait still in progress raises EBADF), then close
        the files: the thread must never write to a descriptor number reused meanwhile."""
        with self._append:          # the native loop appends nothing more
            self._limits(closed=True)
        if self._syncer is not None:
            self._syncer.stop()
        if self._dio_fd >= 0:
            os.close(self._dio_fd)
            self._dio_fd = -1
        self.fio.close()

    def committed(self, base: fmt.LogBase) -> list:
        """After a full commit (superblock durable): everything is durable, and the next
        record starts a new epoch at the start of the log. Returns the notes dropped,
        for the caller to let go of once it has released the pool lock: freeing them
        here, hundreds of thousands of tuples after a few seconds of small writes
        without a FLUSH, held every request back 10-25 ms (docs/integrity.md)."""
        self.base = base
        cur = self._cur
        cur.tail = 0
        cur.sequence = 0
        self._pack_head()
        self.synced = max(self.synced, cur.appended)
        if self._syncer is not None:      # records still queued are not needed now
            self._syncer.discard(cur.appended)      # and none is in flight after it
        n = len(self.notes)
        dropped = self.notes[:n]        # so that the del below frees nothing
        del self.notes[:n]
        if self._c is not None:
            self._c.pending(-n)
        self._measure()                 # the new epoch's cap, and the file cut to it
        self._trim()
        self._limits()
        return dropped

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
        self._counts["replayed"] += seq

    def _read(self, pos: int, total: int) -> bytes:
        return b"".join(self.fio.pread(min(_READ_STEP, total - i), pos + i)
                        for i in range(0, total, _READ_STEP))


class _Cursor:
    """The append cursor where the log has no native writer: ts_log's fields
    (thinstore_native.h) in Python, under SyncLog's threading.Lock."""

    __slots__ = ("pending", "appended", "tail", "sequence", "room", "max_batch", "records",
                 "record_bytes")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)


def _open_direct(fio) -> int:
    """The log opened a second time for the log writer, O_DIRECT|O_DSYNC (a write
    returns once its bytes are durable, without the page cache), or -1 where the file,
    its file system or its disk refuses 512-byte aligned direct I/O (then the writer
    thread writes through `fio`'s descriptor and calls fdatasync)."""
    path = getattr(fio, "path", None)
    flags = getattr(os, "O_DIRECT", 0)
    if not path or not flags:
        return -1
    try:
        fd = os.open(path, os.O_RDWR | flags | os.O_DSYNC | os.O_CLOEXEC)
    except OSError:
        return -1
    # Records are 512-byte aligned. A disk with 4 KiB logical sectors opens O_DIRECT
    # but refuses such writes (and through AIO says so only in the completion): a
    # 512-byte direct read, which changes nothing, shows it at once.
    probe = mmap.mmap(-1, 4096)             # page-aligned, as direct I/O needs
    try:
        os.preadv(fd, [memoryview(probe)[:512]], 512)
    except OSError:
        os.close(fd)
        return -1
    finally:
        probe.close()
    return fd


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


def _build(pool, dms: dict, ranges: list, out: bytearray) -> int | None:
    """The record for `ranges` built whole by ts_log_record into `out` (header packed):
    its length, or None where Python must build it (no native struct for the pool's
    current arrays, a file without a descriptor, a map page not in memory)."""
    ps, k = pool._kernel_state(repoint=False)
    if k is not native.NATIVE or ps.c is None or native._fd(ps.fio) is None:
        return None
    ids = list(dms)
    index = {dev_id: i for i, dev_id in enumerate(ids)}
    return native.log_record(ps, [pool._kernel_dev(dms[d], True) for d in ids], ids,
                             [(index[d], off, ln) for d, off, ln in ranges], out)


def _gather(pool, dm, offset: int, length: int, piece: memoryview) -> bool:
    """The present bytes of a device range into `piece` (a side of the pool lock is
    held); True when they are all zeros."""
    md = pool.md
    d = pool._load_pages(dm, offset, length)
    K.read_range(d, md.maps.pages, md.chunk_shift, md.data_fio, piece, offset, length)
    return K.is_zero(piece)

