"""A small synchronous NBD client with the Device interface.

It lets the CLI's data commands (import/export) work on a pool a running
server holds: :meth:`thinstore.control.RemotePool.open_device` returns one of
these, connected to the server's unix socket.  One request at a time, with
structured replies and ``base:allocation`` so holes stay holes.
"""

from __future__ import annotations

import socket

from thinstore import errors
from thinstore.nbd import protocol as P
from thinstore.nbd.wire import recv_exact, recv_into_exact

_BY_ERRNO = {P.EPERM: errors.ReadOnlyDevice, P.ENOSPC: errors.PoolFull,
             P.EINVAL: errors.OutOfRange}


class NBDDevice:
    """Device-like handle on one export: pread/readinto/pwrite/discard/write_zeroes/
    flush/extents/close, ``size``, ``read_only``, ``chunk_size``."""

    def __init__(self, path: str, name: str, chunk_size: int = 64 << 10):
        self.name, self.chunk_size = name, chunk_size
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(path)
        self._cookie = 0
        try:
            self._handshake(name)
        except BaseException:
            self._sock.close()
            raise

    # -- handshake -----------------------------------------------------------
    def _handshake(self, name: str) -> None:
        magic, opt, _ = P.GREETING.unpack(recv_exact(self._sock, P.GREETING.size))
        if (magic, opt) != (P.NBDMAGIC, P.IHAVEOPT):
            raise errors.ProtocolError("not an NBD server")
        self._sock.sendall(P.CLIENT_FLAGS.pack(P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES))
        self._option(P.Opt.STRUCTURED_REPLY, b"")
        raw, ctx = name.encode(), P.BASE_ALLOCATION.encode()
        self._option(P.Opt.SET_META_CONTEXT, P.U32.pack(len(raw)) + raw + P.U32.pack(1)
                     + P.U32.pack(len(ctx)) + ctx)
        for kind, data in self._option(P.Opt.GO, P.U32.pack(len(raw)) + raw + P.U16.pack(0)):
            if kind == P.Rep.INFO and P.U16.unpack(data[:2])[0] == P.Info.EXPORT:
                _, self.size, flags = P.INFO_EXPORT.unpack(data)
                self.read_only = bool(flags & P.TF_READ_ONLY)

    def _option(self, option: int, data: bytes) -> list:
        self._sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, option, len(data)) + data)
        replies = []
        while True:
            _, _, kind, n = P.OPTION_REPLY.unpack(recv_exact(self._sock, P.OPTION_REPLY.size))
            payload = bytes(recv_exact(self._sock, n))
            if kind & (1 << 31):
                cls = errors.NoSuchDevice if kind == P.Rep.ERR_UNKNOWN else errors.ProtocolError
                raise cls(payload.decode(errors="replace") or f"option {option} refused")
            replies.append((kind, payload))
            if kind == P.Rep.ACK:
                return replies

    # -- requests ------------------------------------------------------------
    def _request(self, kind: int, offset: int, length: int, flags: int = 0, data=b""):
        self._cookie += 1
        self._sock.sendall(P.encode_request(flags, kind, self._cookie, offset, length))
        if data:
            self._sock.sendall(data)

    def _chunks(self):
        """Yield (type, payload view) for one reply up to DONE; raise on an error chunk."""
        while True:
            magic = P.U32.unpack(recv_exact(self._sock, 4))[0]
            if magic == P.SIMPLE_REPLY_MAGIC:
                error = P.U32.unpack(recv_exact(self._sock, 12)[:4])[0]
                _raise_for(error, "")
                return
            head = recv_exact(self._sock, P.STRUCTURED_HEADER.size - 4)
            flags, kind, _, n = P.STRUCTURED_HEADER.unpack(bytes(4) + head)[1:]
            if kind & (1 << 15):
                payload = recv_exact(self._sock, n)
                error, mlen = P.U32.unpack(payload[:4])[0], P.U16.unpack(payload[4:6])[0]
                _raise_for(error or P.EIO, bytes(payload[6:6 + mlen]).decode(errors="replace"))
            yield kind, n
            if flags & P.REPLY_FLAG_DONE:
                return

    def _simple(self, kind: int, offset: int, length: int, flags: int = 0, data=b"") -> None:
        self._request(kind, offset, length, flags, data)
        for _, n in self._chunks():
            recv_exact(self._sock, n)

    def readinto(self, buf, offset: int) -> None:
        view = memoryview(buf).cast("B")
        for pos in range(0, len(view), P.MAX_PAYLOAD):
            self._read_piece(view[pos:pos + P.MAX_PAYLOAD], offset + pos)

    def _read_piece(self, view: memoryview, offset: int) -> None:
        self._request(P.Cmd.READ, offset, len(view))
        for kind, n in self._chunks():
            if kind == P.REPLY_TYPE_OFFSET_DATA:
                at = P.U64.unpack(recv_exact(self._sock, 8))[0] - offset
                recv_into_exact(self._sock, view[at:at + n - 8])
            elif kind == P.REPLY_TYPE_OFFSET_HOLE:
                at, size = P.HOLE_PAYLOAD.unpack(recv_exact(self._sock, n))
                view[at - offset:at - offset + size] = bytes(size)
            else:
                recv_exact(self._sock, n)

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def pwrite(self, data, offset: int, fua: bool = False) -> None:
        view = memoryview(data).cast("B")
        for pos in range(0, len(view), P.MAX_PAYLOAD):
            piece = view[pos:pos + P.MAX_PAYLOAD]
            self._simple(P.Cmd.WRITE, offset + pos, len(piece),
                         P.CMD_FLAG_FUA if fua else 0, piece)

    def discard(self, offset: int, length: int) -> None:
        for pos, n in _pieces(offset, length):
            self._simple(P.Cmd.TRIM, pos, n)

    def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        for pos, n in _pieces(offset, length):
            self._simple(P.Cmd.WRITE_ZEROES, pos, n, P.CMD_FLAG_NO_HOLE if no_hole else 0)

    def flush(self) -> None:
        self._simple(P.Cmd.FLUSH, 0, 0)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        out: list[tuple[int, int, bool]] = []
        end = offset + length
        while offset < end:
            offset = self._block_status(offset, min(end - offset, 1 << 30), out)
        return out

    def _block_status(self, offset: int, length: int, out: list) -> int:
        """One BLOCK_STATUS request; appends merged extents, returns where they end."""
        self._request(P.Cmd.BLOCK_STATUS, offset, length)
        start, end = offset, offset + length
        for kind, n in self._chunks():
            payload = recv_exact(self._sock, n)
            if kind != P.REPLY_TYPE_BLOCK_STATUS:
                continue
            for i in range(4, n, 8):
                size, state = P.DESCRIPTOR.unpack(payload[i:i + 8])
                size = min(size, end - start)
                if size <= 0:
                    break
                mapped = not state & P.STATE_HOLE
                if out and out[-1][2] == mapped and out[-1][0] + out[-1][1] == start:
                    out[-1] = (out[-1][0], out[-1][1] + size, mapped)
                else:
                    out.append((start, size, mapped))
                start += size
        if start == offset:
            raise errors.ProtocolError("BLOCK_STATUS made no progress")
        return start

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            try:
                self._request(P.Cmd.DISC, 0, 0)
            except OSError:
                pass
            self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pieces(offset: int, length: int, step: int = 1 << 30):
    for pos in range(offset, offset + length, step):
        yield pos, min(step, offset + length - pos)


def _raise_for(error: int, message: str) -> None:
    if error:
        raise _BY_ERRNO.get(error, errors.ThinstoreError)(message or f"NBD error {error}")
