"""The transmission phase: requests in, replies out, for one connection.

One reader thread parses requests (and WRITE payloads) in order.  READs and
WRITEs up to 4 MiB run right there (a thread hand-off would cost more than the work) and
their replies are corked until the reader would block; TRIM, WRITE_ZEROES and large
requests go to a small per-connection worker pool so they overlap, and reply as soon
as they complete.  One send lock per connection keeps every reply whole on the wire
(see :mod:`thinstore.nbd.channel`).

FLUSH and FUA writes run in the reader too, their replies held for one intent-log
sync per burst (:mod:`thinstore.nbd.held`, DESIGN §8, docs/nbd.md).

What must hold:
- a payload is never allocated from a client-declared length above
  ``MAX_PAYLOAD``; larger WRITEs are skipped (up to ``MAX_WRITE_SKIP``) and
  refused, or the connection is dropped;
- in-flight work is bounded (count and bytes handed to workers; replies corked
  in the reader), so a client that pipelines without reading replies stalls
  only itself;
- DISC and end-of-stream let every in-flight request finish before the socket
  closes; a peer that is gone makes sends no-ops, never a server failure;
- FLUSH makes every write acknowledged on any connection durable (Pool.flush:
  the intent log, or a commit): that is the promise behind NBD_FLAG_CAN_MULTI_CONN.
  a held reply goes out only after such a flush (thinstore.nbd.held);
- held replies never wait on the client (thinstore.nbd.held).
"""

from __future__ import annotations

import errno
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from time import perf_counter_ns

from thinstore.errors import DataChecksumError, ThinstoreError
from thinstore.nbd import protocol as P
from thinstore.nbd.burst import LARGE_MAX, NativeLoop
from thinstore.nbd.handshake import Agreement
from thinstore.nbd.held import FAST_MAX, HeldReplies
from thinstore.nbd.channel import Inbox, Outbox
from thinstore.nbd.reads import ReadCommands
from thinstore.nbd import stats as S
from thinstore.nbd.wire import PeerClosed, RequestError, close_quietly, hang_up

log = logging.getLogger(__name__)

MAX_WRITE_SKIP = 128 << 20      # an oversized WRITE up to this is skipped and refused
LOGGED_ERRORS = 10              # checksum/I-O errors a connection logs (then it stays quiet)
INLINE_MAX = 4 << 20            # READ/WRITE up to this run in the reader thread
assert INLINE_MAX == LARGE_MAX  # ... and in the native loop (nbd/burst.py)
# Plain ints for the hot path: an IntEnum member lookup (P.Cmd.WRITE) costs ~90 ns, as much
# as the rest of the request counting; READ (0) and WRITE (1) shifted by 2 are where their
# counters start (thinstore.nbd.stats).
_WRITE = int(P.Cmd.WRITE)
assert (int(P.Cmd.READ) << 2, _WRITE << 2, 7) == (S.READ, S.WRITE, S.SAMPLE_MASK)
_WRITES = (P.Cmd.WRITE, P.Cmd.TRIM, P.Cmd.WRITE_ZEROES)
_RANGED = (P.Cmd.READ, P.Cmd.WRITE, P.Cmd.TRIM, P.Cmd.WRITE_ZEROES, P.Cmd.CACHE,
           P.Cmd.BLOCK_STATUS)


class Budget:
    """Bounds in-flight requests by count and by bytes held in buffers.

    A single request larger than the byte budget is still admitted when
    nothing else is in flight, so every legal request can make progress.
    """

    def __init__(self, count: int, nbytes: int):
        self._cond = threading.Condition()
        self._count, self._bytes = count, nbytes
        self._used_count = self._used_bytes = 0

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            while self._used_count and (self._used_count >= self._count
                                        or self._used_bytes + nbytes > self._bytes):
                self._cond.wait()
            self._used_count += 1
            self._used_bytes += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._used_count -= 1
            self._used_bytes -= nbytes
            self._cond.notify_all()


