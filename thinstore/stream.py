"""The send/receive stream: bytes in, bytes out, no pool.

A stream carries one snapshot (full) or the change from a base snapshot to it
(incremental).  docs/stream.md describes every byte; in short::

    HEADER   64 fixed bytes, the snapshot name, a 16-byte header checksum
    RECORD*  48-byte record header + payload (DATA only), seq 0, 1, 2, ...
    TRAILER  a record of type 'T' whose payload holds the counts and the stream checksum

All integers are little-endian.  Checksums are MurmurHash3 x64 128-bit (seed 0),
stored as the 16 bytes mmh3 returns.  Every record's checksum covers its header
(checksum field excluded) and its payload; the *stream checksum* is a chain
``S = mmh3(S || record_checksum)`` that starts from the header checksum, so it
covers every byte of the stream and its running state is only 16 bytes, which is
what lets a receive resume from a remainder of the stream.

What must hold for a reader (and why):
- It refuses at the first bad record (StreamError naming the record and its byte
  offset) before handing that record to anyone, so a receiver never applies bytes
  it has not verified.
- It never allocates a length it read from the stream before checking it against
  a fixed cap (MAX_DATA_LEN), so a corrupt or hostile length cannot exhaust memory.
- It reads the version right after the magic, so a newer stream is refused as
  "newer version" and not as a confusing checksum error.
"""

from __future__ import annotations

import struct
import uuid as _uuid
from typing import BinaryIO, Iterator, NamedTuple

import lz4.block
import mmh3

from thinstore.errors import StreamError, StreamTruncated

MAGIC = b"THINSTRM"
VERSION = 1
FLAG_INCREMENTAL = 0x1
KNOWN_FLAGS = FLAG_INCREMENTAL

DATA = 0x44  # 'D': bytes, lz4-compressed or stored
ZERO = 0x5A  # 'Z': reads as zeros (sender had it allocated)
HOLE = 0x48  # 'H': unmapped on the sender
TRAILER = 0x54  # 'T': end of stream
RECORD_NAMES = {DATA: "DATA", ZERO: "ZERO", HOLE: "HOLE", TRAILER: "TRAILER"}

DATA_LZ4 = 0x1  # record flag of DATA: the payload is one lz4 block

MAX_NAME_LEN = 255
MAX_DATA_LEN = 16 << 20  # largest raw length of one DATA record a reader accepts
WRITE_DATA_LEN = 1 << 20  # what our writer puts in one DATA record
CHECKSUM_SEED = 0
CHECKSUM_LEN = 16

HEADER = struct.Struct("<8sHHIQ16s16sH6x")  # magic .. name_len, 64 bytes
RECORD = struct.Struct("<BBHIQQQ16s")  # type flags rsvd payload_len seq offset length checksum
TRAILER_BODY = struct.Struct("<QQQQQ16s")  # n_data n_zero n_hole data_bytes payload_bytes stream_checksum
_RECORD_SIGNED = RECORD.size - CHECKSUM_LEN  # record header bytes the checksum covers
_ZERO_UUID = bytes(16)


def lz4_bound(n: int) -> int:
    """Worst-case size of an lz4 block of n raw bytes (LZ4_COMPRESSBOUND)."""
    return n + n // 255 + 16


MAX_PAYLOAD_LEN = lz4_bound(MAX_DATA_LEN)


class Header(NamedTuple):
    """What a stream is: the snapshot it carries and, if incremental, its base."""

    version: int
    flags: int
    chunk_size: int
    device_size: int
    name: str  # the source snapshot, "VOLUME@SNAP"
    snap_uuid: _uuid.UUID
    base_uuid: _uuid.UUID | None  # None for a full stream
    checksum: bytes = b""  # filled in by pack/read: starts the stream checksum chain

    @property
    def incremental(self) -> bool:
        return self.base_uuid is not None

    @property
    def snap_name(self) -> str:
        """The part after '@' of the source name: what the receiver calls the snapshot."""
        return self.name.rpartition("@")[2]


