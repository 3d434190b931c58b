"""The NBD server: listeners, connection lifecycle, limits and shutdown.

Each accepted connection gets one thread that runs the handshake
(:mod:`thinstore.nbd.handshake`) and then the transmission phase
(:mod:`thinstore.nbd.transmission`).  A bad client costs only its own thread:
every failure inside a connection ends that connection and nothing else.

The server holds the pool open for its whole life; devices are opened per
connection, so the pool refuses to destroy a device a client has open unless
forced, and a forced destroy drops that device's clients.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from thinstore import sockets
from thinstore.units import format_size
from thinstore.nbd.exports import Catalog
from thinstore.nbd.handshake import HardDisconnect, Negotiation
from thinstore.nbd.stats import ExportStats
from thinstore.nbd.transmission import Transmission
from thinstore.nbd.wire import PeerClosed, close_quietly, hang_up

log = logging.getLogger(__name__)


@dataclass
class ServerConfig:
    """Tunables and limits; the defaults suit a host serving local VMs."""

    read_only: bool = False
    tls_context: ssl.SSLContext | None = None
    tls_require: bool = False
    handshake_timeout: float = 10.0
    max_options: int = 4096
    max_connections: int = 64
    workers: int = 4
    queue_depth: int = 32
    inflight_bytes: int = 128 << 20
    native_loop: bool = True      # plain READ/WRITE served in C (nbd/burst.py)
    pipeline: bool = True         # large WRITEs: received while the last is written (burst.py)


class NBDServer:
    """Serves every device of ``pool`` as an NBD export.

    ``listen_unix``/``listen_tcp`` bind; ``start`` spawns the accept threads;
    ``shutdown`` stops accepting, ends every connection (in-flight requests
    finish first) and joins the threads.  The pool stays the caller's to close.
    """

    def __init__(self, pool, config: ServerConfig | None = None):
        self.pool = pool
        self.config = config or ServerConfig()
        self.catalog = Catalog(pool, self.config.read_only)
        self._listeners: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._sockets: dict[int, socket.socket] = {}
        self._sessions: dict[int, Transmission] = {}
        self._pids: dict[int, int | None] = {}     # conn id -> the client's pid (unix socket)
        self._next_id = 0
        self._stopping = threading.Event()
        self.unix_sockets: dict[str, tuple[int, int]] = {}
        self._stats = ExportStats()
        self._started = time.monotonic()

    # -- listening ---------------------------------------------------------------
    def listen_unix(self, path: str, owned: bool = False) -> str:
        """Bind a unix socket readable and writable by the owner only (0600).

        Replaces only a stale socket: a file at ``path``, or a socket where another server
        answers, raises SocketInUse (thinstore/sockets.py).  :meth:`release_unix` removes
        the socket later only if it is still this one.  `owned`: the pool's own default
        socket, bound after taking the pool's lock, where an answering server is a holder
        that lost the pool and is replaced.
        """
        sock, identity = sockets.bind_private(path, "NBD socket", owned)
        self.unix_sockets[path] = identity
        self._add_listener(sock)
        return path

    def release_unix(self) -> None:
        """Remove the unix sockets this server bound (those still its own)."""
        for path, identity in self.unix_sockets.items():
            sockets.release(path, identity)

    def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        """Bind TCP; returns the bound (host, port) (port 0 picks a free one)."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self._add_listener(sock)
        return sock.getsockname()[:2]

    def _add_listener(self, sock: socket.socket) -> None:
        sock.listen(64)
        sock.settimeout(0.2)      # so the accept loop notices shutdown
        self._listeners.append(sock)

    def start(self) -> None:
        for sock in self._listeners:
            self._spawn(self._accept_loop, sock, name="nbd-accept")

    def _spawn(self, target, *args, name: str) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        return thread

    def _accept_loop(self, listener: socket.socket) -> None:
        try:
            self._accept_until_stopped(listener)
        finally:
            close_quietly(listener)

    def _accept_until_stopped(self, listener: socket.socket) -> None:
        while not self._stopping.is_set():
            try:
                sock, _ = listener.accept()
            except socket.timeout:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accept failed")
                continue
            self._admit(sock)

    def _admit(self, sock: socket.socket) -> None:
        if self._refused(sock):
            return
        sock.settimeout(None)
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if len(self._sockets) >= self.config.max_connections:
                log.warning("connection limit %d reached: refusing a client",
                            self.config.max_connections)
                close_quietly(sock)
                return
            conn_id = self._next_id
            self._next_id += 1
            self._sockets[conn_id] = sock
        self._spawn(self._serve, conn_id, sock, name=f"nbd-conn-{conn_id}")

    def _refused(self, sock: socket.socket) -> bool:
        """Close a unix-socket client that is not root, the pool's owner or our own user
        (SO_PEERCRED, as the control socket checks; thinstore/sockets.py)."""
        try:
            uid = sockets.untrusted_peer(sock, self.pool.path)
            if uid is None:
                return False
            log.warning("NBD socket: refused a client running as %s", sockets.user_name(uid))
        except OSError:             # gone before we could ask who it was
            pass
        close_quietly(sock)
        return True

    # -- one connection ----------------------------------------------------------
    def _serve(self, conn_id: int, sock: socket.socket) -> None:
        """One connection; with ``serve -v`` (INFO) one line when it opens an export and
        one when it closes: peer, export, duration and bytes read and written."""
        peer, started, session, why = _peer(sock), time.monotonic(), None, "no export chosen"
        pid = _peer_pid(sock)
        negotiation = Negotiation(sock, self.catalog, self.config)
        try:
            agreement = negotiation.run()
            if agreement is None or self._stopping.is_set():
                close_quietly(agreement.sock if agreement else sock)
                if agreement:
                    agreement.device.close()
                return
            session = Transmission(agreement, self.config)
            with self._lock:
                self._sockets[conn_id] = agreement.sock
                self._sessions[conn_id] = session
                self._pids[conn_id] = pid
            log.info("connection %d from %s: opened %r%s", conn_id, peer, session.dev.name,
                     " (read-only)" if session.read_only else "")
            session.run()
        except (HardDisconnect, OSError, ssl.SSLError, ValueError) as exc:
            why = _why(exc, negotiation if session is None else None)
        except Exception:
            log.exception("connection %d failed", conn_id)
        finally:
            with self._lock:
                live = self._sockets.pop(conn_id, sock)
                session = self._sessions.pop(conn_id, None)
                self._pids.pop(conn_id, None)
                if session is not None:     # under the lock: iostat sees it once, not 0 or 2 times
                    self._stats.retire(session.dev.name, session.stats)
            close_quietly(live)
            _log_close(conn_id, peer, started, session, why)

    # -- management ----------------------------------------------------------------
    def connections(self, name: str | None = None, pid: int | None = None) -> int:
        """Connections in transmission (on export ``name`` if given; of the client process
        ``pid`` if given: the process at the unix socket's other end when it connected,
        SO_PEERCRED; a TCP connection has none)."""
        with self._lock:
            return sum(1 for conn_id, s in self._sessions.items()
                       if (name is None or s.dev.name == name)
                       and (pid is None or self._pids.get(conn_id) == pid))

    def iostat(self) -> dict:
        """Cumulative I/O counters per export since the server started (fields in
        :mod:`thinstore.nbd.stats`), each with ``connections`` open now, and
        ``uptime_s``: ``{"uptime_s": float, "devices": {name: {field: int}}}``."""
        with self._lock:
            live = [(s.dev.name, s.stats) for s in self._sessions.values()]
            devices = self._stats.snapshot(live)
        for name, _ in live:
            devices[name]["connections"] = devices[name].get("connections", 0) + 1
        for counts in devices.values():
            counts.setdefault("connections", 0)
        return {"uptime_s": time.monotonic() - self._started, "devices": devices}

    def disconnect(self, name: str) -> int:
        """Drop every client of export ``name`` (after a forced destroy)."""
        with self._lock:
            doomed = [s for s in self._sessions.values() if s.dev.name == name]
        for session in doomed:
            session.abort()
        return len(doomed)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting, end every connection, wait for the threads."""
        self._stopping.set()      # the accept loops poll it and close their listeners
        with self._lock:
            socks = list(self._sockets.values())
            threads = list(self._threads)
        for sock in socks:
            hang_up(sock)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join(timeout)


def _peer_pid(sock: socket.socket) -> int | None:
    """The pid of a unix-socket client (SO_PEERCRED), None on TCP or when it is gone."""
    try:
        return sockets.peer_credentials(sock)[0] if sock.family == socket.AF_UNIX else None
    except OSError:
        return None


def _peer(sock: socket.socket) -> str:
    """Who connected: ``pid N uid N`` on a unix socket (SO_PEERCRED), ``HOST:PORT`` on TCP."""
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _gid = sockets.peer_credentials(sock)
            return f"pid {pid} uid {uid}"
        host, port = sock.getpeername()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except OSError:
        return "an unknown peer"


def _why(exc: BaseException, negotiation) -> str:
    """Why a connection ended, as a reader of 'serve -v' wants it: a client that lists
    the exports and hangs up, or asks for a missing one, is not a broken pipe."""
    hung_up = isinstance(exc, (PeerClosed, BrokenPipeError, ConnectionResetError))
    why = "the client hung up" if hung_up else str(exc)
    if negotiation is not None and negotiation.listed is not None:
        why += f" after listing {negotiation.listed} export(s)"
    if negotiation is not None and negotiation.refused:
        why += f"; last refusal: {negotiation.refused}"
    return why


def _log_close(conn_id: int, peer: str, started: float, session, why: str) -> None:
    took = time.monotonic() - started
    if session is None:
        log.info("connection %d from %s: closed in the handshake after %.1f s (%s)",
                 conn_id, peer, took, why)
        return
    read, written = session.moved
    log.info("connection %d from %s: closed %r after %.1f s, read %s, wrote %s",
             conn_id, peer, session.dev.name, took, format_size(read), format_size(written))