class Transmission(HeldReplies, ReadCommands):
    """Serve requests on one negotiated connection until DISC or hang-up."""

    def __init__(self, agreement: Agreement, config):
        self.sock, self.dev = agreement.sock, agreement.device
        self.structured, self.contexts = agreement.structured, agreement.contexts
        self.catalog = agreement.catalog
        self.read_only = bool(self.dev.read_only or config.read_only)
        self._budget = Budget(config.queue_depth, config.inflight_bytes)
        self._inbox, self._outbox = Inbox(self.sock), Outbox(self.sock)
        self.stats = S.ConnectionStats()    # read by iostat; see thinstore.nbd.stats
        self._reader = threading.get_ident()
        self.moved = [0, 0]     # bytes asked to READ, to WRITE (counted by the reader thread)
        self._damage_logged = 0  # errors _log_damage saw (under stats.lock: workers fail too)
        self._init_held()
        # OpenSSL objects must not be read and written from two threads at
        # once, so a TLS connection runs its requests in the reader thread.
        self._pool = None if agreement.tls or config.workers <= 0 else \
            ThreadPoolExecutor(config.workers, thread_name_prefix="nbd-io")
        self._loop = NativeLoop.attach(self, agreement, config)   # plain READ/WRITE in C

    # -- main loop ---------------------------------------------------------------
    def run(self) -> None:
        """Read requests until DISC/EOF/protocol violation; then drain and close."""
        self._reader = threading.get_ident()
        try:
            while self._next_request():
                pass
        except (PeerClosed, OSError) as exc:
            log.debug("connection ended: %s", exc)
        except _Violation as exc:
            log.info("dropping client: %s", exc)
        finally:
            held, self._held = self._held, []
            self._settle_held(held)
            self._outbox.flush()
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self._loop is not None:
                self._loop.close()
            close_quietly(self.sock)
            self.dev.close()

    def abort(self) -> None:
        """Called from another thread (shutdown, forced destroy): end the session."""
        hang_up(self.sock)

    def _next_request(self) -> bool:
        """Read one request and run or dispatch it; False after DISC.

        Replies of requests run here are queued and flushed just before the
        reader would block, so a burst of requests gets one burst of replies.
        The native loop (nbd/burst.py), when on, first serves what it can of it.
        """
        if self._loop is not None:
            self._loop.serve()
        if not self._inbox.has(P.REQUEST.size):
            self._settle()
        if self._outbox.dead:
            raise PeerClosed("the peer stopped taking replies")   # no one to answer
        fields = self._inbox.unpack(P.REQUEST)
        self._burst += 1
        if fields[2] <= P.Cmd.WRITE:    # READ 0, WRITE 1: for 'serve -v' and its close line
            self.moved[fields[2]] += fields[5]
        if self._fast_path(*fields):
            return True
        req = P.Request._make(fields)
        if req.magic != P.REQUEST_MAGIC:
            raise _Violation(f"bad request magic {req.magic:#x}")
        if req.type == P.Cmd.DISC:
            return False
        if req.type == P.Cmd.WRITE and req.length > P.MAX_PAYLOAD:
            self._refuse_oversized_write(req)
        elif self._pool is None or self._inline(req):
            self._execute(req, self._read_payload(req), None)
        else:
            self._dispatch(req)
        return True

    def _fast_path(self, magic, flags, kind, cookie, offset, length) -> bool:
        """The hot path: a small, flagless, in-range READ or WRITE runs here at once.

        Everything it skips (flags, range, read-only, magic) is checked by the
        condition; any other request returns False for the general path.
        """
        if flags or not 0 < length <= FAST_MAX or offset + length > self.dev.size \
                or magic != P.REQUEST_MAGIC or kind > _WRITE:
            return self._fast_durable(magic, flags, kind, cookie, offset, length)
        if kind == _WRITE:
            if self.read_only:
                return False
            payload = bytearray(length)
            self._inbox.readinto(memoryview(payload))
            self._fs.since += 1
        counts = self.stats.inline           # this thread's own: no lock (nbd/stats.py)
        at = kind << 2                       # S.READ or S.WRITE
        start = 0 if counts[at] & 7 else perf_counter_ns()     # S.SAMPLE_MASK: 1 in 8
        try:
            if at:                          # WRITE (READ is 0)
                self.dev.pwrite(payload, offset)
                self._send(P.simple_reply(cookie))
            elif self.structured:
                self._read_small_structured(cookie, offset, length)
            else:
                self._read_simple(cookie, offset, length)
        except Exception as exc:           # a failed request must not end the session
            self._fail(P.Request(magic, flags, kind, cookie, offset, length), exc)
            return True
        counts[at] += 1
        counts[at + 1] += length
        if start:
            counts[at + 2] += perf_counter_ns() - start
            counts[at + 3] += 1
        return True

    def _dispatch(self, req: P.Request) -> None:
        """Hand a request to a worker, within the connection's in-flight budget."""
        nbytes = req.length if req.type in (P.Cmd.READ, P.Cmd.WRITE) else 0
        self._outbox.flush()
        self._budget.acquire(nbytes)
        try:
            payload = self._read_payload(req)
        except BaseException:
            self._budget.release(nbytes)
            raise
        self._pool.submit(self._execute, req, payload, nbytes)

    def _inline(self, req: P.Request) -> bool:
        """Reads and writes served from the page cache cost less than a hand-off to a
        worker thread (measured: 4K IOPS halved, 1M reads 10% slower with the hand-off);
        TRIM/WRITE_ZEROES (unbounded work) and very large requests go to the workers
        so they overlap with what follows. FLUSH and FUA writes run here with their
        replies held (see the module docstring): their sync is shared by the burst."""
        if req.type in (P.Cmd.TRIM, P.Cmd.WRITE_ZEROES):
            return False
        return req.length <= INLINE_MAX

    def _read_payload(self, req: P.Request):
        if req.type != P.Cmd.WRITE or not req.length:
            return None
        buf = bytearray(req.length)
        self._inbox.readinto(memoryview(buf))
        return buf

    def _refuse_oversized_write(self, req: P.Request) -> None:
        if req.length > MAX_WRITE_SKIP:
            raise _Violation(f"WRITE of {req.length} bytes: connection dropped")
        self._inbox.skip(req.length)
        error = P.EOVERFLOW if self.structured else P.EINVAL
        self._send_error(req, error, f"payload above {P.MAX_PAYLOAD} bytes")

    # -- execution ---------------------------------------------------------------
    def _execute(self, req: P.Request, payload, nbytes: int | None) -> None:
        """Run one request and reply; ``nbytes`` is its budget share (None inline)."""
        start = perf_counter_ns()
        try:
            self._check(req)
            _COMMANDS[req.type](self, req, payload)
            self._count(req, perf_counter_ns() - start, nbytes is None)
        except RequestError as exc:
            self._count_error()
            self._send_error(req, exc.error, str(exc))
        except Exception as exc:           # a failed request must not end the session
            self._fail(req, exc)
        finally:
            if nbytes is not None:
                self._budget.release(nbytes)

    def _count(self, req: P.Request, elapsed_ns: int, inline: bool) -> None:
        """Add a completed request to the connection's counters (inline: the reader's own
        list, no lock; a worker's: under the connection's stats lock)."""
        slot = _COUNTED.get(req.type)
        if inline:
            _add(self.stats.inline, slot, req.length, elapsed_ns)
        else:
            with self.stats.lock:
                _add(self.stats.pooled, slot, req.length, elapsed_ns)

    def _count_error(self) -> None:
        if threading.get_ident() == self._reader:
            self.stats.inline[S.ERRORS] += 1
        else:
            with self.stats.lock:
                self.stats.pooled[S.ERRORS] += 1

    def _fail(self, req: P.Request, exc: Exception) -> None:
        """Reply with the NBD errno of a storage or OS error; anything else is a bug: EIO.
        Damage (a checksum mismatch, an I/O error) is logged too, the first LOGGED_ERRORS
        of a connection: the client sees only EIO, the operator must see the cause."""
        self._count_error()
        if isinstance(exc, (DataChecksumError, OSError)) and \
                getattr(exc, "errno", None) != errno.ENOSPC:
            self._log_damage(req, exc)
        if isinstance(exc, ThinstoreError):
            self._send_error(req, P.wire_errno(exc.errno), str(exc))
        elif isinstance(exc, OSError):
            self._send_error(req, P.wire_errno(exc.errno), f"I/O error: {exc.strerror}")
        else:
            log.exception("request %s failed", req)
            self._send_error(req, P.EIO, f"internal error: {exc}")

    def _log_damage(self, req: P.Request, exc: Exception) -> None:
        with self.stats.lock:
            self._damage_logged += 1
            n = self._damage_logged
        if n <= LOGGED_ERRORS:
            log.warning("export %r: %s at offset %d failed: %s%s", self.dev.name,
                        P.Cmd(req.type).name, req.offset, exc,
                        " (further errors of this connection are not logged)"
                        if n == LOGGED_ERRORS else "")

    def _check(self, req: P.Request) -> None:
        """Validate command, flags and range; errors as the spec recommends."""
        allowed = P.ALLOWED_CMD_FLAGS.get(req.type)
        if allowed is None:
            raise RequestError(P.EINVAL, f"unknown command {req.type}")
        if not self.structured:
            allowed &= ~P.CMD_FLAG_DF
        if req.flags & ~allowed:
            raise RequestError(P.EINVAL, f"flags {req.flags:#x} invalid for command {req.type}")
        if req.type in _WRITES and self.read_only:
            raise RequestError(P.EPERM, f"export {self.dev.name!r} is read-only")
        if req.type == P.Cmd.FLUSH and (req.offset or req.length):
            raise RequestError(P.EINVAL, "FLUSH offset and length must be zero")
        if req.type in _RANGED and req.offset + req.length > self.dev.size:
            error = P.ENOSPC if req.type in _WRITES else P.EINVAL
            raise RequestError(error, f"range {req.offset}+{req.length} beyond size {self.dev.size}")
        if req.type == P.Cmd.READ and req.length > P.MAX_PAYLOAD:
            raise RequestError(P.EOVERFLOW if self.structured else P.EINVAL,
                               f"read above {P.MAX_PAYLOAD} bytes")

    def _write(self, req: P.Request, payload) -> None:
        if threading.get_ident() == self._reader:
            self._fs.since += 1
            if req.flags & P.CMD_FLAG_FUA:
                if req.length:
                    self.dev.pwrite(payload, req.offset)
                self._hold(req)
                return
        if req.length:
            self.dev.pwrite(payload, req.offset, fua=bool(req.flags & P.CMD_FLAG_FUA))
        self._send_ok(req)

    def _flush(self, req: P.Request, _payload) -> None:
        if threading.get_ident() == self._reader:
            self._hold(req)
            return
        self.dev.flush()
        self._send_ok(req)

    def _trim(self, req: P.Request, _payload) -> None:
        if req.length:
            self.dev.discard(req.offset, req.length)
        self._commit_if_fua(req)
        self._send_ok(req)

    def _write_zeroes(self, req: P.Request, _payload) -> None:
        no_hole = bool(req.flags & P.CMD_FLAG_NO_HOLE)
        if no_hole and req.flags & P.CMD_FLAG_FAST_ZERO:
            raise RequestError(P.ENOTSUP, "zeroing with NO_HOLE allocates: not fast")
        if req.length:
            self.dev.write_zeroes(req.offset, req.length, no_hole=no_hole)
        self._commit_if_fua(req)
        self._send_ok(req)

    def _cache(self, req: P.Request, _payload) -> None:
        self._send_ok(req)        # reads are served from the page cache already

    def _commit_if_fua(self, req: P.Request) -> None:
        """TRIM/WRITE_ZEROES with FUA (on a worker, or the reader without workers)."""
        if req.flags & P.CMD_FLAG_FUA:
            self.dev.flush()

    # -- replies -----------------------------------------------------------------
    def _send_ok(self, req: P.Request) -> None:
        self._send(P.simple_reply(req.cookie))

    def _send_error(self, req: P.Request, error: int, message: str) -> None:
        if self.structured:
            self._send(P.chunk_error(req.cookie, error, message))
        else:
            self._send(P.simple_reply(req.cookie, error))

    def _send(self, *parts) -> None:
        """One whole reply: queued when produced by the reader, sent at once by a worker."""
        if threading.get_ident() == self._reader:
            self._outbox.queue(parts)
        else:
            self._outbox.send(parts)


class _Violation(Exception):
    """The client broke a MUST of the protocol: hard disconnect."""



_COMMANDS = {
    P.Cmd.READ: Transmission._read,
    P.Cmd.WRITE: Transmission._write,
    P.Cmd.FLUSH: Transmission._flush,
    P.Cmd.TRIM: Transmission._trim,
    P.Cmd.CACHE: Transmission._cache,
    P.Cmd.WRITE_ZEROES: Transmission._write_zeroes,
    P.Cmd.BLOCK_STATUS: Transmission._block_status,
}


#: command -> where its figures start in the counters; others count as "other"
_COUNTED = {P.Cmd.READ: S.READ, P.Cmd.WRITE: S.WRITE, P.Cmd.FLUSH: S.FLUSH_OPS}


def _add(counts: list, at, length: int, elapsed_ns: int) -> None:
    if at is None:
        counts[S.OTHER_OPS] += 1
    elif at == S.FLUSH_OPS:
        counts[S.FLUSH_OPS] += 1
        counts[S.FLUSH_NS] += elapsed_ns
    else:
        counts[at] += 1
        counts[at + 1] += length
        counts[at + 2] += elapsed_ns
        counts[at + 3] += 1