class Record(NamedTuple):
    """One verified record.  ``payload`` is the stored bytes (DATA only)."""

    type: int
    flags: int
    seq: int
    offset: int  # byte offset on the device
    length: int  # bytes of the device the record covers
    payload: bytes
    pos: int  # byte offset of the record in the stream
    end: int  # byte offset just past it
    checksum: bytes

    def data(self) -> bytes:
        """The raw bytes of a DATA record (decompressed, length checked)."""
        return _decode_data(self)


class Trailer(NamedTuple):
    n_data: int
    n_zero: int
    n_hole: int
    data_bytes: int
    payload_bytes: int
    stream_checksum: bytes


def checksum(*parts) -> bytes:
    """mmh3 x64 128-bit digest of the concatenated parts (16 bytes)."""
    h = mmh3.mmh3_x64_128(seed=CHECKSUM_SEED)
    for part in parts:
        h.update(part)
    return h.digest()


def chain(state: bytes, record_checksum: bytes) -> bytes:
    """One step of the stream checksum: fold a record's checksum into the state."""
    return mmh3.mmh3_x64_128_digest(state + record_checksum, CHECKSUM_SEED)


# --- header -------------------------------------------------------------------------


def pack_header(h: Header) -> bytes:
    """The header bytes, its checksum appended (Header.checksum is ignored)."""
    name = h.name.encode("utf-8")
    if not 0 < len(name) <= MAX_NAME_LEN:
        raise StreamError(f"snapshot name must be 1..{MAX_NAME_LEN} bytes: {h.name!r}")
    flags = h.flags | (FLAG_INCREMENTAL if h.incremental else 0)
    base = h.base_uuid.bytes if h.base_uuid else _ZERO_UUID
    fixed = HEADER.pack(MAGIC, h.version, flags, h.chunk_size, h.device_size,
                        h.snap_uuid.bytes, base, len(name))
    return fixed + name + checksum(fixed, name)


def read_header(f: BinaryIO) -> Header:
    """Read and verify a header; the result carries its checksum."""
    magic = read_exact(f, len(MAGIC))
    if len(magic) < len(MAGIC) or magic != MAGIC:
        if len(magic) == 0:
            raise StreamTruncated("empty stream: no header (did the sender fail?)")
        if MAGIC.startswith(magic):
            raise StreamTruncated("truncated stream: it ends inside the header")
        raise StreamError(f"bad magic {magic!r}: not a thinstore stream")
    rest = _need(f, HEADER.size - len(MAGIC), "inside the header")
    fixed = magic + rest
    _, version, flags, chunk_size, size, snap, base, name_len = HEADER.unpack(fixed)
    if version > VERSION:
        raise StreamError(f"stream format version {version} is newer than this thinstore "
                          f"reads (version {VERSION}): upgrade thinstore on the receiver "
                          f"(or the header is corrupt)")
    if not 0 < name_len <= MAX_NAME_LEN:
        raise StreamError(f"corrupt header: name length {name_len}")
    name = _need(f, name_len, "inside the header")
    got = _need(f, CHECKSUM_LEN, "inside the header")
    if got != checksum(fixed, name):
        raise StreamError("header checksum mismatch at offset 0: the stream is corrupt")
    return _check_header(version, flags, chunk_size, size, name, snap, base, got)


def _check_header(version, flags, chunk_size, size, name, snap, base, cs) -> Header:
    """Values a valid writer cannot produce are refused here (checksum was fine)."""
    if version < 1 or flags & ~KNOWN_FLAGS:
        raise StreamError(f"unsupported stream: version {version}, flags {flags:#x}")
    if bool(flags & FLAG_INCREMENTAL) != (base != _ZERO_UUID):
        raise StreamError("corrupt header: incremental flag and base uuid disagree")
    if chunk_size < 512 or chunk_size & (chunk_size - 1):
        raise StreamError(f"corrupt header: chunk size {chunk_size}, device size {size}")
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        raise StreamError("corrupt header: snapshot name is not UTF-8") from None
    base_uuid = _uuid.UUID(bytes=base) if base != _ZERO_UUID else None
    return Header(version, flags, chunk_size, size, text, _uuid.UUID(bytes=snap), base_uuid, cs)


def header_len(h: Header) -> int:
    return HEADER.size + len(h.name.encode("utf-8")) + CHECKSUM_LEN


# --- records ------------------------------------------------------------------------


