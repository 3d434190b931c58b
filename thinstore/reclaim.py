"""Background space reclaim: punching the data file's freed chunks, throttled.

When a commit frees chunks (destroy, rollback, overwrite of a shared chunk), the space
map marks them free in that commit; what is left is host-level: giving their bytes
back to the file system with a hole punch. Done inside the commit, under the pool's
exclusive lock, that punch stalled every client for as long as it took (1.6 s for
8 GiB of whole chunks, 11 s fragmented). Here it runs afterwards in a background
thread, a slice at a time, as dm-thin's deferred deletion and RBD's snaptrim do:

- each slice (at most SLICE_BYTES of chunks) is taken under the *shared* side of the
  pool lock, which keeps writes (and the native lane's writes) out, so no chunk can be
  allocated between the check and the punch; reads run on;
- every chunk is checked again before it is punched: still free (refcount 0, not
  pending in the open transaction). A chunk reused meanwhile is skipped: its new
  owner's data is never punched (a free chunk inside the allocator's preallocated
  range is punched as commit_done always did: preallocation is only a hint);
- between slices the thread sleeps at least as long as the slice took (DUTY), so the
  reclaim uses at most half of the file system's time;
- a crash during it loses nothing (only free chunks are punched, and a reused chunk is
  rewritten whole by its new owner: kernels._place_chunk punches or copies the parts a
  write does not cover) and leaks nothing: the free state is already committed, and
  the next open queues the free chunks that still hold data (found with SEEK_DATA, in
  the same background thread) before anything else;
- close() punches what is still queued, at full speed (nobody waits on a closing pool);
- a store that frees space a whole object at a time (RADOS, 4 MiB objects) has each
  object whose chunks are all free removed, and the free runs of the others zeroed.

`Pool.status()["freeing"]` is the bytes still queued.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time

import numpy as np

from .spacemap import id_runs
from .kernels import ST_PENDING_FREE

log = logging.getLogger("thinstore")

SLICE_BYTES = 4 << 20      # chunks punched per slice under the shared lock
DUTY = 1.0                 # sleep this many times the slice's own time between slices
MIN_GAP = 0.0005           # and at least this long (seconds)
SCAN_DELAY = 2.0           # an open's scan for unpunched free chunks waits this long


class Reclaimer:
    """The pool's background punch queue (see the module docstring)."""

    def __init__(self, pool, *, scan: bool = False):
        self.pool = pool
        self.runs: collections.deque[tuple[int, int]] = collections.deque()
        self.queued = 0                 # chunks queued, not yet punched or skipped
        self.punched = 0                # chunks punched so far (a counter for tests)
        self._cv = threading.Condition()
        self._stop = False
        self._busy = False
        self._scan = scan
        self._scanning = scan           # until the open's scan has queued what it found
        self._thread: threading.Thread | None = None
        if scan:
            self._start()

    # -- the commit's side
    def add(self, ids: np.ndarray) -> None:
        """Queue chunk ids the last commit freed (sorted). Cheap: no I/O."""
        if not len(ids):
            return
        with self._cv:
            for start, count in id_runs(ids):
                self.runs.append((start, count))
                self.queued += count
            self._cv.notify_all()
        self._start()

    @property
    def freeing_bytes(self) -> int:
        return self.queued << self.pool.md.chunk_shift

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the queue is empty (True) or `timeout` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self.runs or self._busy or (self._scanning and not self._stopped()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left if left is not None else 0.1)
        return True

    def stop(self, drain: bool = True) -> None:
        """Stop the thread; with `drain`, punch the rest here at full speed. The caller
        holds the pool's exclusive lock (close)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            # the thread takes the shared lock, which our exclusive hold keeps it from:
            # it sees _stop and leaves without touching the file
            t.join(timeout=5)
        if drain:
            while self.runs:
                start, count = self.runs.popleft()
                self._punch_free(start, count)
                self.queued -= count

    # -- the thread
    def _start(self) -> None:
        with self._cv:
            if self._thread is not None or self._stop:
                return
            self._thread = threading.Thread(target=self._loop, name="thinstore-reclaim",
                                            daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        try:
            if self._scan:
                with self._cv:
                    self._cv.wait_for(lambda: self._stop, SCAN_DELAY)
                try:
                    if not self._stopped():
                        self._queue_unpunched()
                finally:
                    with self._cv:
                        self._scanning = False
                        self._cv.notify_all()
            while True:
                with self._cv:
                    while not (self.runs or self._stopped()):
                        self._cv.wait(1.0)      # an abandoned pool (a crash test) ends us too
                    if self._stopped():
                        return
                    start, count = self.runs.popleft()
                    cut = max(1, SLICE_BYTES >> self.pool.md.chunk_shift)
                    if count > cut:
                        self.runs.appendleft((start + cut, count - cut))
                        count = cut
                    self._busy = True
                t0 = time.monotonic()
                done = False
                try:
                    done = self._slice(start, count)
                finally:
                    with self._cv:
                        if done:
                            self.queued -= count
                        else:            # stopped before it: close() drains it
                            self.runs.appendleft((start, count))
                        self._busy = False
                        self._cv.notify_all()
                if not done:
                    return
                took = time.monotonic() - t0
                with self._cv:
                    self._cv.wait_for(lambda: self._stop, max(MIN_GAP, took * DUTY))
        except Exception as e:       # a failing file: reclaim stops, the pool serves on
            log.error("background space reclaim stopped: %s", e)

    def _slice(self, start: int, count: int) -> bool:
        lock = self.pool.lock
        if not self._take_shared():
            return False
        try:
            if self.pool._closed or self._stopped():
                return False
            self._punch_free(start, count)
            return True
        finally:
            lock.release_shared()

    def _stopped(self) -> bool:
        return self._stop or self.pool._stop.is_set()

    def _take_shared(self) -> bool:
        """The pool lock's shared side, polled so that stop() (called by close, which
        holds the exclusive side) never waits on a thread waiting on it."""
        while not self._stopped():
            if self.pool.lock.acquire_shared(timeout=0.05):
                return True
        return False

    def _punch_free(self, start: int, count: int) -> None:
        """Punch those of chunks [start, start+count) that are free now (caller holds a
        side of the pool lock)."""
        md = self.pool.md
        space = md.space
        hi = min(start + count, len(space.refs.arr))
        if hi <= start:
            return
        ids = np.arange(start, hi, dtype=np.int64)
        free = ids[_free(space, start, hi)]
        shift = md.chunk_shift
        fio = md.data_fio
        unit = getattr(fio, "punch_unit", 0) >> shift
        if unit > 1 and len(free):
            # a store that frees space an object at a time (RADOS: 4 MiB) removes each
            # object whose chunks are all free now, and zeroes the free runs of others
            whole = [u for u in np.unique(free // unit).tolist()
                     if _free(space, u * unit, min((u + 1) * unit, len(space.refs.arr))).all()]
            for u in whole:
                fio.punch((u * unit) << shift, unit << shift)
            before = len(free)
            free = free[~np.isin(free // unit, whole)]
            self.punched += before - len(free)
        for s, n in id_runs(free):
            fio.punch(s << shift, n << shift)
            self.punched += n

    def _queue_unpunched(self) -> None:
        """Queue the free chunks that still hold data (a crash before their punch): the
        data file's extents by SEEK_DATA/SEEK_HOLE, under the shared lock."""
        fd = getattr(self.pool.md.data_fio, "fd", None)
        if fd is None:
            return
        lock = self.pool.lock
        if not self._take_shared():
            return
        try:
            if self.pool._closed:
                return
            shift = self.pool.md.chunk_shift
            refs = self.pool.md.space.refs.arr
            found = []
            for off, end in _extents(fd):
                lo, hi = max(1, off >> shift), min(len(refs), -(-end >> shift))
                if hi > lo:
                    free = np.flatnonzero(refs[lo:hi] == 0) + lo
                    if len(free):
                        found.append(free)
        finally:
            lock.release_shared()
        if found:
            self.add(np.concatenate(found))


def _free(space, lo: int, hi: int) -> np.ndarray:
    """Which of chunks [lo, hi) are free now: refcount 0, not pending in the open
    transaction (the caller holds a side of the pool lock)."""
    return (space.refs.arr[lo:hi] == 0) & ((space.state[lo:hi] & ST_PENDING_FREE) == 0)


def _extents(fd: int):
    """(start, end) of each data extent of the file (SEEK_DATA / SEEK_HOLE)."""
    size = os.fstat(fd).st_size
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:          # ENXIO: no data past pos
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end
