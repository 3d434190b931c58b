"""The lane: Device.pwrite's and Device.readinto's common case in one native call.

With the native backend, a write that finds every chunk it touches mapped under
exclusive pages (the steady state of a volume in use), or a read whose map pages
are in memory and whose chunks' checksums have been checked, needs none of the
Python around the kernels: the pool lock, bounds checks, argument marshalling.
The lane (``ts_lane_write``, ``ts_lane_read`` in _native/thinstore_native.h) does
such a request whole in C, and stands aside (TS_SLOW, nothing changed) whenever
anything else is going on; the caller then takes the pool lock and the general
path, which does the same request.

How it stays safe without the lock:

- A *gate* counts who is inside: lane reads (any number), one lane write, and the
  pool lock's holders, whose RWLock hooks enter and leave it. A lane write needs
  the gate empty. A lane read shares it with other reads, lane or Python (none of
  them changes what another reads), but not with a lane write or the lock's
  exclusive side. A thread that starts waiting for the lock announces itself
  first, so new lane requests stand aside and the waiter is not starved; once it
  has the lock it waits for the lane requests already inside (each one request).
  So each lane request runs exactly as if it held the lock's matching side.
- The lane's pointers (the pool's arrays, each open device's directory, size and
  writability) are set only on the way out of an exclusive section, which is
  where arrays are replaced, devices destroyed or resized and the pool closed.
  Writes through the lane are off (``writes = 0``) while the Python path must see
  every write: fast writes switched off, or checksums tracking chunks allocated
  in this transaction (DataSums.fresh); the whole lane is off once the pool is
  closed.
- What lane writes did that the pool must know is folded back on the way in to
  every exclusive section: that a transaction is open (``wrote``), and how many
  chunks they allocated (``budget``), which feeds the low-water warning.

The pure-Python backend has no lane: its requests take the pool lock, so the twins
of the lane's entries, ``kernels.lane_write`` and ``kernels.lane_read``, serve as
the oracle the agreement tests hold the native ones to.
"""

from __future__ import annotations

import numpy as np

from . import kernels, native

_SLOW = native.lib.TS_SLOW if native.NATIVE else None
_NONE = np.zeros(0, np.uint32)          # checksums off: no sums, no intent bitmap
_NONE_BOOL = np.zeros(0, bool)


class Lane:
    """One per open pool (native backend): the C lane and the RWLock hooks that keep it."""

    def __init__(self, pool):
        self._pool = pool
        self.c = native.ffi.new("ts_lane *")
        self._arrays: tuple = ()      # what the lane points into (kept alive here)
        self._record = None           # the same, as a kernels.Lane
        self._given = 0               # budget handed to the lane at the last sync
        self._devs: dict[int, tuple] = {}   # id(dm) -> (dm, ts_dev_lane, directory array)

    # ---- RWLock hooks (see rwlock.py): called by the outermost holder only
    def announce(self, exclusive: bool) -> None:
        native.lib.ts_gate_announce(self.c, exclusive)

    def withdraw(self, exclusive: bool) -> None:
        native.lib.ts_gate_withdraw(self.c, exclusive)

    def enter(self, exclusive: bool) -> None:
        native.lib.ts_gate_close(self.c, exclusive)
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
            native.lib.ts_gate_open(self.c, exclusive)

    # ---- devices
    def _dev(self, dm):
        key = id(dm)
        if key not in self._devs:
            self._devs[key] = (dm, native.ffi.new("ts_dev_lane *"), None)
        return self._devs[key][1]

    def writer(self, dm):
        """A function (data, offset) -> bool for a handle on dm: True when the lane
        wrote it, False when the caller must take the general path. Called under the
        pool lock; the lane learns the device when that section ends."""
        return self._entry(dm, native.lib.ts_lane_write, False, "write")

    def reader(self, dm):
        """A function (buf, offset) -> bool for a handle on dm: True when the lane
        filled the writable buffer, False (buf untouched) for the general path."""
        return self._entry(dm, native.lib.ts_lane_read, True, "read")

    def _entry(self, dm, c_entry, fills: bool, what: str):
        dl = self._dev(dm)
        lane, from_buffer, check = self.c, native.ffi.from_buffer, native._check

        def call(buf, offset: int) -> bool:
            try:
                cbuf = from_buffer("uint8_t[]", buf, require_writable=fills)
                rc = c_entry(lane, dl, cbuf, offset, len(cbuf))
            except (TypeError, ValueError, OverflowError):
                return False      # not a flat buffer, or a negative offset: the general path says why
            if rc >= 0:
                return True
            if rc == _SLOW:
                return False
            check(rc, what)
        return call

    def forget(self, dm) -> None:
        """The last handle on dm closed (under the pool lock)."""
        entry = self._devs.pop(id(dm), None)
        if entry is not None:
            entry[1].writable = entry[1].size = 0

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
        if pool._closed or native._fd(md.data_fio) is None:
            c.open = 0
            return
        maps, space = md.maps, md.space
        tail = (_NONE, _NONE_BOOL, _NONE_BOOL, _NONE_BOOL) if sums is None else \
            (space.sums.arr, sums.verified, sums.intent.bits, sums.intent.hot)
        arrays = (maps.pages, maps.ref, maps.dirty, maps.loaded, space.refs.arr, space.state,
                  space.cursor_arr, pool._kc, md.data_fio, *tail)
        if any(a is not b for a, b in zip(arrays, self._arrays)) or not self._arrays:
            self._record = kernels.Lane(
                maps.pages, maps.ref, maps.dirty, maps.loaded, space.refs.arr, space.state,
                tail[0], tail[1], tail[2], tail[3], sums.intent.shift if sums is not None else 0,
                space.cursor_arr, pool._kc, md.data_fio, md.chunk_shift)
            try:
                native.fill_lane(c, self._record)   # checks types and shapes
            except ValueError:      # e.g. checksums not yet grown with the pool: next time
                c.open, self._arrays = 0, ()
                return
            self._arrays = arrays
        c.writes = int(pool.FAST_WRITES and not (sums is not None and sums.fresh))
        c.budget = self._given = max(0, space.capacity // 200 - pool._since_low_water_check)
        for key, (dm, dl, arr) in list(self._devs.items()):
            if md.devices.get(dm.dev_id) is not dm:
                dl.writable = dl.size = 0
                continue
            d = dm.directory.arr
            if d is not arr:
                native.fill_dev_lane(dl, kernels.DevLane(d, dm.size, False))
                self._devs[key] = (dm, dl, d)
            dl.size = dm.size
            dl.writable = 0 if dm.read_only else 1
        c.open = 1