def pack_record(rtype: int, flags: int, seq: int, offset: int, length: int,
                payload: bytes = b"") -> tuple[bytes, bytes]:
    """(record bytes, record checksum) for one record."""
    head = RECORD.pack(rtype, flags, 0, len(payload), seq, offset, length, b"")
    cs = checksum(head[:_RECORD_SIGNED], payload)
    return head[:_RECORD_SIGNED] + cs + payload, cs


def _decode_data(r: Record) -> bytes:
    if not r.flags & DATA_LZ4:
        return r.payload
    try:
        raw = lz4.block.decompress(r.payload, uncompressed_size=r.length)
    except lz4.block.LZ4BlockError:
        raw = b""
    if len(raw) != r.length:
        raise StreamError(f"record {r.seq} at offset {r.pos}: lz4 payload does not "
                          f"decompress to its {r.length} bytes")
    return raw


def encode_data(raw) -> tuple[int, bytes]:
    """(flags, payload) for raw bytes: lz4 when it saves space, stored otherwise."""
    packed = lz4.block.compress(raw, store_size=False)
    if len(packed) < len(raw):
        return DATA_LZ4, packed
    return 0, bytes(raw)


# --- reading ------------------------------------------------------------------------


def read_exact(f: BinaryIO, n: int) -> bytes:
    """Up to n bytes; fewer only at end of stream (pipes may return short reads)."""
    parts, got = [], 0
    while got < n:
        part = f.read(n - got)
        if not part:
            break
        parts.append(part)
        got += len(part)
    return b"".join(parts)


def _need(f: BinaryIO, n: int, where: str) -> bytes:
    data = read_exact(f, n)
    if len(data) < n:
        raise StreamTruncated(f"truncated stream: it ends {where}")
    return data


class RecordReader:
    """Iterates verified records after a header; checks the trailer at the end.

    ``seq``, ``pos`` and ``state`` give where reading starts: (0, header length,
    header checksum) after a header, or the values a resume token saved, for a
    stream that continues at that record.  After each yielded record the reader's
    ``seq``/``pos``/``state`` describe the point just past it.  When the trailer
    has been verified, ``trailer`` is set and iteration stops (bytes after it are
    not read).
    """

    def __init__(self, f: BinaryIO, header: Header, seq: int = 0, pos: int | None = None,
                 state: bytes | None = None, counts: tuple[int, ...] = (0, 0, 0, 0, 0)):
        self.f, self.header = f, header
        self.seq = seq
        self.pos = header_len(header) if pos is None else pos
        self.state = header.checksum if state is None else state
        self.counts = list(counts)  # n_data n_zero n_hole data_bytes payload_bytes
        self.trailer: Trailer | None = None

    def __iter__(self) -> Iterator[Record]:
        while self.trailer is None:
            r = self._read_one()
            self._advance(r)
            if r.type == TRAILER:
                self.trailer = self._check_trailer(r)
            else:
                yield r

    def _where(self) -> str:
        return f"record {self.seq} at offset {self.pos}"

    def _read_one(self) -> Record:
        head = read_exact(self.f, RECORD.size)
        if len(head) < RECORD.size:
            what = "after" if not head else "inside"
            raise StreamTruncated(f"truncated stream: it ends {what} {self._where()}, "
                              f"before the trailer")
        rtype, flags, _, plen, seq, offset, length, cs = RECORD.unpack(head)
        self._check_sizes(rtype, plen)
        payload = read_exact(self.f, plen)
        if len(payload) < plen:
            raise StreamTruncated(f"truncated stream: it ends inside {self._where()}")
        if checksum(head[:_RECORD_SIGNED], payload) != cs:
            raise StreamError(f"checksum mismatch at {self._where()}: the stream is corrupt")
        r = Record(rtype, flags, seq, offset, length, payload, self.pos,
                   self.pos + RECORD.size + plen, cs)
        self._check_record(r)
        return r

    def _check_sizes(self, rtype: int, plen: int) -> None:
        """Refuse a declared payload length before allocating anything for it."""
        limit = {DATA: MAX_PAYLOAD_LEN, ZERO: 0, HOLE: 0, TRAILER: TRAILER_BODY.size}
        if rtype not in limit:
            raise StreamError(f"unknown record type {rtype:#04x} at {self._where()}: "
                              f"the stream is corrupt")
        if plen > limit[rtype]:
            raise StreamError(f"{self._where()} declares a {plen}-byte payload, more than "
                              f"the {limit[rtype]} a {RECORD_NAMES[rtype]} record may hold")

    def _check_record(self, r: Record) -> None:
        if r.seq != self.seq:
            raise StreamError(f"{self._where()} carries sequence number {r.seq}: records "
                              f"are missing or out of order")
        if r.type == TRAILER:
            return
        if r.length == 0 or r.offset + r.length > self.header.device_size:
            raise StreamError(f"{self._where()} covers [{r.offset}, +{r.length}) outside "
                              f"the {self.header.device_size}-byte device")
        if r.type == DATA:
            self._check_data(r)

    def _check_data(self, r: Record) -> None:
        if r.length > MAX_DATA_LEN or r.flags & ~DATA_LZ4:
            raise StreamError(f"{self._where()}: DATA of {r.length} bytes, flags "
                              f"{r.flags:#x} (at most {MAX_DATA_LEN} bytes, flag lz4)")
        if not r.flags & DATA_LZ4 and len(r.payload) != r.length:
            raise StreamError(f"{self._where()}: stored DATA payload is {len(r.payload)} "
                              f"bytes for a length of {r.length}")

    def _advance(self, r: Record) -> None:
        if r.type != TRAILER:
            self.state = chain(self.state, r.checksum)
            i = {DATA: 0, ZERO: 1, HOLE: 2}[r.type]
            self.counts[i] += 1
            if r.type == DATA:
                self.counts[3] += r.length
                self.counts[4] += len(r.payload)
        self.seq += 1
        self.pos = r.end

    def _check_trailer(self, r: Record) -> Trailer:
        t = Trailer(*TRAILER_BODY.unpack(r.payload))
        if t.stream_checksum != self.state:
            raise StreamError(f"stream checksum mismatch at the trailer (offset {r.pos}): "
                              f"records were lost, added or changed")
        if list(t[:5]) != self.counts:
            raise StreamError(f"trailer counts {tuple(t[:5])} do not match the records "
                              f"read {tuple(self.counts)}")
        return t


