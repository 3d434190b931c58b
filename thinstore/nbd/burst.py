"""The native request loop: a connection's plain READs and WRITEs served in C.

With the native backend, a plain-socket connection's reader thread first hands
its input buffer to ``ts_nbd_burst`` (_native/nbd_fast.h), which serves, without
the GIL and many at a time, every request the reader's own fast path would serve
(flagless READ and WRITE, 0 < length <= FAST_MAX, in range, through the lane, and
WRITEs flagged FUA alone, whose replies the reader holds)
and stops at the first one it does not: that request stays at the head of the
inbox and the reader handles it exactly as it would without the loop. So the
loop is an accelerator: TLS connections, the pure-Python backend, and
``THINSTORE_NBD_LOOP=0`` (or ``ServerConfig.native_loop = False``) take the
Python path alone, and the wire sees the same bytes either way.

How it keeps Transmission's promises:

- replies: C never sends. It appends replies to an output buffer; this module
  queues each call's new replies in the connection's Outbox (one send lock for
  the reader and the workers), and C appends after them until the Outbox is
  empty again, so a queued reply is never overwritten;
- the crash contract: every WRITE served is noted in the intent log's notes
  (Device.note_writes) before any reply of the call is queued, as Device.pwrite
  notes before it returns;
- held replies: C blocks for a request header only when asked (``may_block``),
  which this module does right after ``_settle``, and only until the first
  request of the call; so the reader settles before every read that could
  block, as it does without the loop;
- large WRITEs (over FAST_MAX): received whole into a buffer of the loop and, with a
  second buffer (``ServerConfig.pipeline``, ``THINSTORE_NBD_PIPELINE``), written by the
  connection's writer thread while C receives the next request; C returns
  ``TS_NBD_SEND`` once one is done and the next is with the writer, so its reply
  (noted first, as above) goes out meanwhile; every other return has no write left
  there. ``close()`` stops the thread when the connection ends;
- FLUSH and FUA WRITEs (small ones), with the intent log's native cursor
  (Device.log_cursor, SyncLog.cursor): C holds them and, when the only writes pending
  in the pool are the call's own, appends one record of them itself (ts_log_own),
  waits for it and answers them (nbd_fast.h, "The durable path"), as held.py does:
  its writes are then never Python's to note. It appends the early flush's record
  there too, before the write's reply goes out. When other replies of the call are
  in the buffer, C returns ``TS_NBD_SYNC`` first: they are sent, then
  ``ts_nbd_settle`` waits and answers. Whatever C could not settle it leaves held
  (``held_*``), and this module hands it to the reader (``_hold``, already scored),
  after noting the call's writes, so the reader's own flush answers it;
- without that cursor (the pure-Python backend has no loop; a log without a file
  descriptor has no native writer), a FUA WRITE is written and noted in C but C
  returns ``TS_NBD_FUA`` at once and the reader holds the reply (held.py ``_hold_fua``);
- the early flush's state (held.FlushState) is the ts_nbd_conn's own fields while the
  loop runs, so C and the reader keep one count of writes since the last FLUSH;
- counters: ``stats.inline`` READ/WRITE ops, bytes and service time (C times
  every request it serves, not one in eight), FLUSHes C answered and their time,
  ``moved`` and ``_burst`` count C's requests as the Python path would.
"""

from __future__ import annotations

import os

from thinstore import native
from thinstore.nbd import protocol as P
from thinstore.nbd import stats as S
from thinstore.nbd.channel import FLUSH_BYTES, FLUSH_COUNT
from thinstore.nbd.held import FAST_MAX, HOLD_MAX
from thinstore.nbd.wire import hang_up

ENV = "THINSTORE_NBD_LOOP"          # "0": every request takes the Python path
PIPELINE_ENV = "THINSTORE_NBD_PIPELINE"  # "0": large WRITEs written in turn, not pipelined
LARGE_MAX = 4 << 20                 # = transmission.INLINE_MAX: READ/WRITE served up to this
SCRATCH = (1 << 20) + (64 << 10)    # where C builds its records: a larger one is Python's
OUT_SIZE = FLUSH_BYTES + LARGE_MAX + 64  # one more reply always fits past the flush point

if native.NATIVE:
    _lib, _ffi = native.lib, native.ffi
    _IDLE, _FULL, _TAKEN = _lib.TS_NBD_IDLE, _lib.TS_NBD_FULL, _lib.TS_NBD_TAKEN
    _SEND, _FUA, _SYNC = _lib.TS_NBD_SEND, _lib.TS_NBD_FUA, _lib.TS_NBD_SYNC
    assert _lib.TS_NBD_FAST_MAX == FAST_MAX


