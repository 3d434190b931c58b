"""The lane: Device.pwrite's and Device.readinto's common case in one native call.

With the native backend, a write that finds every chunk it touches mapped under
exclusive pages (the steady state of a volume in use), or a read whose map pages
are in memory and whose chunks' checksums have been checked, needs none of the
Python around the kernels: the pool lock, bounds checks, argument marshalling.
The lane (``ts_write`` in mode TS_REQ_LANE, ``ts_read``; _native/thinstore_native.h) does
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

The lane is not a separate code path: a lane write is the one write entry
(``ts_write``) in mode TS_REQ_LANE, over the one ts_pool struct the pool owns
(``KernelState`` below), the struct the locked path uses as well (modes
TS_REQ_LOCKED and TS_REQ_GIVEN, from datapath.py); a lane read is ``ts_read`` in
mode TS_REQ_LANE. The pure-Python backend has no lane: its requests take the pool
lock, so the twins ``kernels.write`` and ``kernels.read`` (mode REQ_LANE) serve as
the oracle the agreement tests hold the native ones to.
"""

from __future__ import annotations

from operator import is_

import numpy as np

from . import kernels, native

_SLOW = native.lib.TS_SLOW if native.NATIVE else None
_LANE = native.lib.TS_REQ_LANE if native.NATIVE else None
_NONE = np.zeros(0, np.uint32)          # checksums off: no sums, no intent bitmap
_NONE_BOOL = np.zeros(0, bool)


class KernelState:
    """The pool's state as the kernels take it: one kernels.PoolState, bound (native
    backend) to the pool's one ts_pool struct, kept pointed at the pool's current
    arrays. The map store grows by replacing its arrays, a resize replaces the space
    map's and the checksums'; every user calls current() first, with the pool lock's
    exclusive side held (the gate closed: no lane request is inside), so the struct
    never points at an array Python has let go of."""

    def __init__(self, bound: bool):
        self.ps = kernels.PoolState()
        self.c = native.bind_pool(self.ps) if bound else None
        self._arrays: tuple = ()
        self.native_ok = False      # the struct points at the current arrays
        self.kernels = kernels      # what current() answers with

    def current(self, pool, repoint: bool = True):
        """(PoolState, kernels to call it with), pointed at the pool's current arrays.
        The kernels are the native ones when the struct points at them (or the file
        has no descriptor: their wrappers then route each call without the struct),
        else the twins (checksums not yet grown with the pool, no native backend).
        With repoint False (the shared side of the lock: lane reads may be using
        the struct) a stale struct is left alone and the call gets a PoolState of
        its own, for the twins: rare, as every exclusive section (opening a device
        is one) ends with the struct re-pointed."""
        md, sums = pool.md, pool._sums
        maps, space = md.maps, md.space
        a = self._arrays
        if a and a[0] is maps.pages and a[1] is maps.ref and a[2] is maps.dirty and \
                a[3] is maps.loaded and a[4] is space.refs.arr and a[5] is space.state and \
                a[6] is space.summary and a[7] is space.cursor_arr and a[8] is pool._kc and \
                a[9] is md.data_fio and (a[10] is _NONE if sums is None else (
                    a[10] is space.sums.arr and a[11] is sums.verified and
                    a[12] is sums.intent.bits and a[13] is sums.intent.hot)):
            return self.ps, self.kernels            # the common case: nothing replaced
        tail = (_NONE, _NONE_BOOL, _NONE_BOOL, _NONE_BOOL) if sums is None else \
            (space.sums.arr, sums.verified, sums.intent.bits, sums.intent.hot)
        arrays = (maps.pages, maps.ref, maps.dirty, maps.loaded, space.refs.arr, space.state,
                  space.summary, space.cursor_arr, pool._kc, md.data_fio, *tail)
        if len(arrays) == len(a) and all(map(is_, arrays, a)):
            return self.ps, self.kernels
        shifts = (sums.intent.shift if sums is not None else 0, md.chunk_shift)
        if not repoint and self.c is not None:
            ps = kernels.PoolState()
            _assign(ps, arrays, *shifts)
            bare = self.c is not None and native._fd(md.data_fio) is None
            return ps, (native.NATIVE if bare else kernels)
        self._point(arrays, *shifts)
        return self.ps, self.kernels

    def _point(self, arrays, intent_shift: int, chunk_shift: int) -> None:
        ps = self.ps
        _assign(ps, arrays, intent_shift, chunk_shift)
        self._arrays, self.native_ok, self.kernels = arrays, False, kernels
        if self.c is None:
            return
        self.c.open = 0
        if native._fd(ps.fio) is None:          # the wrappers never use the struct then
            self.kernels = native.NATIVE
            return
        try:
            native.fill_pool(self.c, ps)            # checks types and shapes
        except ValueError:
            self._arrays = ()                       # try again next time
            return
        self.native_ok, self.kernels = True, native.NATIVE


