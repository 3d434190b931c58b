"""The control socket's server: listener, peer checks and request dispatch.

ControlServer accepts at most MAX_CLIENTS connections, answers only trusted peers
(SO_PEERCRED, thinstore/sockets.py), reads request lines with the descriptors they
carry and answers each with one line; online ops (thinstore/online.py) may send
event lines first. An op runs as the pool's method of that name unless the server
has its own handler: the guarded management ops (guards.py) and the queries of the
server's own state below. Any error becomes an error answer; the server keeps
serving.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import threading

from thinstore import errors, sockets
from thinstore.errors import ProtocolError, ThinstoreError

from .guards import Guards
from .wire import (IDLE_TIMEOUT, MAX_CLIENTS, MAX_FDS, MAX_LINE, OPS, error_dict, socket_path,
                   to_wire)

log = logging.getLogger("thinstore.control")


class ControlServer(Guards):
    """Answers management calls on the control socket for a running NBD server.

    ``sessions`` is the NBD server (``connections(name)``, ``disconnect(name)``):
    destroying a device a client has open is refused with DeviceBusy naming
    the connections, unless forced, in which case those clients are dropped.
    """

    def __init__(self, pool, sessions=None, nbd_socket: str | None = None):
        self.pool, self.sessions, self.nbd_socket = pool, sessions, nbd_socket
        self._listener: socket.socket | None = None
        self._stopping = threading.Event()
        self._clients = threading.Semaphore(MAX_CLIENTS)
        self._thread: threading.Thread | None = None
        self._identity = None
        self.readers: dict[str, int] = {}     # device -> online readers (online.py)
        self.readers_lock = threading.Lock()
        #: callables NAME@SNAP -> context manager, entered around each snapshot (a frontend
        #: freezes the file system it has mounted from the volume; never holding the pool lock)
        self.snapshot_hooks: list = []
        #: callables VOLUME -> str | True | None, asked when a rollback, destroy or shrink
        #: finds the volume busy: why, in its user's words (replaces the NBD-level reason),
        #: or True when the frontend has just let go of an idle hold of its own. One that
        #: takes ``forced`` is also called (VOLUME, forced=True) once a forced destroy of a
        #: busy volume is done: it lets go of what it held of the volume and returns who
        #: lost it (str, for the caller's warning) or None
        self.busy_reasons: list = []
        #: frontend name -> callable DEVICES (name -> uuid) -> [Hold] | None: a running
        #: frontend's holds from its live records; one not in it, or answering None, holds
        #: what its state file at the default place says (thinstore/frontends/holds.py)
        self.hold_sources: dict = {}

    def listen(self, path: str | None = None) -> str:
        path = path or socket_path(self.pool.path)
        # the control socket of the pool this process holds: a server still answering
        # there lost the pool (taken over), so its socket is replaced (sockets.py)
        sock, self._identity = sockets.bind_private(path, "control socket", owned=True)
        sock.listen(16)
        sock.settimeout(0.2)
        self._listener, self.path = sock, path
        self._thread = threading.Thread(target=self._accept_loop, name="control", daemon=True)
        self._thread.start()
        return path

    def shutdown(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(5)
        if getattr(self, "path", None):
            sockets.release(self.path, self._identity)

    def _accept_loop(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    conn, _ = self._listener.accept()
                except (socket.timeout, InterruptedError):
                    continue
                if not self._clients.acquire(blocking=False):
                    conn.close()
                    continue
                threading.Thread(target=self._serve_client, args=(conn,), daemon=True).start()
        finally:
            self._listener.close()

    def _trusted(self, conn: socket.socket) -> bool:
        """Answer only root, the pool's owner and the server's own user (SO_PEERCRED): a
        socket left readable by mistake must not hand the pool to any local user."""
        _pid, uid, _gid = sockets.peer_credentials(conn)
        if uid in sockets.trusted_uids(self.pool.path):
            return True
        log.warning("control socket: refused a client running as %s", sockets.user_name(uid))
        error = errors.UntrustedPeer(f"this server answers only root and the owner of pool "
                                      f"{self.pool.path}, not {sockets.user_name(uid)}")
        try:  # read its request first, so the refusal is its answer, not a broken pipe
            conn.settimeout(1.0)
            conn.makefile("rb").readline(MAX_LINE + 1)
            conn.sendall(json.dumps({"ok": False, "error": error_dict(error)}).encode() + b"\n")
        except OSError:
            pass
        return False

    def _serve_client(self, conn: socket.socket) -> None:
        try:
            if not self._trusted(conn):
                return
            conn.settimeout(IDLE_TIMEOUT)
            reader = _Lines(conn)
            while not self._stopping.is_set():
                line, fds = reader.readline(MAX_LINE + 1)
                if not line:
                    break
                answer = self.handle_line(line, fds, _Events(conn))
                conn.sendall(json.dumps(answer).encode() + b"\n")
        except OSError as exc:
            log.debug("control client gone: %s", exc)
        finally:
            conn.close()
            self._clients.release()

    def handle_line(self, line: bytes, fds=(), emit=None) -> dict:
        """One request line (and the descriptors it carried) -> one answer dict; never
        raises. `emit(event)` sends an event line ahead of the answer (online ops)."""
        from thinstore import online
        fds = list(fds)
        try:
            if len(line) > MAX_LINE:
                raise ProtocolError("control request too long")
            request = json.loads(line)
            op = request.get("op") if isinstance(request, dict) else None
            if op in online.OPS:
                return {"ok": True, "result": online.run(self, op, request.get("args") or {},
                                                         _take_fds(fds, request), emit)}
            if op not in OPS:
                raise ProtocolError(f"unknown control request {str(request)[:80]!r}")
            return {"ok": True, "result": self.call(request["op"], request.get("args") or {})}
        except ThinstoreError as exc:
            return {"ok": False, "error": error_dict(exc)}
        except OSError as exc:          # e.g. EFBIG growing the data file: keep errno and file
            return {"ok": False, "error": {"type": "OSError", "errno": exc.errno,
                                           "message": exc.strerror or str(exc),
                                           "filename": exc.filename, "exit_code": 1}}
        except (ValueError, TypeError) as exc:
            return {"ok": False, "error": error_dict(ProtocolError(f"bad control request: {exc}"))}
        except Exception as exc:        # a bug: report it, keep serving
            log.exception("control request failed")
            return {"ok": False, "error": error_dict(ThinstoreError(f"internal error: {exc}"))}
        finally:
            for fd in fds:               # whatever the op did not take
                os.close(fd)

    def call(self, op: str, args: dict):
        names, shape = OPS[op]
        if not isinstance(args, dict) or set(args) - set(names):
            raise ProtocolError(f"{op} takes {', '.join(names) or 'no arguments'}")
        handler = getattr(self, "_op_" + op, None)
        result = handler(**args) if handler else getattr(self.pool, op)(**args)
        return to_wire(result, shape)

    def holds(self) -> list:
        """Every frontend's holds on the pool's devices (thinstore/frontends/holds.py); a
        damaged state file holds nothing and is logged."""
        from thinstore.frontends.holds import recorded
        devices = {d.name: d.uuid for d in self.pool.list()}
        found, live = [], set()
        for name, source in list(self.hold_sources.items()):
            answer = source(devices)
            if answer is not None:
                found += answer
                live.add(name)
        more, problems = recorded(self.pool.local_dir, devices, skip=live)
        for problem in problems:
            log.warning("holds: %s", problem)
        return found + more

    def _op_holds(self):
        return [h.to_dict() for h in self.holds()]

    def _op_connections(self):
        if self.sessions is None:
            return {}
        return {info.name: self.sessions.connections(info.name) for info in self.pool.list()}

    def _op_counters(self):
        """The pool's data-path totals (chunks allocated and copied, bytes written)."""
        counters = self.pool.counters
        return dict(counters() if callable(counters) else counters)

    def _op_iostat(self):
        """Per-export I/O counters of the NBD server (thinstore.nbd.stats), the
        pool's data-path counters and its intent log's (Pool.log_counters), all
        cumulative: ``{"uptime_s", "devices", "pool", "log"}``."""
        result = self.sessions.iostat() if self.sessions and hasattr(self.sessions, "iostat") \
            else {"uptime_s": None, "devices": {}}
        counters = self.pool.counters
        result["pool"] = dict(counters() if callable(counters) else counters)
        log_counters = getattr(self.pool, "log_counters", None)
        if log_counters is not None:
            result["log"] = dict(log_counters)
        return result

    def _op_ping(self):
        return {"pid": os.getpid(), "nbd_socket": self.nbd_socket}


