"""The stream format on its own: what a writer produces, what a reader accepts and refuses.

No pool here: these tests build streams with StreamWriter (or by hand, byte by byte as
docs/stream.md describes them) and feed them to the reader.
"""

import io
import os
import struct
import uuid

import lz4.block
import mmh3
import pytest

from thinstore import stream as S
from thinstore.errors import StreamError, StreamTruncated

SNAP = uuid.UUID("11111111-2222-3333-4444-555555555555")
BASE = uuid.UUID("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee")
SIZE = 8 << 20


def header(base=None, size=SIZE, name="vm1@s1"):
    return S.Header(S.VERSION, 0, 65536, size, name, SNAP, base)


def sample_stream(base=None):
    """A stream with every record kind: text-like DATA, random DATA, ZERO, HOLE."""
    out = io.BytesIO()
    w = S.StreamWriter(out, header(base))
    w.data(0, b"hello thinstore\n" * 4096)  # 64 KiB, compresses
    w.data(65536, os.urandom(65536))  # incompressible: stored raw
    w.zero(131072, 65536)
    w.hole(1 << 20, 2 << 20)
    w.finish()
    return out.getvalue()


def read_all(data):
    f = io.BytesIO(data)
    h = S.read_header(f)
    reader = S.RecordReader(f, h)
    return h, [(r, r.data() if r.type == S.DATA else None) for r in reader], reader


def test_round_trip_keeps_header_and_records():
    h, records, reader = read_all(sample_stream(BASE))
    assert (h.name, h.snap_name, h.snap_uuid, h.base_uuid) == ("vm1@s1", "s1", SNAP, BASE)
    assert h.incremental and h.chunk_size == 65536 and h.device_size == SIZE
    kinds = [(r.type, r.offset, r.length) for r, _ in records]
    assert kinds == [(S.DATA, 0, 65536), (S.DATA, 65536, 65536),
                     (S.ZERO, 131072, 65536), (S.HOLE, 1 << 20, 2 << 20)]
    assert records[0][1] == b"hello thinstore\n" * 4096
    assert reader.trailer.n_data == 2 and reader.trailer.n_zero == 1
    assert reader.trailer.n_hole == 1 and reader.trailer.data_bytes == 131072


def test_text_compresses_and_random_is_stored():
    _, records, _ = read_all(sample_stream())
    text, rand = records[0][0], records[1][0]
    assert text.flags & S.DATA_LZ4 and len(text.payload) < 65536 // 10
    assert not rand.flags & S.DATA_LZ4 and len(rand.payload) == 65536


def test_full_stream_has_no_base():
    h, _, _ = read_all(sample_stream())
    assert h.base_uuid is None and not h.incremental and not h.flags & S.FLAG_INCREMENTAL


