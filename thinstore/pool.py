"""The thin pool: the public storage API.

A pool is a directory::

    POOL/data   sparse file cut into chunks; chunk n at n * chunk_size (chunk 0 unused)
    POOL/meta   two superblock slots, then 4096-byte metadata blocks (docs/format.md)
    POOL/lock   fcntl lock: one process at a time; it holds the holder's pid

or the same files as RADOS objects, ``rados://CEPHPOOL/NAME`` (docs/rados.md); only
thinstore/storage.py knows which (`Pool.store`).

`self.lock` (thinstore/rwlock.py) is shared for reads and exclusive for everything
else: reads and extents queries of any devices run at once (the C kernels release
the GIL for their I/O), while writes, management operations and commits run alone.
`with pool.lock:` is the exclusive side, re-entrant like the RLock it replaced, so
one Pool may serve many threads. Management operations (create, snapshot, clone, destroy, rename, rollback,
resize) commit before they return. Data writes become durable on flush() and on
FUA through the intent log (thinstore/synclog.py: one record, one fdatasync), and
reach the tree by the full commit: the background timer while writes are pending,
close, or a flush the log cannot take. After a crash the pool opens at its last
commit and replays the log: every write acknowledged before the last completed
flush reads back exactly.

Pool's methods live in eight modules: this one (lifecycle, commit, lookup, capacity,
handles), thinstore/management.py (create, snapshot, clone, destroy, rename,
rollback, resize), thinstore/writeback.py (the commit timer and the writeback and
hashing it does before a commit), thinstore/datapath.py (the request handlers Device
calls, flush), thinstore/recovery.py (what an open does after an unclean shutdown),
thinstore/queries.py (list, info, status), thinstore/hidden.py (the receive
workspace) and thinstore/readers.py (a pinned generation and map views for online
readers), joined as mixins so callers keep
calling `pool._read`, `pool.create_hidden` and the rest on the Pool.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

import numpy as np

from .datapath import DataPath
from .device import Device
from .hidden import HiddenDevices
from .management import Management
from .recovery import Recovery
from .queries import Queries
from .readers import MapView, Readers  # noqa: F401  (MapView: the type map_view returns)
from .errors import (CorruptMetadata, NoSuchDevice, OldFormat, PoolNotFound, ThinstoreError,
                     UsageError, WrongDataDevice)
from .format import VERSION as FORMAT_VERSION, log_base, valid_chunk_size
from .metadata import FLAG_HIDDEN, DeviceMeta, Metadata
from .native import NATIVE, K
from .fastlane import Lane
from .storage import (FileIO, check_data_label, device_capacity, is_rados, open_store,
                      write_data_label)
from .synclog import SyncLog
from .reclaim import Reclaimer
from .rwlock import RWLock
from .units import format_size
from .writeback import PRESYNC_WINDOW, Writeback  # noqa: F401  (PRESYNC_WINDOW: pool's before)

log = logging.getLogger("thinstore")

POOL_FLAG_DATA_CHECKSUMS = 1
DEFAULT_CHUNK_SIZE = 64 << 10
COMMIT_INTERVAL = 5.0


#: The commit's counters (docs/integrity.md "Commit lock hold time"), beside `commits`:
#: the time the commits held the pool lock exclusively, in us (total, and the longest
#: one), that time's parts (Metadata.commit: building and writing the tree, the fsync of
#: data, the fsync of meta, the superblock and its fsync, freeing what the old tree
#: used and starting the intent log's next epoch), and the requests waiting for the lock as each commit let go (total, largest).
#: `flush_commits` (pools with an intent log) counts the flushes that were full commits
#: because the log could not take them (synclog.py: MAX_BATCH, MAX_BYTES).
COMMIT_COUNTERS = ("commit_hold_us", "commit_hold_us_max", "commit_tree_us",
                   "commit_data_sync_us", "commit_meta_sync_us", "commit_superblock_us",
                   "commit_release_us", "commit_waiters", "commit_waiters_max")

#: A pool holds at most 2**34 chunks: its refcount and checksum tables are held as
#: arrays of a u32 per chunk (64 GiB of address space each at the cap, resident only
#: where chunks are used): 1 PiB with 64 KiB chunks, 16 PiB with 1 MiB chunks.
MAX_POOL_CHUNKS = 1 << 34


def _check_capacity(nchunks: int, chunk_size: int) -> None:
    if nchunks > MAX_POOL_CHUNKS:
        most = format_size(MAX_POOL_CHUNKS * chunk_size)
        raise UsageError(f"a capacity of {format_size(nchunks * chunk_size)} is more than a "
                         f"pool of {format_size(chunk_size)} chunks holds (at most {most}); "
                         "use larger chunks (init --chunk-size, up to 1M) or several pools")


class Pool(Management, Writeback, DataPath, HiddenDevices, Readers, Recovery, Queries):
    """An open thin pool. Use `Pool.create` or `Pool.open`; close() commits."""

    def __init__(self, path: str, md: Metadata, owner, *, commit_interval: float, store,
                 scan_free: bool = False):
        self.path = path
        self.md = md
        self.store = store
        self.lock = RWLock()
        self._owner = owner
        self._dirty = False
        self._batch_depth = 0          # > 0 inside batch(): management ops defer their commit
        self._closed = False
        self._low_water_crossed = False
        self._since_low_water_check = 0
        self._counters = {"chunks_allocated": 0, "chunks_copied": 0, "bytes_copied": 0,
                          "bytes_written": 0, "commits": 0, **dict.fromkeys(COMMIT_COUNTERS, 0)}
        self._kc = np.zeros(4, dtype=np.int64)
        self._sums = None                      # DataSums when data checksums are on
        self._log: SyncLog | None = None       # the intent log (synclog.py)
        self._garbage = None     # what a commit dropped, freed by the timer without the lock
        self._stop = threading.Event()
        self._background_io = threading.Lock()  # held while _presync/_prehash use the data file
        self._timer = None
        # freed chunks are punched in the background, throttled (reclaim.py)
        self._reclaim = Reclaimer(self, scan=scan_free)
        md.reclaim = self._reclaim.add
        # native backend: a device's common read and write run whole in C (fastlane.py)
        self._lane = Lane(self) if NATIVE is not None and K is NATIVE else None
        self.lock.hooks = self._lane
        if commit_interval and commit_interval > 0:
            self._timer = threading.Thread(target=self._commit_loop, args=(commit_interval,),
                                           name="thinstore-commit", daemon=True)
            self._timer.start()

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: str, capacity: int, chunk_size: int = DEFAULT_CHUNK_SIZE, *,
               low_water: float = 0.9, data_checksums: bool = True,
               commit_interval: float = COMMIT_INTERVAL, fileio=FileIO,
               data_device: str | None = None) -> "Pool":
        """A new pool at `path`: a directory, or ``rados://CEPHPOOL/NAME`` (docs/rados.md);
        capacity in bytes. With `data_device` (a raw block device, DESIGN §1; directory
        pools only) the data lives there, named by the symlink POOL/data, instead of in a
        sparse file; the device must hold the capacity plus one chunk (capacity None: as
        much as the device holds). A capacity that is not a whole number of chunks is
        rounded up to one (`capacity` then says what it became)."""
        if data_device is not None:
            if is_rados(path):
                raise UsageError("--data-device is for a directory pool; a rados:// pool "
                                 "keeps its data in RADOS objects")
            capacity = device_capacity(data_device, capacity, chunk_size)
        if not valid_chunk_size(chunk_size):
            raise UsageError(f"chunk size {chunk_size} is invalid: use a power of two "
                             "from 4K to 1M")
        nchunks = -(-capacity // chunk_size)    # up to whole chunks, as LVM rounds to extents
        if nchunks < 1:
            raise UsageError(f"a capacity of {format_size(capacity)} holds no chunk: give "
                             f"at least one ({format_size(chunk_size)})")
        _check_capacity(nchunks, chunk_size)
        store = open_store(path, fileio)
        try:
            store.make()
            owner = store.lock()
        except BaseException:
            store.close()
            raise
        try:
            if data_device is not None:
                os.symlink(os.path.abspath(data_device), os.path.join(path, "data"))
            data = store.open("data", create=data_device is None)
            data.truncate((nchunks + 1) * chunk_size)
            meta = store.open("meta", create=True)
            flags = POOL_FLAG_DATA_CHECKSUMS if data_checksums else 0
            md = Metadata.format_new(meta, data, chunk_size, nchunks + 1, flags,
                                     int(round(low_water * 100)))
            if data_device is not None:
                write_data_label(data_device, md.sb.pool_uuid)
        except BaseException:
            owner.release()
            store.close()
            raise
        pool = cls(path, md, owner, commit_interval=commit_interval, store=store)
        pool._attach()
        return pool

    @classmethod
    def open(cls, path: str, *, commit_interval: float = COMMIT_INTERVAL, fileio=FileIO,
             takeover: bool = False, upgrade: bool = False) -> "Pool":
        """Open the pool at `path` (a directory or a rados:// URI) and hold it.

        PoolLocked while another process holds it; with `takeover` (rados:// only) a
        holder that is alive but hung is fenced and the pool taken from it. A pool of an
        older on-disk format raises OldFormat, unless `upgrade`: then it is opened (its
        intent log replayed) and committed in this format before it is returned
        (docs/format.md, *Upgrading*)."""
        store = open_store(path, fileio)
        opened = []
        owner = None
        try:
            if not store.exists():
                raise PoolNotFound(f"no thinstore pool at {path} (run 'thinstore init' first)")
            owner = store.lock(takeover=takeover)
            opened.append(store.open("data"))
            opened.append(store.open("meta"))
            md = Metadata(opened[1], opened[0])
            md.load(upgrade=upgrade)
            labelled = check_data_label(store, md.sb.pool_uuid, adopt=upgrade)
            if labelled:
                log.warning("%s", labelled)
        except BaseException as e:
            for f in opened:          # a pool that fails to open keeps no descriptor
                f.close()
            if owner is not None:
                owner.release()
            store.close()
            if isinstance(e, WrongDataDevice):
                raise                 # names the device and the fix; 'check' would not help
            if isinstance(e, CorruptMetadata):
                raise CorruptMetadata(f"pool {path}: {e}; "
                                      f"run 'thinstore --pool {path} check'") from None
            if isinstance(e, OldFormat):
                raise OldFormat(f"pool {path}: {e}: run 'thinstore --pool {path} upgrade' "
                                "once (it rewrites the metadata tree in one commit; the data "
                                "stays where it is)") from None
            raise
        pool = cls(path, md, owner, commit_interval=commit_interval, store=store,
                   scan_free=True)
        pool._attach()
        with pool.lock:              # after any replay: it decides what is mapped
            store.collect_unreferenced(md.space.refs.arr, md.chunk_shift)
            if md.sb.version != FORMAT_VERSION:
                log.warning("pool %s: upgrading from format %d to %d", path, md.sb.version,
                            FORMAT_VERSION)
                md.commit()          # the superblock's switch is the upgrade's one step
        return pool

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._stop.set()
            with self._background_io:  # they stop at their next step; they use the data file
                pass
            try:
                if self._dirty:        # a read-only session leaves the pool untouched
                    self.commit()
                self._reclaim.stop(drain=True)   # what is still queued, punched now
                if self._sums is not None:
                    self._sums.shutdown()   # clean: the next open re-checksums nothing
            finally:
                self._reclaim.stop(drain=False)
                self._closed = True
                self.md.data_fio.close()
                self.md.meta_fio.close()
                if self._sums is not None:
                    self._sums.intent.fio.close()
                if self._log is not None:
                    self._log.close()
                self._owner.release()
                self.store.close()
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.join(timeout=5)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------ properties
    @property
    def counters(self) -> dict:
        """Data path totals; the kernels add into `_kc`, folded in here when read
        (folding on every write cost more than a 4 KiB write's own Python)."""
        with self.lock:
            self._count()
            if self._log is not None:
                self._counters["flush_commits"] = self._log.counters["commits_instead"]
            return self._counters

    @property
    def log_counters(self) -> dict:
        """The intent log's totals since open (synclog.SyncLog.counters): records and
        record_bytes appended (loop_records: by the native NBD loop itself), syncs,
        direct (records made durable by O_DIRECT|O_DSYNC writes of the native log
        writer alone), replayed at open, commits_instead."""
        return self._log.counters

    @property
    def chunk_size(self) -> int:
        return self.md.chunk_size

    @property
    def capacity(self) -> int:
        return self.md.space.capacity * self.md.chunk_size

    @property
    def uuid(self) -> str:
        return self.md.sb.pool_uuid.hex()

    @property
    def local_dir(self) -> str:
        """A directory on this host for the pool's sockets and local state: the pool's
        own directory, or a runtime directory for a rados:// pool."""
        return self.store.runtime_dir()

    @property
    def data_checksums(self) -> bool:
        return bool(self.md.flags & POOL_FLAG_DATA_CHECKSUMS)

    # ------------------------------------------------------------ commit
    def commit(self) -> None:
        """The full commit: a new superblock generation holding every write so far, which
        also folds the intent log in (flush() is the cheap way to durability)."""
        with self.lock:
            self._check_open()
            start = time.perf_counter_ns()
            try:
                self.md.commit(getattr(self, "_checksum_hook", None))
            except BaseException:
                if self._log is not None:       # no record may name what is not on disk
                    self._log.suspend()
                raise
            if self._log is not None:    # the notes are freed later, without the lock
                self._garbage = self._log.committed(log_base(self.md.sb))
            if self._sums is not None:
                self._sums.committed()
            self._dirty = False
            self._check_low_water()
            self._count_commit(time.perf_counter_ns() - start)

    def _count_commit(self, held_ns: int) -> None:
        """Fold one commit's lock hold time and its parts (Metadata.last_commit) into the
        counters, and the requests that were waiting for the lock when it ended."""
        c = self._counters
        c["commits"] += 1
        held_us = held_ns // 1000
        c["commit_hold_us"] += held_us
        c["commit_hold_us_max"] = max(c["commit_hold_us_max"], held_us)
        parts = dict(self.md.last_commit)
        if "release" in parts:     # and the pool's own end: log epoch, intent bitmap
            parts["release"] += max(0, held_ns - sum(parts.values()))
        for part, ns in parts.items():
            c[f"commit_{part}_us"] += ns // 1000
        waiting = self.lock.waiting()
        c["commit_waiters"] += waiting
        c["commit_waiters_max"] = max(c["commit_waiters_max"], waiting)

    def _commit_op(self) -> None:
        """A management operation's commit; inside batch() the batch commits once at its end."""
        if self._batch_depth:
            self._dirty = True
        else:
            self.commit()

    @contextlib.contextmanager
    def batch(self):
        """Group management operations (snapshot, clone, create, destroy) into ONE commit.

        Holds the pool lock exclusively for the block. Each operation inside changes the
        open transaction only; the batch commits once when the block ends, so N snapshots
        cost one commit, not N. Crash safety is that of any transaction: a crash before the
        end commits none of them, after it all of them (docs/integrity.md). An operation
        that raises changed nothing; those before it are committed at the end as usual.
        A commit() or device flush the caller makes inside the block commits what is
        done so far (the lock keeps every other thread out).
        """
        with self.lock:
            self._check_open()
            self._batch_depth += 1
            try:
                yield self
            finally:
                self._batch_depth -= 1
                if not self._batch_depth and self._dirty and not self._closed:
                    self.commit()

    def wait_freed(self, timeout: float | None = None) -> bool:
        """Wait until the background reclaim has punched every chunk freed so far
        (status()["freeing"] is 0); False if `timeout` seconds pass first."""
        return self._reclaim.wait(timeout)

    def _check_open(self) -> None:
        if self._closed:
            raise ThinstoreError(f"pool {self.path} is closed")

    # ------------------------------------------------------------ lookup
    def _find(self, name: str) -> DeviceMeta:
        for dm in self.md.devices.named(name):
            if not dm.flags & FLAG_HIDDEN:
                return dm
        raise NoSuchDevice(f"no device {name!r} in pool {self.path} "
                           "(see 'thinstore list')")

    def _exists(self, name: str) -> bool:
        return bool(self.md.devices.named(name))

    # ------------------------------------------------------------ capacity
    def grow(self, capacity: int) -> None:
        """Enlarge the pool to `capacity` bytes, rounded up to whole chunks (capacity
        never shrinks)."""
        with self.lock:
            self._check_open()
            md = self.md
            nchunks = -(-capacity // md.chunk_size) + 1     # chunk 0 is reserved
            _check_capacity(nchunks - 1, md.chunk_size)
            if nchunks < len(md.space.refs):
                raise UsageError(f"pool {self.path} holds {format_size(self.capacity)}; "
                                 "a pool can grow but not shrink")
            md.data_fio.truncate(nchunks * md.chunk_size)
            md.space.resize(nchunks)
            if self._sums is not None:
                self._sums.grow()      # here, exclusive: readers never replace its arrays
            md.sb = md.sb._replace(capacity_chunks=nchunks)
            self.commit()

    # ------------------------------------------------------------ handles
    def open_device(self, name: str) -> Device:
        with self.lock:
            self._check_open()
            dm = self._find(name)
            dm.opens += 1
            return Device(self, dm)

    def _release(self, dm: DeviceMeta) -> None:
        with self.lock:
            if dm.opens > 0:
                dm.opens -= 1
            if not dm.opens and self._lane is not None:
                self._lane.forget(dm)

    def _live(self, dm: DeviceMeta) -> None:
        self._check_open()
        if self.md.devices.get(dm.dev_id) is not dm:
            raise NoSuchDevice(f"device {dm.name!r} was destroyed")