class NativeLoop:
    """One connection's ts_nbd_conn and the Python half of the loop."""

    @classmethod
    def attach(cls, tx, agreement, config) -> NativeLoop | None:
        """The loop for Transmission `tx`, or None when its requests take the Python path."""
        if not native.NATIVE or agreement.tls or not getattr(config, "native_loop", True) \
                or os.environ.get(ENV, "") == "0":
            return None
        structs = tx.dev.lane_structs()
        if structs is None or len(tx._inbox.buf) < _lib.TS_NBD_HEADER + FAST_MAX:
            return None
        return cls(tx, *structs, config)

    def __init__(self, tx, pool_c, dev_c, config=None):
        c = self.c = _ffi.new("ts_nbd_conn *")
        self._out = bytearray(OUT_SIZE)
        self._view = memoryview(self._out)
        # the cdata keep the buffers' pointers valid; the buffers are never resized
        self._keep = (pool_c, dev_c, _ffi.from_buffer("uint8_t[]", tx._inbox.buf, True),
                      _ffi.from_buffer("uint8_t[]", self._out, True))
        c.pool, c.dev = pool_c, dev_c
        c.fd = tx.sock.fileno()
        c.structured, c.writable = int(tx.structured), int(not tx.read_only)
        c.ibuf, c.in_size = self._keep[2], len(tx._inbox.buf)
        c.obuf, c.out_size = self._keep[3], OUT_SIZE
        c.out_flush, c.max_replies = FLUSH_BYTES, FLUSH_COUNT
        c.fua = 1       # small FUA WRITEs are written here and held by the reader (held.py)
        # large requests: the lane writes at most TS_FAST_MAX_CHUNKS chunks at once
        c.large_max = min(LARGE_MAX, (_lib.TS_FAST_MAX_CHUNKS - 1) * tx.dev.chunk_size)
        self._big = bytearray(c.large_max)      # pages are touched only when used
        c.big, c.big_size = _ffi.from_buffer("uint8_t[]", self._big, True), c.large_max
        self._keep += (c.big,)
        # pipelined large WRITEs (nbd_fast.h): a second payload buffer; the writer
        # thread starts at the first large WRITE, close() stops it
        self._bigs = (self._big,)
        if getattr(config, "pipeline", True) and os.environ.get(PIPELINE_ENV, "") != "0":
            self._bigs += (bytearray(c.large_max),)
            c.big2 = _ffi.from_buffer("uint8_t[]", self._bigs[1], True)
            self._keep += (c.big2,)
        # the durable path (nbd_fast.h): the intent log's cursor, when it has one
        cursor = tx.dev.log_cursor() if not tx.read_only else None
        if cursor is not None:
            assert _lib.TS_NBD_HELD_MAX == HOLD_MAX
            self._scratch = bytearray(SCRATCH)
            c.log, c.dev_id = cursor
            c.scratch, c.scratch_size = _ffi.from_buffer("uint8_t[]", self._scratch, True), SCRATCH
            self._keep += (cursor[0], c.scratch)
        self._counted = cursor is not None      # C counts its notes in the cursor's pending
        tx._fs = c          # the early flush's state: C's fields (held.FlushState)
        self._tx = tx

    def close(self) -> None:
        """Stop the connection's writer thread, if one was started (at its end, before
        the device is closed)."""
        _lib.ts_nbd_close(self.c)

    def serve(self) -> None:
        """Serve requests in C until the next one is the reader's (left at the head of
        the inbox), the stream ends, or the peer stopped taking replies."""
        tx, c, burst = self._tx, self.c, _lib.ts_nbd_burst
        inbox, outbox, budget = tx._inbox, tx._outbox, tx._budget
        may_block = rc = 0
        try:
            while True:
                if not outbox._queued:      # every reply queued from the buffer is sent
                    c.out_len = c.replies = 0
                # C may send itself while nobody else can: nothing queued or held here,
                # no worker in flight (only this thread starts one)
                c.may_send = int(not outbox._queued and not tx._held and not outbox.dead
                                 and not budget._used_count and self._counted)
                c.start, c.end = inbox.start, inbox.end
                rc = burst(c, may_block)
                inbox.start, inbox.end = c.start, c.end
                if c.send_failed:           # as Outbox.send does on its own failure
                    outbox.dead = True
                    hang_up(tx.sock)
                if c.out_len != c.mark or c.stat[0] or c.stat[3] or c.flush_stat[0] \
                        or c.n_held or rc == _FUA:
                    self._account(tx, c.mark)
                    may_block = 0       # a request was read since the reader settled
                if rc == _SYNC:         # the call's replies first, then the held ones
                    outbox.flush()
                    if not outbox._queued:
                        c.out_len = c.replies = 0
                    _lib.ts_nbd_settle(c)
                    self._account(tx, c.mark)
                    rc = _IDLE
                if c.n_held:            # what C could not settle: the reader's
                    self._take_over(tx)
                if rc == _FUA:
                    tx._hold_fua(c.fua_cookie, c.fua_offset, c.fua_length)
                elif rc == _IDLE:
                    tx._settle()
                    may_block = 1
                elif rc in (_FULL, _SEND):
                    outbox.flush()
                elif rc == _TAKEN:
                    self._taken(tx)
                    may_block = 0
                else:
                    tx.moved[1] += c.lost   # a WRITE cut off in its payload: asked for
                    return
                if outbox.dead:         # the reader's check before each request
                    return
        finally:
            if rc == _SEND:             # a large WRITE is still with the writer
                self._drain(tx)

    def _drain(self, tx) -> None:
        """Wait for the large WRITE the writer still has when the reader gives up on
        the connection: noted when written (no one is left to answer it)."""
        c = self.c
        if _lib.ts_nbd_drain(c) != _TAKEN and c.n_notes:
            n = _ffi.unpack(c.notes, 2)
            tx.dev.note_writes([(n[0], n[1])], self._counted)
            c.n_notes = 0

    def _taken(self, tx) -> None:
        """A large WRITE the loop received but the lane did not write: the reader's
        path does it, as _next_request would have (inline: up to INLINE_MAX)."""
        c = self.c
        n = c.taken_length
        tx._burst += 1
        tx.moved[1] += n
        req = P.Request(P.REQUEST_MAGIC, 0, P.Cmd.WRITE, c.taken_cookie, c.taken_offset, n)
        tx._execute(req, self._bigs[c.taken_which][:n], None)   # a copy: the buffer is reused

    def _take_over(self, tx) -> None:
        """The FLUSH and FUA requests C held and could not settle (nbd_fast.h): held by
        the reader, already scored, as if its own path had read them."""
        c = self.c
        for k in range(c.n_held):
            length = c.held_length[k]
            if length:
                req = P.Request(P.REQUEST_MAGIC, P.CMD_FLAG_FUA, P.Cmd.WRITE, c.held_cookie[k],
                                c.held_offset[k], length)
            else:
                tx.stats.inline[S.FLUSH_OPS] += 1
                req = P.Request(P.REQUEST_MAGIC, 0, P.Cmd.FLUSH, c.held_cookie[k], 0, 0)
            tx._hold(req, scored=True)
        c.n_held = 0

    def _account(self, tx, mark: int) -> None:
        """Fold one call's counters into the connection's, note its writes, queue its
        replies (in that order: no reply goes out before its write is noted)."""
        c = self.c
        r_ops, r_bytes, r_ns, w_ops, w_bytes, w_ns = _ffi.unpack(c.stat, 6)
        counts = tx.stats.inline            # the reader's own list (nbd/stats.py)
        if c.n_notes:                       # those not in a record C appended
            n = _ffi.unpack(c.notes, 2 * c.n_notes)
            tx.dev.note_writes(zip(n[0::2], n[1::2]), self._counted)
            c.n_notes = 0
        if w_ops:
            counts[S.WRITE] += w_ops
            counts[S.WRITE + 1] += w_bytes
            counts[S.WRITE + 2] += w_ns
            counts[S.WRITE + 3] += w_ops
            tx.moved[1] += w_bytes
        if c.flush_stat[0]:
            counts[S.FLUSH_OPS] += c.flush_stat[0]
            counts[S.FLUSH_NS] += c.flush_stat[1]
        if r_ops:
            counts[S.READ] += r_ops
            counts[S.READ + 1] += r_bytes
            counts[S.READ + 2] += r_ns
            counts[S.READ + 3] += r_ops
            tx.moved[0] += r_bytes
        tx._burst += r_ops + w_ops
        if c.out_len != mark:
            tx._outbox.queue((self._view[mark:c.out_len],))