def test_large_data_is_split_into_bounded_records():
    out = io.BytesIO()
    w = S.StreamWriter(out, header())
    w.data(0, bytes(range(256)) * (3 * S.WRITE_DATA_LEN // 256 + 7))
    w.finish()
    _, records, _ = read_all(out.getvalue())
    assert all(r.length <= S.WRITE_DATA_LEN for r, _ in records)
    assert b"".join(d for _, d in records) == bytes(range(256)) * (3 * S.WRITE_DATA_LEN // 256 + 7)


def test_header_bytes_match_the_documented_layout():
    """docs/stream.md: offsets 0..63 fixed, then the name, then mmh3 x64 128 of both."""
    data = sample_stream(BASE)
    assert data[0:8] == b"THINSTRM"
    assert struct.unpack_from("<HHIQ", data, 8) == (1, S.FLAG_INCREMENTAL, 65536, SIZE)
    assert data[24:40] == SNAP.bytes and data[40:56] == BASE.bytes
    assert struct.unpack_from("<H", data, 56)[0] == 6 and data[58:64] == bytes(6)
    assert data[64:70] == b"vm1@s1"
    assert data[70:86] == mmh3.mmh3_x64_128_digest(data[:70], 0)


def test_record_bytes_match_the_documented_layout():
    data = sample_stream()
    pos = 86  # first record: header was 64 + 6 + 16 bytes
    rtype, flags, rsvd, plen, seq, off, length = struct.unpack_from("<BBHIQQQ", data, pos)
    assert (rtype, flags, rsvd, seq, off, length) == (ord("D"), 1, 0, 0, 0, 65536)
    payload = data[pos + 48:pos + 48 + plen]
    assert data[pos + 32:pos + 48] == mmh3.mmh3_x64_128_digest(data[pos:pos + 32] + payload, 0)
    assert lz4.block.decompress(payload, uncompressed_size=65536) == b"hello thinstore\n" * 4096


def test_trailer_holds_counts_and_the_chained_stream_checksum():
    data = sample_stream()
    f = io.BytesIO(data)
    state = S.read_header(f).checksum
    for r in S.RecordReader(f, header()._replace(checksum=state)):
        state = mmh3.mmh3_x64_128_digest(state + r.checksum, 0)
    t = S.TRAILER_BODY.unpack(data[-S.TRAILER_BODY.size:])
    assert t == (2, 1, 1, 131072, t[4], state)
    assert data[-S.TRAILER_BODY.size - 48] == ord("T")


@pytest.mark.parametrize("cut", [0, 3, 20, 86, 90, 86 + 48 + 10, -10, -1])
def test_truncated_stream_is_refused_as_truncated(cut):
    data = sample_stream()
    with pytest.raises(StreamTruncated, match="truncated|empty stream"):
        read_all(data[:cut])


def test_every_flipped_byte_is_refused():
    """A bit flipped anywhere in the stream is caught; never silently accepted."""
    data = sample_stream()
    for pos in range(0, len(data), 97):
        bad = bytearray(data)
        bad[pos] ^= 0x10
        with pytest.raises(StreamError):
            read_all(bytes(bad))


def test_flipped_payload_byte_names_record_and_offset():
    data = bytearray(sample_stream())
    second = 86 + 48 + struct.unpack_from("<I", data, 86 + 4)[0]
    data[second + 48 + 100] ^= 0xFF
    with pytest.raises(StreamError, match=f"checksum mismatch at record 1 at offset {second}"):
        read_all(bytes(data))


def test_records_before_the_bad_one_are_yielded_first():
    """Refusal is at the first bad record: the good ones before it came out verified."""
    data = bytearray(sample_stream())
    data[-5] ^= 1  # inside the trailer
    f = io.BytesIO(bytes(data))
    seen = []
    with pytest.raises(StreamError, match="record 4"):
        for r in S.RecordReader(f, S.read_header(f)):
            seen.append(r.type)
    assert seen == [S.DATA, S.DATA, S.ZERO, S.HOLE]


def test_bad_magic():
    with pytest.raises(StreamError, match="bad magic"):
        read_all(b"QFI\xfb" + bytes(200))


def test_newer_version_is_refused_by_name():
    data = bytearray(sample_stream())
    data[8:10] = struct.pack("<H", S.VERSION + 1)
    with pytest.raises(StreamError, match="version 2 is newer"):
        read_all(bytes(data))


def forge(records, hdr=None):
    """A stream built by hand with correct checksums, for values a writer never emits."""
    head = S.pack_header(hdr or header())
    state = head[-16:]
    out = [head]
    for seq, (rtype, flags, off, length, payload) in enumerate(records):
        data, cs = S.pack_record(rtype, flags, seq, off, length, payload)
        out.append(data)
        state = S.chain(state, cs)
    return b"".join(out), state


def test_declared_payload_larger_than_the_cap_is_refused_before_reading():
    head = S.pack_header(header())
    rec = S.RECORD.pack(S.DATA, 1, 0, 0xFFFFFFFF, 0, 0, 4096, bytes(16))
    with pytest.raises(StreamError, match="declares a 4294967295-byte payload"):
        read_all(head + rec)


def test_data_longer_than_the_cap_is_refused():
    body, _ = forge([(S.DATA, 1, 0, S.MAX_DATA_LEN + 4096, b"\x00" * 64)],
                    header(size=1 << 30))
    with pytest.raises(StreamError, match="at most"):
        read_all(body)


def test_lz4_bomb_is_refused():
    """A payload that would decompress to more than its declared length."""
    payload = lz4.block.compress(bytes(1 << 20), store_size=False)
    body, _ = forge([(S.DATA, 1, 0, 4096, payload)])
    with pytest.raises(StreamError, match="does not decompress"):
        read_all(body)


def test_record_outside_the_device_is_refused():
    body, _ = forge([(S.HOLE, 0, SIZE - 4096, 8192, b"")])
    with pytest.raises(StreamError, match="outside"):
        read_all(body)


def test_reordered_records_are_refused():
    head = S.pack_header(header())
    r0, _ = S.pack_record(S.HOLE, 0, 0, 0, 4096)
    r1, _ = S.pack_record(S.HOLE, 0, 1, 4096, 4096)
    with pytest.raises(StreamError, match="sequence number 1"):
        read_all(head + r1 + r0)


def test_dropped_record_fails_the_stream_checksum():
    """Each record is valid on its own; the chain catches one left out (same seq)."""
    body, _ = forge([(S.HOLE, 0, 0, 4096, b""), (S.HOLE, 0, 4096, 4096, b"")])
    _, other_state = forge([(S.HOLE, 0, 0, 4096, b""), (S.HOLE, 0, 8192, 4096, b"")])
    trailer, _ = S.pack_record(S.TRAILER, 0, 2, 0, 0,
                               S.TRAILER_BODY.pack(0, 0, 2, 0, 0, other_state))
    with pytest.raises(StreamError, match="stream checksum mismatch"):
        read_all(body + trailer)


def test_unknown_record_type():
    body, _ = forge([(0x51, 0, 0, 4096, b"")])
    with pytest.raises(StreamError, match="unknown record type 0x51"):
        read_all(body)


def test_reader_resumes_from_a_saved_position():
    """A reader started at (seq, pos, state) of a record boundary reads the remainder."""
    data = sample_stream()
    f = io.BytesIO(data)
    h = S.read_header(f)
    first = S.RecordReader(f, h)
    it = iter(first)
    next(it), next(it)
    seq, pos, state, counts = first.seq, first.pos, first.state, tuple(first.counts)
    rest = S.RecordReader(io.BytesIO(data[pos:]), h, seq, pos, state, counts)
    assert [r.type for r in rest] == [S.ZERO, S.HOLE]
    assert rest.trailer is not None


class Trickle(io.RawIOBase):
    """A pipe-like reader that returns at most 7 bytes a call."""

    def __init__(self, data):
        self.data, self.pos = data, 0

    def readable(self):
        return True

    def read(self, n=-1):
        n = min(7, len(self.data) - self.pos if n < 0 else n)
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def test_short_reads_are_not_truncation():
    f = Trickle(sample_stream())
    reader = S.RecordReader(f, S.read_header(f))
    assert len(list(reader)) == 4 and reader.trailer is not None