# --- writing ------------------------------------------------------------------------


class StreamWriter:
    """Writes a header, then records in order, then the trailer (``finish``).

    Records must not overlap and must lie inside the device; DATA longer than
    WRITE_DATA_LEN is split.  ``bytes_written`` counts every byte sent so far.
    """

    def __init__(self, f: BinaryIO, header: Header):
        self.f = f
        head = pack_header(header)
        self.header = header._replace(checksum=head[-CHECKSUM_LEN:])
        self.state = self.header.checksum
        self.seq = 0
        self.counts = [0, 0, 0, 0, 0]
        self.bytes_written = 0
        self._put(head)

    def _put(self, data: bytes) -> None:
        self.f.write(data)
        self.bytes_written += len(data)

    def _record(self, rtype: int, flags: int, offset: int, length: int, payload=b"") -> None:
        data, cs = pack_record(rtype, flags, self.seq, offset, length, payload)
        self._put(data)
        self.state = chain(self.state, cs)
        self.seq += 1

    def data(self, offset: int, raw) -> None:
        """DATA records for raw bytes at a device offset."""
        view = memoryview(raw)
        for start in range(0, len(view), WRITE_DATA_LEN):
            piece = view[start:start + WRITE_DATA_LEN]
            flags, payload = encode_data(piece)
            self._record(DATA, flags, offset + start, len(piece), payload)
            self.counts[0] += 1
            self.counts[3] += len(piece)
            self.counts[4] += len(payload)

    def zero(self, offset: int, length: int) -> None:
        self._record(ZERO, 0, offset, length)
        self.counts[1] += 1

    def hole(self, offset: int, length: int) -> None:
        self._record(HOLE, 0, offset, length)
        self.counts[2] += 1

    def finish(self) -> Trailer:
        t = Trailer(*self.counts, self.state)
        self._record(TRAILER, 0, 0, 0, TRAILER_BODY.pack(*t))
        self.f.flush()
        return t
