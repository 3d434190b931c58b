"""The control socket: pool management while a server holds the pool.

A running ``thinstore serve`` holds the pool's exclusive lock, so the CLI cannot
open the pool itself.  Instead the server listens on ``POOL/control.sock``
(mode 0600; each side checks the other's SO_PEERCRED: root, the pool directory's
owner or its own user, see thinstore/sockets.py) and runs management calls for it; :class:`RemotePool` is the client,
with the same management methods as :class:`thinstore.Pool`.  Both sides share
the pool lock discipline of the core, so a snapshot taken here holds every
write the NBD server acknowledged before it.

Wire format: JSON lines.  A request is ``{"op": NAME, "args": {...}}``; the
answer is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type":
CLASS, "message": TEXT, "errno": N, "exit_code": N}}``.  Errors come back as
the same :mod:`thinstore.errors` class, so the CLI reports them unchanged.

The read-only commands and receive (thinstore/online.py) are ops too: their
request line may carry file descriptors (SCM_RIGHTS: the client's stdout for a
send, its stdin for a receive) and ``"fds": N`` says how many; before the answer
the server may send ``{"event": {...}}`` lines (progress).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import select
import socket
import threading
import time

from thinstore import errors, sockets
from thinstore.errors import DeviceBusy, ProtocolError, ServerGone, ThinstoreError
from thinstore.sockets import short_socket_path  # noqa: F401  (kept importable from here)

log = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
MAX_LINE = 64 << 10
MAX_CLIENTS = 128
MAX_FDS = 4               # descriptors one request may pass (SCM_RIGHTS)
IDLE_TIMEOUT = 60.0       # a control client silent this long is dropped
RELEASE_POLLS = 50        # x 0.1 s: connections of a hold a frontend let go of may end

#: op -> (parameter names, whether the result is a DeviceInfo / list of them)
OPS = {
    "create_volume": (("name", "size"), "info"),
    "snapshot": (("name",), "info"),
    "clone": (("snapshot", "name"), "info"),
    "destroy": (("name", "force"), None),
    "rename": (("old", "new"), "info"),
    "rollback": (("snapshot",), "info"),
    "resize": (("name", "size", "shrink"), "info"),
    "list": ((), "infos"),
    "info": (("name",), "info"),
    "status": ((), None),
    "grow": (("capacity",), None),
    "commit": ((), None),
    "connections": ((), None),
    "ping": ((), None),
    "counters": ((), None),
    "iostat": ((), None),
}


def socket_path(pool: str) -> str:
    """The control socket of the pool at `pool` (a directory or a rados:// URI)."""
    from .storage import runtime_dir
    return os.path.join(runtime_dir(pool), SOCKET_NAME)


def _to_wire(value, shape):
    if value is None or shape is None:
        return _plain(value)
    if shape == "infos":
        return [item.to_dict() for item in value]
    return value.to_dict() if hasattr(value, "to_dict") else _plain(value)


def _plain(value):
    """JSON-safe copy (numpy scalars and tuples become ints and lists)."""
    return json.loads(json.dumps(value, default=_default))


def _default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


class ControlServer:
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
            conn.sendall(json.dumps({"ok": False, "error": _error_dict(error)}).encode() + b"\n")
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
            return {"ok": False, "error": _error_dict(exc)}
        except OSError as exc:          # e.g. EFBIG growing the data file: keep errno and file
            return {"ok": False, "error": {"type": "OSError", "errno": exc.errno,
                                           "message": exc.strerror or str(exc),
                                           "filename": exc.filename, "exit_code": 1}}
        except (ValueError, TypeError) as exc:
            return {"ok": False, "error": _error_dict(ProtocolError(f"bad control request: {exc}"))}
        except Exception as exc:        # a bug: report it, keep serving
            log.exception("control request failed")
            return {"ok": False, "error": _error_dict(ThinstoreError(f"internal error: {exc}"))}
        finally:
            for fd in fds:               # whatever the op did not take
                os.close(fd)

    def call(self, op: str, args: dict):
        names, shape = OPS[op]
        if not isinstance(args, dict) or set(args) - set(names):
            raise ProtocolError(f"{op} takes {', '.join(names) or 'no arguments'}")
        handler = getattr(self, "_op_" + op, None)
        result = handler(**args) if handler else getattr(self.pool, op)(**args)
        return _to_wire(result, shape)

    def _op_destroy(self, name: str, force: bool = False):
        if self.readers.get(name):        # its chunks must not be reused under a reader
            raise DeviceBusy(f"{name!r} is being read by an online send: "
                             "wait for it to finish (even --force waits)")
        busy, reason = self._in_use(name) if not force else (self._connections(name), None)
        if busy and not force:
            raise DeviceBusy(reason or
                             f"{name!r} has {busy} open NBD connection(s): disconnect the "
                             "clients first, or destroy with force=True to drop them")
        if busy:
            self.sessions.disconnect(name)
        self.pool.destroy(name, force=force)
        if not busy:
            return None
        # what the force cut off, for the caller to warn of
        return {"dropped": busy, "users": self._forced_users(name)}

    def _forced_users(self, name: str) -> list[str]:
        """After a forced destroy of busy `name`: the ``busy_reasons`` hooks that take
        ``forced`` let go of their holds of it and say who lost it, in their words."""
        users = []
        for hook in list(self.busy_reasons):
            if "forced" in inspect.signature(hook).parameters:
                answer = hook(name, forced=True)
                if isinstance(answer, str) and answer:
                    users.append(answer)
        return users

    def _op_snapshot(self, name: str):
        """The snapshot inside every hook of ``snapshot_hooks`` (outermost first)."""
        with contextlib.ExitStack() as hooks:
            for hook in list(self.snapshot_hooks):
                hooks.enter_context(hook(name))
            return self.pool.snapshot(name)

    def _op_rollback(self, snapshot: str):
        """Refused while clients use the volume: its content would change under them."""
        volume = snapshot.split("@", 1)[0]
        self.pool.info(snapshot)          # a missing snapshot is "no such device", not busy
        busy, reason = self._in_use(volume)
        if busy:
            raise DeviceBusy(reason or
                             f"{volume!r} has {busy} open NBD connection(s): disconnect the "
                             "clients before rolling it back")
        return self.pool.rollback(snapshot)

    def _op_rename(self, old: str, new: str):
        """Refused while clients use the device, or a snapshot that follows it: what
        attached it (a Docker or containerd mount, a CSI stage, an nbdfuse file) keeps
        using it by its old name, so a mount would outlive its unmount and the renamed
        device could be mounted a second time beside it."""
        info = self.pool.info(old)       # a missing device is "no such device", not busy
        names = [old] + ([] if info.kind == "snapshot" else
                         [d.name for d in self.pool.list() if d.name.startswith(old + "@")])
        for name in names:
            busy, reason = self._in_use(name)
            if busy:
                raise DeviceBusy(reason or f"{name!r} has {busy} open NBD connection(s): "
                                 f"disconnect the clients before renaming {old!r}")
        return self.pool.rename(old, new)

    def _op_resize(self, name: str, size: int, shrink: bool = False):
        """A shrink is refused while clients use the device, as a rollback is: the end
        of what they see would vanish under them (a grow is not: it only adds)."""
        if shrink and size < self.pool.info(name).size:
            busy, reason = self._in_use(name)
            if busy:
                raise DeviceBusy(reason or f"{name!r} has {busy} open NBD connection(s): "
                                 "disconnect the clients before shrinking it")
        return self.pool.resize(name, size, shrink=shrink)

    def _connections(self, name: str) -> int:
        return self.sessions.connections(name) if self.sessions else 0

    def _in_use(self, name: str) -> tuple[int, str | None]:
        """(open NBD connections, a ``busy_reasons`` hook's reason or None).  A hook that
        answers True let go of a hold of its own: its connections get RELEASE_POLLS x 0.1 s
        to end."""
        busy = self._connections(name)
        answers = [hook(name) for hook in list(self.busy_reasons)] if busy else []
        reason = next((a for a in answers if isinstance(a, str) and a), None)
        if busy and not reason and True in answers:
            for _ in range(RELEASE_POLLS):
                time.sleep(0.1)
                busy = self._connections(name)
                if not busy:
                    break
        return busy, reason

    def _op_connections(self):
        if self.sessions is None:
            return {}
        return {info.name: self.sessions.connections(info.name) for info in self.pool.list()}

    def _op_counters(self):
        """The pool's data-path totals (chunks allocated and copied, bytes written)."""
        counters = self.pool.counters
        return dict(counters() if callable(counters) else counters)

    def _op_iostat(self):
        """Per-export I/O counters of the NBD server (thinstore.nbd.stats) and the
        pool's data-path counters, both cumulative: ``{"uptime_s", "devices", "pool"}``."""
        result = self.sessions.iostat() if self.sessions and hasattr(self.sessions, "iostat") \
            else {"uptime_s": None, "devices": {}}
        counters = self.pool.counters
        result["pool"] = dict(counters() if callable(counters) else counters)
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


def _error_dict(exc: ThinstoreError) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), "errno": exc.errno,
            "exit_code": exc.exit_code}


