"""Held replies: FLUSH and FUA writes answered by one intent-log sync per burst.

A mixin of Transmission (the reader thread's side of it). A FLUSH, or a FUA write once
its data is written, is *held*: its reply waits until the reader is about to block
on the socket (or HOLD_MAX are held). Then the reader sends its corked replies,
makes everything durable with one Pool.flush (one intent-log record, one fdatasync
of the log: synclog.py) and answers every held request, a group commit with no
thread hand-off. The flush runs in the reader when every request the client has in
flight is held (nothing can arrive meanwhile), else on a worker, so the requests the
client sends on the replies just sent are read while the log syncs.

And when a client has been sending a FLUSH after every N writes, the reader, about
to block after the N-th write, flushes first: it appends the record and starts its
write on the log writer (synclog.py, intentlog.c) before the replies go out, so the
disk works while they travel and the client turns round, and the FLUSH that follows
waits only for the rest of it. Without a log writer, a client with one request in
flight gets that flush in the reader right after the replies are sent. Each such
guess is scored when the next FLUSH (or FUA write) comes: +1 when it came right
there, -2 when more writes came first (the record then only cost a write); below 0
the reader stops acting on its guesses and only keeps scoring them, so a file
system's journal, whose gaps vary, does not pay for records its next writes make
useless, and a database that flushes after every commit gets them.
A client that stops flushing costs at most one such flush.

What must hold:
- a held reply is sent only after a Pool.flush that began after its request was
  read (and, for a FUA write, after its data was written) has returned; if that
  flush fails, every held request gets its error;
- held replies never wait on the client: the reader settles them before any read
  that could block on a request header (a payload it has begun to read is owed).
"""

from __future__ import annotations

import logging
from time import perf_counter_ns

from thinstore.nbd import protocol as P
from thinstore.nbd import stats as S

log = logging.getLogger(__name__)

HOLD_MAX = 64                   # held FLUSH/FUA replies that make the reader settle at once
_WRITE, _FLUSH, _FUA = int(P.Cmd.WRITE), int(P.Cmd.FLUSH), P.CMD_FLAG_FUA
_HEADER = P.REQUEST.size
FAST_MAX = 128 << 10            # READ/WRITE (and FUA WRITE) up to this take the fast paths
_SCORE_MAX, _SCORE_MIN = 4, -8  # bounds of the early flush's score (module docstring)