def _assign(ps, arrays, intent_shift: int, chunk_shift: int) -> None:
    (ps.pages, ps.page_ref, ps.page_dirty, ps.page_loaded, ps.chunk_ref, ps.chunk_state,
     ps.chunk_summary, ps.cursor, ps.counters, ps.fio, ps.chunk_sums, ps.chunk_verified,
     ps.intent_bits, ps.intent_hot) = arrays
    ps.intent_shift, ps.chunk_shift = intent_shift, chunk_shift


class Lane:
    """One per open pool (native backend): the pool's KernelState, whose struct is
    the lane's, and the RWLock hooks that keep it."""

    def __init__(self, pool):
        self._pool = pool
        self.state = KernelState(bound=True)
        self.c = self.state.c
        self._given = 0               # budget handed to the lane at the last sync
        self._devs: dict[int, tuple] = {}   # id(dm) -> (dm, kernels.Dev, directory array)

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
            dev = kernels.Dev(np.zeros(0, np.uint64), 0, False)
            dev.c = native.ffi.new("ts_dev *")       # size 0: every request is SLOW
            self._devs[key] = (dm, dev, None)
        return self._devs[key][1].c

    def dev_struct(self, dm):
        """dm's ts_dev for the lane (size 0 until the lane learns the device: every
        request TS_SLOW); called under the pool lock, like writer."""
        return self._dev(dm)

    def writer(self, dm):
        """A function (data, offset) -> bool for a handle on dm: True when the lane
        wrote it, False when the caller must take the general path. Called under the
        pool lock; the lane learns the device when that section ends."""
        dl = self._dev(dm)
        lane, from_buffer, check, write = self.c, native.ffi.from_buffer, native._check, \
            native.lib.ts_write
        null = native.ffi.NULL

        def call(buf, offset: int) -> bool:
            try:
                cbuf = from_buffer("uint8_t[]", buf)
                rc = write(lane, dl, cbuf, offset, len(cbuf), _LANE, null, 0)
            except (TypeError, ValueError, OverflowError):
                return False      # not a flat buffer, or a negative offset: the general path says why
            if rc >= 0:
                return True
            if rc == _SLOW:
                return False
            check(rc, "write")
        return call

    def reader(self, dm):
        """A function (buf, offset) -> bool for a handle on dm: True when the lane
        filled the writable buffer, False (buf untouched) for the general path."""
        dl = self._dev(dm)
        lane, from_buffer, check, read = self.c, native.ffi.from_buffer, native._check, \
            native.lib.ts_read

        def call(buf, offset: int) -> bool:
            try:
                cbuf = from_buffer("uint8_t[]", buf, require_writable=True)
                rc = read(lane, dl, cbuf, offset, len(cbuf), _LANE)
            except (TypeError, ValueError, OverflowError):
                return False
            if rc >= 0:
                return True
            if rc == _SLOW:
                return False
            check(rc, "read")
        return call

    def forget(self, dm) -> None:
        """The last handle on dm closed (under the pool lock)."""
        entry = self._devs.pop(id(dm), None)
        if entry is not None:
            entry[1].c.writable = entry[1].c.size = 0

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
        self.state.current(pool)
        if not self.state.native_ok:     # e.g. checksums not yet grown with the pool
            c.open = 0
            return
        c.writes = int(pool.FAST_WRITES and not (sums is not None and sums.fresh))
        c.budget = self._given = max(0, md.space.capacity // 200 - pool._since_low_water_check)
        for key, (dm, dev, arr) in list(self._devs.items()):
            dl = dev.c
            if md.devices.get(dm.dev_id) is not dm:
                dl.writable = dl.size = 0
                continue
            d = dm.directory.arr
            if d is not arr:
                dev.dirarr = d
                native.fill_dev(dl, dev)
                self._devs[key] = (dm, dev, d)
            dl.size = dm.size
            dl.writable = 0 if dm.read_only else 1
        c.open = 1