class _Lines:
    """Request lines from a control connection, with the descriptors that came along.

    A request carrying descriptors is sent in one sendmsg, so they arrive with its
    bytes; recvmsg (not a buffered reader, which would drop them) collects both.
    """

    def __init__(self, conn: socket.socket):
        self.conn, self.buf, self.fds = conn, b"", []

    def readline(self, limit: int) -> tuple[bytes, list[int]]:
        while b"\n" not in self.buf and len(self.buf) < limit:
            data, fds, _, _ = socket.recv_fds(self.conn, 65536, MAX_FDS)
            self.fds += fds
            if not data:
                break
            self.buf += data
        cut = self.buf.find(b"\n") + 1 or min(len(self.buf), limit)
        line, self.buf = self.buf[:cut], self.buf[cut:]
        fds, self.fds = self.fds, []
        return line, fds


class _Events:
    """Event lines to a control client ahead of its answer, and whether it has gone."""

    def __init__(self, conn: socket.socket):
        self.conn = conn

    def __call__(self, event: dict) -> None:
        self.conn.sendall(json.dumps({"event": event}).encode() + b"\n")

    def gone(self) -> bool:
        """True once the client hung up (^C, killed): nobody waits for the answer.
        (poll first: recv on a socket with a timeout would wait for data.)"""
        try:
            poller = select.poll()            # not select(): descriptors may pass 1023
            poller.register(self.conn, select.POLLIN)
            if not poller.poll(0):
                return False
            return self.conn.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True


def _take_fds(fds: list[int], request: dict) -> list[int]:
    """The descriptors a request declares (``"fds": N``); they are the op's to close."""
    want = request.get("fds", 0)
    if not isinstance(want, int) or want != len(fds):
        raise ProtocolError(f"the request declares {want!r} descriptor(s) but "
                            f"{len(fds)} came with it")
    taken = fds[:]
    fds.clear()
    return taken
