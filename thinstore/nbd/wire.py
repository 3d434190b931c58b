"""Socket helpers shared by the handshake and transmission phases.

They read exactly what the protocol says comes next and never allocate more
than the caller bounded beforehand.
"""

from __future__ import annotations

import socket

_SKIP_CHUNK = 1 << 20


class PeerClosed(ConnectionError):
    """The peer closed the connection in the middle of a message."""


class RequestError(Exception):
    """A request refused with an NBD error value (the connection carries on)."""

    def __init__(self, error: int, message: str):
        super().__init__(message)
        self.error = error


def recv_exact(sock: socket.socket, n: int) -> bytearray:
    """Read exactly ``n`` bytes (the caller has bounded ``n``)."""
    buf = bytearray(n)
    recv_into_exact(sock, memoryview(buf))
    return buf


def recv_into_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` from the socket; PeerClosed if the stream ends first."""
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise PeerClosed(f"peer closed after {got} of {n} bytes")
        got += k


def skip(sock: socket.socket, n: int) -> None:
    """Read and discard ``n`` bytes in bounded pieces."""
    scratch = memoryview(bytearray(min(n, _SKIP_CHUNK)))
    while n > 0:
        k = sock.recv_into(scratch[:min(n, len(scratch))])
        if not k:
            raise PeerClosed("peer closed while its payload was skipped")
        n -= k


def close_quietly(sock: socket.socket) -> None:
    """Shut down and close, ignoring a peer that is already gone."""
    for step in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            step()
        except OSError:
            pass


def hang_up(sock: socket.socket) -> None:
    """Wake a thread blocked on ``sock`` from another thread: shut down, don't close.

    The owning thread closes the socket; closing it here could hand its file
    descriptor number to a new connection while the owner still uses it.  The
    base-class call skips SSLSocket's bookkeeping, which is not thread-safe.
    """
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass
