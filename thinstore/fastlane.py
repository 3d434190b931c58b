"""The write lane: Device.pwrite's common case in one native call.

With the native backend, a write that finds every chunk it touches mapped under
exclusive pages (the steady state of a volume in use) needs none of the Python
around ts_write_fast: the pool lock, bounds checks, argument marshalling. The lane
(``ts_lane_write`` in _native/thinstore_native.h) does that write whole in C, and
stands aside (TS_SLOW, nothing changed) whenever anything else is going on; the
caller then takes the pool lock and the general path, which does the same write.

How it stays safe without the lock:

- The pool lock's holders close the lane's *gate* (RWLock hooks): while anyone
  holds the lock, shared or exclusive, lane writes stand aside, and a holder
  entering waits for the one lane write in flight. So a lane write runs only
  when the pool lock is free, exactly as if it had taken it.
- The lane's pointers (the pool's arrays, each open device's directory, size and
  writability) are set only while the gate is closed: on the way out of every
  exclusive section, which is where arrays are replaced, devices destroyed or
  resized and the pool closed. The lane also closes itself (``open = 0``) when
  the Python path must see every write: fast writes switched off, or checksums
  tracking chunks allocated in this transaction (DataSums.fresh).
- What the lane does that the pool must know is folded back on the way in to
  every exclusive section: that a transaction is open (``wrote``), and how many
  chunks it allocated (``budget``), which feeds the low-water warning.

The pure-Python backend has no lane: its write path is the one under the pool
lock, so the twin of a lane write is ``kernels.lane_write``, which the agreement
tests hold to the native one.
"""

from __future__ import annotations

import numpy as np

from . import kernels, native

_SLOW = native.lib.TS_SLOW if native.NATIVE else None
_NONE = np.zeros(0, np.uint32)          # checksums off: no sums, no intent bitmap
_NONE_BOOL = np.zeros(0, bool)


class WriteLane:
    """One per open pool (native backend): the C lane and the RWLock hooks that keep it."""

    def __init__(self, pool):
        self._pool = pool
        self.c = native.ffi.new("ts_lane *")
        self._arrays: tuple = ()      # what the lane points into (kept alive here)
        self._record = None           # the same, as a kernels.Lane
        self._given = 0               # budget handed to the lane at the last sync
        self._devs: dict[int, tuple] = {}   # id(dm) -> (dm, ts_dev_lane, directory array)

    # ---- RWLock hooks (see rwlock.py): called by the outermost holder only
    def enter(self, exclusive: bool) -> None:
        native.lib.ts_gate_close(self.c)
        if exclusive:
            self._fold()

    def leave(self, exclusive: bool) -> None:
        try:
            if exclusive:
                self._sync()
        except BaseException:
            self.c.open = 0
            raise
        finally:
            native.lib.ts_gate_open(self.c)

    # ---- devices
    def writer(self, dm):
        """A function (data, offset) -> bool for a handle on dm: True when the lane
        wrote it, False when the caller must take the general path. Called under the
        pool lock; the lane learns the device when that section ends."""
        key = id(dm)
        if key not in self._devs:
            self._devs[key] = (dm, native.ffi.new("ts_dev_lane *"), None)
        dl = self._devs[key][1]
        lane, write, from_buffer, check = self.c, native.lib.ts_lane_write, native.ffi.from_buffer, native._check

        def lane_write(data, offset: int) -> bool:
            try:
                buf = from_buffer("uint8_t[]", data)
                rc = write(lane, dl, buf, offset, len(buf))
            except (TypeError, ValueError, OverflowError):
                return False      # not a flat buffer, or a negative offset: the general path says why
            if rc >= 0:
                return True
            if rc == _SLOW:
                return False
            check(rc, "write")
        return lane_write

    def forget(self, dm) -> None:
        """The last handle on dm closed (under the pool lock)."""
        entry = self._devs.pop(id(dm), None)
        if entry is not None:
            entry[1].writable = 0

    # ---- keeping the lane in step (gate closed)
    def _fold(self) -> None:
        c, pool = self.c, self._pool
        if c.wrote:
            pool._dirty = True
            c.wrote = 0
        used = self._given - c.budget
        if used:
            self._given = c.budget
            pool._note_allocated(used)

    def _sync(self) -> None:
        c, pool = self.c, self._pool
        md = pool.md
        sums = pool._sums
        if (pool._closed or not pool.FAST_WRITES or (sums is not None and sums.fresh)
                or native._fd(md.data_fio) is None):
            c.open = 0
            return
        maps, space = md.maps, md.space
        tail = (_NONE, _NONE_BOOL, _NONE_BOOL) if sums is None else \
            (space.sums.arr, sums.intent.bits, sums.intent.hot)
        arrays = (maps.pages, maps.ref, maps.dirty, space.refs.arr, space.state,
                  space.cursor_arr, pool._kc, md.data_fio, *tail)
        if any(a is not b for a, b in zip(arrays, self._arrays)) or not self._arrays:
            self._record = kernels.Lane(
                maps.pages, maps.ref, maps.dirty, space.refs.arr, space.state, tail[0],
                tail[1], tail[2], sums.intent.shift if sums is not None else 0,
                space.cursor_arr, pool._kc, md.data_fio, md.chunk_shift)
            try:
                native.fill_lane(c, self._record)   # checks types and shapes
            except ValueError:      # e.g. checksums not yet grown with the pool: next time
                c.open, self._arrays = 0, ()
                return
            self._arrays = arrays
        c.budget = self._given = max(0, space.capacity // 200 - pool._since_low_water_check)
        for key, (dm, dl, arr) in list(self._devs.items()):
            if md.devices.get(dm.dev_id) is not dm:
                dl.writable = 0
                continue
            d = dm.directory.arr
            if d is not arr:
                native.fill_dev_lane(dl, kernels.DevLane(d, dm.size, False))
                self._devs[key] = (dm, dl, d)
            dl.size = dm.size
            dl.writable = 0 if dm.read_only else 1
        c.open = 1
