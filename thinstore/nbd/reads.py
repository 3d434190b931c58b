"""READ and BLOCK_STATUS for one connection: the replies that carry data or map state.

A mixin of :class:`thinstore.nbd.transmission.Transmission`, which parses and checks the
request first and gives it ``dev`` (the exported Device), ``structured`` (structured
replies negotiated), ``contexts`` (metadata context id -> name), ``catalog`` and
``_send`` (one whole reply, queued or sent). Chunk layouts: NBD spec (doc/proto.md),
"Structured reply chunk message types" and "Metadata querying".
"""

from __future__ import annotations

from thinstore.nbd import protocol as P
from thinstore.nbd.held import FAST_MAX
from thinstore.nbd.wire import RequestError

_ZEROS = memoryview(bytes(FAST_MAX))
_MAX_DESCRIPTORS = 1024         # BLOCK_STATUS descriptors in one reply, at most


class ReadCommands:
    """READ (simple or structured, with holes) and BLOCK_STATUS."""

    def _read(self, req: P.Request, _payload) -> None:
        if self.structured:
            self._read_structured(req)
        else:
            self._read_simple(req.cookie, req.offset, req.length)

    def _read_simple(self, cookie: int, offset: int, length: int) -> None:
        buf = bytearray(P.SIMPLE_REPLY.size + length)
        view = memoryview(buf)
        if length:
            self.dev.readinto(view[P.SIMPLE_REPLY.size:], offset)
        P.SIMPLE_REPLY.pack_into(buf, 0, P.SIMPLE_REPLY_MAGIC, 0, cookie)
        self._send(view)

    def _read_structured(self, req: P.Request) -> None:
        """Data chunks for mapped runs, OFFSET_HOLE for unmapped ones (one chunk with DF).

        A small read is answered from the data alone: all zeros is a hole (OFFSET_HOLE
        means "reads as zeros"), which spares a map lookup on the hot path.
        """
        if not req.length:
            self._send(P.chunk_none(req.cookie))
            return
        if req.length <= FAST_MAX:
            self._read_small_structured(req.cookie, req.offset, req.length)
            return
        runs = _merge_runs(self.dev.extents(req.offset, req.length))
        if req.flags & P.CMD_FLAG_DF and len(runs) > 1:
            runs = [(req.offset, req.length, True)]
        chunks = [self._chunk(req.cookie, off, n, mapped, i == len(runs) - 1)
                  for i, (off, n, mapped) in enumerate(runs)]
        self._send(*chunks)

    def _read_small_structured(self, cookie: int, offset: int, length: int) -> None:
        head = P.OFFSET_DATA_HEADER.size
        buf = bytearray(head + length)
        view = memoryview(buf)
        self.dev.readinto(view[head:], offset)
        if buf.startswith(_ZEROS[:length], head):
            self._send(P.chunk_offset_hole(cookie, offset, length, True))
            return
        P.pack_offset_data_header(buf, cookie, offset, length, True)
        self._send(view)

    def _chunk(self, cookie: int, offset: int, length: int, mapped: bool, done: bool):
        if not mapped:
            return P.chunk_offset_hole(cookie, offset, length, done)
        head = P.OFFSET_DATA_HEADER.size
        buf = bytearray(head + length)
        view = memoryview(buf)
        self.dev.readinto(view[head:], offset)
        P.pack_offset_data_header(buf, cookie, offset, length, done)
        return view

    def _block_status(self, req: P.Request, _payload) -> None:
        """One BLOCK_STATUS chunk per negotiated context, the last one flagged DONE."""
        if not self.contexts:
            raise RequestError(P.EINVAL, "no metadata context was negotiated")
        if not req.length:
            raise RequestError(P.EINVAL, "BLOCK_STATUS of zero length")
        chunks = [(cid, self._descriptors(name, req)) for cid, name in self.contexts.items()]
        self._send(*[P.chunk_block_status(req.cookie, cid, d, i == len(chunks) - 1)
                     for i, (cid, d) in enumerate(chunks)])

    def _descriptors(self, context: str, req: P.Request) -> list[tuple[int, int]]:
        if context == P.BASE_ALLOCATION:
            runs = [(n, 0 if mapped else P.STATE_HOLE | P.STATE_ZERO)
                    for _, n, mapped in _merge_runs(self.dev.extents(req.offset, req.length))]
        else:
            base = context[len(P.DIFF_PREFIX):]
            runs = [(n, P.STATE_CHANGED if changed else 0) for n, changed in
                    self.catalog.changed_extents(self.dev, base, req.offset, req.length)]
        runs = _merge_flags(runs)
        return runs[:1] if req.flags & P.CMD_FLAG_REQ_ONE else runs[:_MAX_DESCRIPTORS]


def _merge_flags(runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Coalesce neighbouring descriptors with the same flags (a request's length is
    32 bits, so a descriptor's is too)."""
    out: list[list[int]] = []
    for n, flags in runs:
        if out and out[-1][1] == flags:
            out[-1][0] += n
        else:
            out.append([n, flags])
    return [(n, f) for n, f in out]


def _merge_runs(extents) -> list[tuple[int, int, bool]]:
    """Coalesce adjacent extents with the same mapped state."""
    runs: list[list] = []
    for off, n, mapped in extents:
        if n <= 0:
            continue
        if runs and runs[-1][2] == bool(mapped) and runs[-1][0] + runs[-1][1] == off:
            runs[-1][1] += n
        else:
            runs.append([off, n, bool(mapped)])
    return [tuple(r) for r in runs]