class HeldReplies:
    """Transmission's FLUSH/FUA handling in the reader thread (module docstring)."""

    def _init_held(self) -> None:
        self._held: list = []   # FLUSH / FUA requests run in the reader, awaiting one sync
        self._fs = FlushState()  # the early flush's state (the native loop's, when it runs)
        self._burst = 0         # requests read since the reader last was about to block

    def _fast_durable(self, magic, flags, kind, cookie, offset, length) -> bool:
        """A plain FLUSH, or a small in-range WRITE whose only flag is FUA, held here
        (see _hold) without the general path's checks, which the condition makes;
        False for anything else."""
        if magic != P.REQUEST_MAGIC or self.read_only:
            return False
        if kind == _FLUSH and not (flags or offset or length):
            self.stats.inline[S.FLUSH_OPS] += 1
        elif kind == _WRITE and flags == _FUA and 0 < length <= FAST_MAX \
                and offset + length <= self.dev.size:
            payload = bytearray(length)
            self._inbox.readinto(memoryview(payload))
            self._fs.since += 1
            try:
                self.dev.pwrite(payload, offset)
            except Exception as exc:       # a failed request must not end the session
                self._fail(P.Request(magic, flags, kind, cookie, offset, length), exc)
                return True
            counts = self.stats.inline
            counts[S.WRITE] += 1
            counts[S.WRITE + 1] += length
            if not self._inbox.has(_HEADER):   # the reader settles next: start the
                self._start_flush()            # record's write now, before that Python
        else:
            return False
        self._hold(P.Request(magic, flags, kind, cookie, offset, length))
        return True

    def _hold_fua(self, cookie: int, offset: int, length: int) -> None:
        """A FUA WRITE the native loop wrote, noted and counted (burst.py, TS_NBD_FUA):
        held as _fast_durable holds one, its record's write started at once when the
        reader settles next."""
        if not self._inbox.has(_HEADER):
            self._start_flush()
        self._hold(P.Request(P.REQUEST_MAGIC, _FUA, _WRITE, cookie, offset, length))

    def _hold(self, req: P.Request, scored: bool = False) -> None:
        """Reader thread: answer `req` after the next Pool.flush (see _settle);
        `scored`: the native loop held it first and scored its guess already."""
        if not scored:
            fs = self._fs
            gap = fs.since
            if fs.guess:            # was the FLUSH (or FUA) where it was expected?
                fs.score = min(_SCORE_MAX, fs.score + 1) if gap == fs.guess \
                    else max(_SCORE_MIN, fs.score - 2)
                fs.guess = 0
            fs.gap, fs.since, fs.started = gap, 0, 0
        self._held.append(req)
        if len(self._held) >= HOLD_MAX:
            held, self._held = self._held, []
            self._settle_held(held)

    def _settle(self) -> None:
        """The reader is about to block on the socket. Corked replies go out first;
        then what it holds is answered after one flush for all: here when every request
        the client has in flight is held (nothing can arrive meanwhile, and a hand-off
        would only add latency), else on a worker, so the requests the client sends
        on the replies just sent are read while the log syncs. With nothing held, when
        the client's pattern says a FLUSH comes next, flush now, while its round trip
        is under way: on the log writer, started before the replies go out
        (the reader never waits for it), or, without one, in the reader after
        sending, and then only for a client with one request in flight (one with more
        has its FLUSH in the same burst, and would wait for this sync). With a log
        writer, held replies have their record appended and its write started before
        the corked replies go, and the reader then waits for it itself: a hand-off to
        a worker cost more (its wake-up, and the GIL it then shares with the reader)
        than reading the client's next requests during the write gained (measured:
        FLUSH every 16 writes at QD16, 30.2k IOPS with the hand-off, 35.3k without)."""
        others, alone = bool(self._outbox._queued), self._burst == 1
        self._burst = 0
        held, self._held = self._held, []
        fs = self._fs
        expect = not held and fs.since and fs.since == fs.gap and not self.read_only
        if expect and not fs.guess:
            fs.guess = fs.since
        # (the native loop may have appended this record already: started)
        early = expect and fs.score >= 0 and not fs.started
        # the log writer starts on the record before the replies go out
        started = (early or held and others) and self._start_flush()
        self._outbox.flush()
        if held:
            if others and self._pool is not None and not started:
                self._budget.acquire(0)
                self._pool.submit(self._settle_held, held, True)
            else:
                self._settle_held(held)
                self._outbox.flush()
        elif early and alone and not started:
            try:
                self.dev.flush()
            except Exception as exc:    # the FLUSH itself will report it, if one comes
                log.debug("early flush failed: %s", exc)

    def _start_flush(self) -> bool:
        """The early flush without waiting (its durable write on the log writer);
        False when the pool has no log writer, and the reader flushes after sending."""
        try:
            return self.dev.flush(wait=False)
        except Exception as exc:        # the FLUSH itself will report it, if one comes
            log.debug("early flush failed: %s", exc)
            return True

    def _uncount(self, held: list, pooled: bool) -> None:
        """The held requests were counted as done when they were held (a FLUSH in the
        flush count, a FUA write in the write count and bytes); their flush failed, so
        they count as errors (_fail) and not as done. On a worker the correction goes
        into its own counters (summed with the reader's: thinstore.nbd.stats)."""
        flushes = sum(1 for req in held if req.type == P.Cmd.FLUSH)
        writes = [req.length for req in held if req.type != P.Cmd.FLUSH]
        if pooled:
            with self.stats.lock:
                _take(self.stats.pooled, flushes, writes)
        else:
            _take(self.stats.inline, flushes, writes)

    def _settle_held(self, held: list, pooled: bool = False) -> None:
        """Flush once, then answer every request of `held` (an error to each if the
        flush failed); `pooled`: on a worker, whose budget share is released here."""
        if not held:
            return
        try:
            start = perf_counter_ns()
            try:
                self.dev.flush()
            except Exception as exc:
                self._uncount(held, pooled)
                for req in held:
                    self._fail(req, exc)
                return
            spent = perf_counter_ns() - start
            flushes = sum(1 for req in held if req.type == P.Cmd.FLUSH)
            if pooled:
                with self.stats.lock:
                    self.stats.pooled[S.FLUSH_NS] += spent * flushes
            else:
                self.stats.inline[S.FLUSH_NS] += spent * flushes
            for req in held:
                self._send_ok(req)
        finally:
            if pooled:
                self._budget.release(0)


class FlushState:
    """The early flush's state (module docstring), the fields of the same names in
    the native loop's ts_nbd_conn (nbd_fast.h), which takes its place while the loop
    runs (burst.py): since (writes since the last FLUSH or FUA), gap (between the
    two before; 0: no pattern seen), guess (the write count at which a FLUSH is
    expected; 0: none), score (how such guesses did: +1 a hit, -2 a miss; below 0:
    off), started (the early record of the writes since was appended already)."""

    __slots__ = ("since", "gap", "guess", "score", "started")

    def __init__(self):
        self.since = self.gap = self.guess = self.score = self.started = 0


def _take(counts: list, flushes: int, writes: list) -> None:
    counts[S.FLUSH_OPS] -= flushes
    counts[S.WRITE] -= len(writes)
    counts[S.WRITE + 1] -= sum(writes)