def _error_from_dict(data: dict) -> Exception:
    if data.get("type") == "OSError":
        return OSError(data.get("errno"), data.get("message"), data.get("filename"))
    cls = getattr(errors, str(data.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, ThinstoreError)):
        cls = ThinstoreError
    return cls(data.get("message"))


class RemotePool:
    """A pool held by a running server, managed over its control socket.

    Offers the management methods of :class:`thinstore.Pool` with the same
    results (DeviceInfo objects, the status dict) and the same exceptions.
    """

    def __init__(self, path: str, timeout: float = 60.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        with short_socket_path(socket_path(path)) as short:
            self._sock.connect(short)
        self._check_server()
        self._reader = self._sock.makefile("rb")
        self._lock = threading.Lock()

    def _check_server(self) -> None:
        """Trust the answers only of a server run by root or the pool's owner (SO_PEERCRED):
        in a directory others could write to, anyone could have planted this socket."""
        _pid, uid, _gid = sockets.peer_credentials(self._sock)
        if uid not in sockets.trusted_uids(self.path):
            self._sock.close()
            where = socket_path(self.path)
            raise errors.UntrustedPeer(
                f"{where} is served by {sockets.user_name(uid)}, neither root nor the owner "
                f"of pool {self.path}: not trusting it; remove that socket and make the pool "
                f"directory writable by its owner only (chmod 700 {self.path})")

    @classmethod
    def connect(cls, path: str) -> "RemotePool | None":
        """A RemotePool if a live server answers in ``path``, else None."""
        if not os.path.exists(socket_path(path)):
            return None
        try:
            remote = cls(path, timeout=5.0)
            remote.ping()
        except errors.UntrustedPeer:
            raise                       # a planted or refusing socket: say so, do not fall back
        except (OSError, ThinstoreError):
            return None
        remote._sock.settimeout(None)
        return remote

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, op: str, **args):
        return self.stream(op, **args)

    def stream(self, op: str, fds=(), on_event=None, **args):
        """Run `op` with `args`, passing descriptors `fds` (the server uses them, the
        caller keeps its own); each event line before the answer goes to on_event."""
        message = {"op": op, "args": args}
        if fds:
            message["fds"] = len(fds)
        with self._lock:
            data = json.dumps(message).encode() + b"\n"
            if fds:
                sent = socket.send_fds(self._sock, [data], list(fds))
                self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
            while True:
                line = self._reader.readline()
                if not line:
                    raise ServerGone("the server closed the control connection "
                                     f"during {op!r} (did it stop?)")
                answer = json.loads(line)
                if "event" not in answer:
                    break
                if on_event is not None:
                    on_event(answer["event"])
        if not answer.get("ok"):
            raise _error_from_dict(answer.get("error") or {})
        return answer.get("result")

    # -- the Pool management API ---------------------------------------------------
    def create_volume(self, name, size):
        return _info(self.request("create_volume", name=name, size=int(size)))

    def snapshot(self, name):
        return _info(self.request("snapshot", name=name))

    def clone(self, snapshot, name):
        return _info(self.request("clone", snapshot=snapshot, name=name))

    def destroy(self, name, force=False):
        return self.request("destroy", name=name, force=bool(force))

    def rename(self, old, new):
        return _info(self.request("rename", old=old, new=new))

    def rollback(self, snapshot):
        return _info(self.request("rollback", snapshot=snapshot))

    def resize(self, name, size, shrink=False):
        return _info(self.request("resize", name=name, size=int(size), shrink=bool(shrink)))

    def list(self):
        return [_info(item) for item in self.request("list")]

    def info(self, name):
        return _info(self.request("info", name=name))

    def status(self):
        return self.request("status")

    def grow(self, capacity):
        return self.request("grow", capacity=int(capacity))

    @property
    def capacity(self) -> int:
        return int(self.status()["capacity"])

    @property
    def chunk_size(self) -> int:
        return int(self.status()["chunk_size"])

    def commit(self):
        return self.request("commit")

    def connections(self):
        return self.request("connections")

    def ping(self):
        return self.request("ping")

    def iostat(self):
        return self.request("iostat")

    def counters(self) -> dict:
        """The serving pool's data-path counters (as :attr:`thinstore.Pool.counters`)."""
        return self.request("iostat")["pool"]

    def open_device(self, name):
        """A Device-like NBD connection to the server's export ``name``."""
        from thinstore.nbd.client import NBDDevice
        endpoint = self.ping().get("nbd_socket")
        if not endpoint:
            raise DeviceBusy(f"the server holding {self.path} exports no unix socket: "
                             "stop it to reach device data directly")
        return NBDDevice(endpoint, name, self.chunk_size)


def _info(data):
    """A DeviceInfo again (the core's class), so callers see what Pool returns."""
    if not isinstance(data, dict):
        return data
    from thinstore.device import DeviceInfo
    return DeviceInfo(**data)
