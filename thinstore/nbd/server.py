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
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass

from thinstore.nbd.exports import Catalog
from thinstore.nbd.handshake import HardDisconnect, Negotiation
from thinstore.nbd.stats import ExportStats
from thinstore.nbd.transmission import Transmission
from thinstore.nbd.wire import close_quietly, hang_up

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
        self._next_id = 0
        self._stopping = threading.Event()
        self._stats = ExportStats()
        self._started = time.monotonic()

    # -- listening ---------------------------------------------------------------
    def listen_unix(self, path: str) -> str:
        """Bind a unix socket readable and writable by the owner only (0600)."""
        if os.path.exists(path):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self._add_listener(sock)
        return path

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

    # -- one connection ----------------------------------------------------------
    def _serve(self, conn_id: int, sock: socket.socket) -> None:
        try:
            agreement = Negotiation(sock, self.catalog, self.config).run()
            if agreement is None or self._stopping.is_set():
                close_quietly(agreement.sock if agreement else sock)
                if agreement:
                    agreement.device.close()
                return
            session = Transmission(agreement, self.config)
            with self._lock:
                self._sockets[conn_id] = agreement.sock
                self._sessions[conn_id] = session
            session.run()
        except (HardDisconnect, OSError, ssl.SSLError, ValueError) as exc:
            log.info("connection %d closed: %s", conn_id, exc)
        except Exception:
            log.exception("connection %d failed", conn_id)
        finally:
            with self._lock:
                live = self._sockets.pop(conn_id, sock)
                session = self._sessions.pop(conn_id, None)
                if session is not None:     # under the lock: iostat sees it once, not 0 or 2 times
                    self._stats.retire(session.dev.name, session.stats)
            close_quietly(live)

    # -- management ----------------------------------------------------------------
    def connections(self, name: str | None = None) -> int:
        """Connections in transmission (on export ``name`` if given)."""
        with self._lock:
            return sum(1 for s in self._sessions.values() if name is None or s.dev.name == name)

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
