"""blockrec: an in-memory NBD disk that records every write and flush it completes,
in order -- a userspace stand-in for device-mapper's dm-log-writes.

The power-cut tests (tests/powercut.py) put a file system on it through nbdfuse and
a loop device, run a workload above, and then build crash images from the recording:
what a disk with a volatile write cache may hold after a power cut at any point.

What it serves (NetworkBlockDevice/nbd doc/proto.md; our own code): the fixed
newstyle handshake with NBD_OPT_GO, NBD_OPT_INFO and NBD_OPT_EXPORT_NAME (any export
name is this one disk), NBD_OPT_ABORT; every other option is refused with
NBD_REP_ERR_UNSUP, so clients fall back to simple replies. Transmission: READ, WRITE
(NBD_CMD_FLAG_FUA honoured and recorded), FLUSH, TRIM and WRITE_ZEROES (recorded as
writes of zeros: this disk reads a trimmed range as zeros), DISC. A malformed
request closes that connection; the disk and its other connections carry on.

The recording: one :class:`Rec` per completed WRITE, TRIM, WRITE_ZEROES or FLUSH,
numbered from 0 by one global sequence. Requests are applied one at a time under one
lock (several connections included), so the recording's order is the order in
which the disk completed them, and a FLUSH's record follows every write it covers.
``position`` is the number of records so far: a workload that asks for it right
after a FLUSH or FUA write of its own was acknowledged learns a bound -- the record
that made its write durable is below that position. Ask in-process
(:meth:`BlockRecorder.position`) or over the side socket
(:meth:`BlockRecorder.listen_position`, :func:`ask_position`): any byte sent gets the
position back as 8 bytes, big-endian.
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import NamedTuple

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

OPT_EXPORT_NAME, OPT_ABORT, OPT_INFO, OPT_GO = 1, 2, 6, 7
REP_ACK, REP_INFO = 1, 3
REP_ERR_UNSUP, REP_ERR_INVALID = (1 << 31) + 1, (1 << 31) + 3
INFO_EXPORT = 0
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
CMD_FLAG_FUA = 1
TF = 1 | 4 | 8 | 32 | 64            # HAS_FLAGS, SEND_FLUSH, SEND_FUA, SEND_TRIM, SEND_WRITE_ZEROES
EINVAL, ENOSPC = 22, 28
MAX_REQUEST = 32 << 20

HANDSHAKE = struct.Struct(">QQH")           # NBDMAGIC, IHAVEOPT, handshake flags
OPTION = struct.Struct(">QII")              # IHAVEOPT, option, length
OPT_REPLY = struct.Struct(">QIII")          # magic, option, reply type, length
INFO_EXPORT_S = struct.Struct(">HQH")       # NBD_INFO_EXPORT, size, transmission flags
REQUEST = struct.Struct(">IHHQQI")          # magic, flags, type, handle, offset, length
REPLY = struct.Struct(">IIQ")               # magic, error, handle
POSITION = struct.Struct(">Q")

WRITE, FLUSH = "W", "F"


class Rec(NamedTuple):
    """One completed request: kind WRITE or FLUSH; a write's offset, bytes (zeros for
    TRIM/WRITE_ZEROES) and whether it carried FUA."""
    seq: int
    kind: str
    offset: int = 0
    data: bytes = b""
    fua: bool = False


class BlockRecorder:
    """An in-memory disk of `size` bytes (or the bytes of `image`), served over NBD on
    unix sockets by daemon threads, recording what it completes (module docstring)."""

    def __init__(self, size: int = 0, image: bytes | None = None):
        self.disk = bytearray(image if image is not None else size)
        self.size = len(self.disk)
        self.records: list[Rec] = []
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._closed = False

    # ------------------------------------------------------------ views
    def position(self) -> int:
        """Records completed so far."""
        return len(self.records)

    def mark(self) -> tuple[bytes, int]:
        """(the disk's bytes now, the position now), taken together."""
        with self._lock:
            return bytes(self.disk), len(self.records)

    # ------------------------------------------------------------ sockets
    def listen(self, path: str) -> str:
        """Serve NBD on a unix socket at `path`; returns `path`."""
        self._serve(path, self._connection)
        return path

    def listen_position(self, path: str) -> str:
        """Answer position queries on a unix socket at `path`; returns `path`."""
        self._serve(path, self._position_conn)
        return path

    def _serve(self, path: str, handler) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(8)
        self._socks.append(s)
        threading.Thread(target=self._accept, args=(s, handler), daemon=True).start()

    def _accept(self, s: socket.socket, handler) -> None:
        while not self._closed:
            try:
                conn, _ = s.accept()
            except OSError:
                return
            threading.Thread(target=self._guard, args=(conn, handler), daemon=True).start()

    @staticmethod
    def _guard(conn: socket.socket, handler) -> None:
        try:
            with conn:
                handler(conn)
        except (OSError, EOFError, ValueError):
            pass                    # that connection ends; the disk carries on

    def close(self) -> None:
        self._closed = True
        for s in self._socks:
            s.close()

    def _position_conn(self, conn: socket.socket) -> None:
        while conn.recv(1):
            conn.sendall(POSITION.pack(self.position()))

    # ------------------------------------------------------------ NBD
    def _connection(self, conn: socket.socket) -> None:
        conn.sendall(HANDSHAKE.pack(NBDMAGIC, IHAVEOPT, 1 | 2))    # FIXED_NEWSTYLE|NO_ZEROES
        client = struct.unpack(">I", _recv(conn, 4))[0]
        if self._negotiate(conn, zeroes=not client & 2):
            self._transmit(conn)

    def _negotiate(self, conn: socket.socket, zeroes: bool) -> bool:
        """Options until one starts transmission (True) or the client aborts (False)."""
        while True:
            magic, opt, length = OPTION.unpack(_recv(conn, OPTION.size))
            if magic != IHAVEOPT or length > 4096:
                raise ValueError("bad option")
            _recv(conn, length)     # the export name (any name is this disk), info requests
            if opt == OPT_EXPORT_NAME:
                conn.sendall(struct.pack(">QH", self.size, TF) + bytes(124 if zeroes else 0))
                return True
            if opt == OPT_ABORT:
                conn.sendall(OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, REP_ACK, 0))
                return False
            if opt in (OPT_INFO, OPT_GO):
                info = INFO_EXPORT_S.pack(INFO_EXPORT, self.size, TF)
                conn.sendall(OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, REP_INFO, len(info)) + info
                             + OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, REP_ACK, 0))
                if opt == OPT_GO:
                    return True
                continue
            conn.sendall(OPT_REPLY.pack(OPT_REPLY_MAGIC, opt, REP_ERR_UNSUP, 0))

    def _transmit(self, conn: socket.socket) -> None:
        while True:
            magic, flags, cmd, handle, offset, length = REQUEST.unpack(_recv(conn, REQUEST.size))
            if magic != REQUEST_MAGIC:
                raise ValueError("bad request magic")
            if cmd == CMD_DISC:
                return
            if length > MAX_REQUEST and cmd in (CMD_READ, CMD_WRITE):
                raise ValueError("request too large")
            data = _recv(conn, length) if cmd == CMD_WRITE else None
            err, out = self._apply(cmd, flags, offset, length, data)
            conn.sendall(REPLY.pack(SIMPLE_REPLY_MAGIC, err, handle) + (out if not err else b""))

    def _apply(self, cmd: int, flags: int, offset: int, length: int, data) -> tuple[int, bytes]:
        if cmd != CMD_FLUSH and offset + length > self.size:
            return (ENOSPC if cmd != CMD_READ else EINVAL), b""
        with self._lock:
            if cmd == CMD_READ:
                return 0, bytes(self.disk[offset:offset + length])
            if cmd == CMD_FLUSH:
                self.records.append(Rec(len(self.records), FLUSH))
                return 0, b""
            if cmd in (CMD_TRIM, CMD_WRITE_ZEROES):
                data = bytes(length)
            elif cmd != CMD_WRITE:
                return EINVAL, b""
            self.disk[offset:offset + length] = data
            self.records.append(Rec(len(self.records), WRITE, offset, data,
                                    bool(flags & CMD_FLAG_FUA)))
            return 0, b""


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = conn.recv_into(view[got:])
        if not k:
            raise EOFError("peer closed")
        got += k
    return bytes(buf)


class PositionClient:
    """The workload's side of the position socket: ask() -> records so far."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)

    def ask(self) -> int:
        self.sock.sendall(b"?")
        return POSITION.unpack(_recv(self.sock, POSITION.size))[0]

    def close(self) -> None:
        self.sock.close()


def counts(records: list[Rec]) -> dict:
    """How many writes, FUA writes, flushes a recording holds (for reports)."""
    writes = [r for r in records if r.kind == WRITE]
    return {"records": len(records), "writes": len(writes),
            "fua_writes": sum(r.fua for r in writes),
            "flushes": len(records) - len(writes),
            "bytes_written": sum(len(r.data) for r in writes)}
