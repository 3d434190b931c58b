"""On-disk records of the ``meta`` file: superblocks, block headers and the root record.

Layout (docs/format.md says what each byte means)::

    meta:  block 0  superblock slot A        block 1  superblock slot B
           block 2… metadata blocks, 4096 bytes each, every one with a 32-byte header

Every record carries a magic, the format version and an mmh3 checksum, so a torn or
misdirected write is caught when the block is read, never acted on. Nothing here does
I/O: records go to and from ``bytes``.
"""

from __future__ import annotations

import struct
import uuid as _uuid
from typing import NamedTuple

import mmh3
import numpy as np

from .errors import CorruptMetadata

VERSION = 2                  # the pool format: superblock and root record (docs/format.md)
OLDEST_VERSION = 1           # the oldest that `thinstore upgrade` reads
BLOCK_VERSION = 1            # the block header's layout (unchanged since version 1)
LOG_VERSION = 1              # intent log records
BLOCK_SIZE = 4096
HEADER_SIZE = 32
PAYLOAD_SIZE = BLOCK_SIZE - HEADER_SIZE          # 4064
FANOUT = PAYLOAD_SIZE // 8                       # 508 u64 map entries per page
SUPERBLOCK_SLOTS = 2

SB_MAGIC = 0x42535354        # b"TSSB" little-endian
BLOCK_MAGIC = 0x424D5354     # b"TSMB"
ROOT_MAGIC = 0x54525354      # b"TSRT"

# block types
BT_MAP = 1        # a map page: 508 u64 data chunk ids
BT_LEAF = 2       # a leaf of a paged array (refcounts, checksums, page locations, directories)
BT_ROOT = 3       # a piece of the root record chain
BT_NODE = 4       # an interior node of a tree: 508 u64 child blocks (format 2)
BT_DEVICES = 5    # a device table leaf: the records of DEVS_PER_LEAF consecutive ids (format 2)

DEVS_PER_LEAF = 12     # 12 x the largest record (331 bytes) + 4 fit a payload (4064)

DEVICE_KINDS = ("volume", "snapshot", "clone")


_MMH3_32 = getattr(mmh3, "mmh3_32_uintdigest", None)      # takes any buffer (mmh3 >= 5)


def checksum(data) -> int:
    """The metadata checksum: mmh3 x86 32-bit, seed 0, unsigned, of a bytes-like."""
    if _MMH3_32 is not None:
        return _MMH3_32(data, 0)
    return mmh3.hash(bytes(data), 0, signed=False)


# ---------------------------------------------------------------- block header
BlockHeader = NamedTuple("BlockHeader", [("magic", int), ("checksum", int), ("type", int),
                                         ("version", int), ("location", int),
                                         ("generation", int)])
_HEADER = struct.Struct("<IIHHIQQ")   # magic, checksum, type, version, reserved, location, generation


def seal_block(block: bytearray, btype: int, location: int, generation: int) -> bytearray:
    """Fill in the header of a 4096-byte block whose payload is already at [32:]."""
    _HEADER.pack_into(block, 0, BLOCK_MAGIC, 0, btype, BLOCK_VERSION, 0, location, generation)
    struct.pack_into("<I", block, 4, checksum(memoryview(block)[8:]))
    return block


def open_block(block: bytes, btype: int, location: int) -> memoryview:
    """Verify a block read from `location` and return its payload."""
    if len(block) != BLOCK_SIZE:
        raise CorruptMetadata(f"metadata block {location}: short read")
    magic, csum, typ, ver, _, loc, _gen = _HEADER.unpack_from(block, 0)
    if magic != BLOCK_MAGIC:
        raise CorruptMetadata(f"metadata block {location}: bad magic {magic:#x}")
    if csum != checksum(memoryview(block)[8:]):
        raise CorruptMetadata(f"metadata block {location}: checksum mismatch")
    if ver > BLOCK_VERSION:
        raise CorruptMetadata(f"metadata block {location}: block version {ver} is newer than "
                              f"{BLOCK_VERSION}")
    if typ != btype or loc != location:
        raise CorruptMetadata(f"metadata block {location}: holds type {typ} of block {loc}, "
                              f"expected type {btype} (misdirected write)")
    return memoryview(block)[HEADER_SIZE:]


# ---------------------------------------------------------------- superblock
class Superblock(NamedTuple):
    generation: int
    chunk_size: int
    capacity_chunks: int      # data chunks, chunk 0 included (reserved, never mapped)
    pool_uuid: bytes
    root_location: int        # first block of the root record chain
    root_length: int          # bytes in the root record
    root_checksum: int
    commit_time_ns: int
    flags: int = 0
    version: int = VERSION    # the pool format it was read with (written: always VERSION)


_SB = struct.Struct("<IIHHIQQ16sQQIIQ")
# magic, checksum, version, flags, chunk_size, generation, capacity_chunks, uuid,
# root_location, root_length, root_checksum, block_size, commit_time_ns


def pack_superblock(sb: Superblock) -> bytes:
    buf = bytearray(BLOCK_SIZE)
    _SB.pack_into(buf, 0, SB_MAGIC, 0, VERSION, sb.flags, sb.chunk_size, sb.generation,
                  sb.capacity_chunks, sb.pool_uuid, sb.root_location, sb.root_length,
                  sb.root_checksum, BLOCK_SIZE, sb.commit_time_ns)
    struct.pack_into("<I", buf, 4, checksum(memoryview(buf)[8:]))
    return bytes(buf)


def unpack_superblock(buf: bytes, slot: int) -> Superblock:
    """Decode a slot; raise CorruptMetadata saying why it cannot be used."""
    if len(buf) < BLOCK_SIZE:
        raise CorruptMetadata(f"superblock slot {slot}: short read")
    (magic, csum, ver, flags, chunk_size, gen, cap, puuid, rloc, rlen, rsum,
     bsize, ctime) = _SB.unpack_from(buf, 0)
    if magic != SB_MAGIC:
        raise CorruptMetadata(f"superblock slot {slot}: bad magic")
    if csum != checksum(memoryview(buf)[8:BLOCK_SIZE]):
        raise CorruptMetadata(f"superblock slot {slot}: checksum mismatch (torn write?)")
    if ver > VERSION:
        raise CorruptMetadata(f"superblock slot {slot}: format version {ver} is newer than "
                              f"this thinstore ({VERSION}); upgrade thinstore")
    if bsize != BLOCK_SIZE or not valid_chunk_size(chunk_size):
        raise CorruptMetadata(f"superblock slot {slot}: impossible geometry")
    if ver < OLDEST_VERSION:
        raise CorruptMetadata(f"superblock slot {slot}: format version {ver} is unknown")
    return Superblock(gen, chunk_size, cap, puuid, rloc, rlen, rsum, ctime, flags, ver)


def valid_chunk_size(n: int) -> bool:
    return 4096 <= n <= 1 << 20 and n & (n - 1) == 0


# ---------------------------------------------------------------- root record
class ArrayRoot(NamedTuple):
    """Format 1: a paged array's length and the block of each leaf (0 = all zero)."""
    length: int
    leaves: np.ndarray   # uint64


class TreeRoot(NamedTuple):
    """Format 2: a paged array's length (entries) and the block at the top of its tree
    (0 = all zero). The tree's depth follows from the length (tree_depth)."""
    length: int
    root: int


def tree_depth(nleaves: int) -> int:
    """Levels of interior nodes above `nleaves` leaves: 0 when one leaf (or none) is
    the whole tree, else the least d with FANOUT**d >= nleaves."""
    depth, span = 0, 1
    while span < nleaves:
        span *= FANOUT
        depth += 1
    return depth


class DeviceRecord(NamedTuple):
    dev_id: int
    uuid: bytes          # 16 bytes, unique for ever (send/receive identity)
    kind: str
    size: int
    created_ns: int
    origin_uuid: bytes   # the snapshot a clone was made from / the volume a snapshot was taken of
    name: str
    directory: "TreeRoot | ArrayRoot"
    flags: int = 0       # bit 0: hidden (an unfinished receive)


class RootRecord(NamedTuple):
    refcounts: "TreeRoot | ArrayRoot"       # u32 per data chunk
    checksums: "TreeRoot | ArrayRoot"       # u32 per data chunk (mmh3 of its bytes), 0 = none
    page_locations: "TreeRoot | ArrayRoot"  # u64 per map page id: its metadata block, 0 = free
    next_dev_id: int
    devices: list             # format 1: the device records; format 2: empty
    low_water_pct: int = 90
    flags: int = 0            # bit 0: data checksums on
    device_table: TreeRoot | None = None   # format 2: leaves of DEVS_PER_LEAF device ids
    device_count: int = 0
    version: int = VERSION


_ROOT_HEAD = struct.Struct("<IHHQII")       # magic, version, flags, next_dev_id, low_water, ndev
_ARRAY_HEAD = struct.Struct("<QI")          # format 1: length, nleaves
_TREE = struct.Struct("<QQ")                # format 2: length, top block
_DEV_HEAD = struct.Struct("<Q16sBBHQQ16s")  # id, uuid, kind, flags, name_len, size, created, origin
_DEVLEAF_HEAD = struct.Struct("<HH")        # records in the leaf, zero


def _unpack_array(buf: memoryview, pos: int) -> tuple[ArrayRoot, int]:
    length, nleaves = _ARRAY_HEAD.unpack_from(buf, pos)
    pos += _ARRAY_HEAD.size
    end = pos + 8 * nleaves
    if end > len(buf):
        raise CorruptMetadata("root record: array runs past its end")
    leaves = np.frombuffer(buf[pos:end], dtype="<u8").astype(np.uint64)
    return ArrayRoot(length, leaves), end


def _unpack_tree(buf: memoryview, pos: int) -> tuple[TreeRoot, int]:
    length, top = _TREE.unpack_from(buf, pos)
    return TreeRoot(length, top), pos + _TREE.size


def pack_root(root: RootRecord) -> bytes:
    """A format-2 root record (format 1 is only read)."""
    out = [_ROOT_HEAD.pack(ROOT_MAGIC, VERSION, root.flags, root.next_dev_id,
                           root.low_water_pct, root.device_count)]
    for tree in (root.refcounts, root.checksums, root.page_locations, root.device_table):
        out.append(_TREE.pack(tree.length, tree.root))
    return b"".join(out)


def pack_device(d: DeviceRecord) -> bytes:
    """One device's record in a device table leaf (format 2; at most 331 bytes)."""
    name = d.name.encode()
    return b"".join([_DEV_HEAD.pack(d.dev_id, d.uuid, DEVICE_KINDS.index(d.kind), d.flags,
                                    len(name), d.size, d.created_ns, d.origin_uuid), name,
                     _TREE.pack(d.directory.length, d.directory.root)])


def _unpack_device(buf: memoryview, pos: int, version: int) -> tuple[DeviceRecord, int]:
    dev_id, duuid, kind, dflags, nlen, size, created, origin = _DEV_HEAD.unpack_from(buf, pos)
    pos += _DEV_HEAD.size
    if pos + nlen > len(buf):
        raise CorruptMetadata("device record: name runs past its end")
    name = bytes(buf[pos:pos + nlen]).decode()
    pos += nlen
    directory, pos = (_unpack_array if version == 1 else _unpack_tree)(buf, pos)
    return DeviceRecord(dev_id, duuid, DEVICE_KINDS[kind], size, created, origin, name,
                        directory, dflags), pos


def unpack_root(data: bytes) -> RootRecord:
    """A root record of format 1 (device records inline, flat array roots) or 2."""
    buf = memoryview(data)
    try:
        magic, ver, flags, next_id, low_water, ndev = _ROOT_HEAD.unpack_from(buf, 0)
        if magic != ROOT_MAGIC:
            raise CorruptMetadata("root record: bad magic")
        if ver > VERSION or ver < OLDEST_VERSION:
            raise CorruptMetadata(f"root record: format version {ver} is not one of "
                                  f"{OLDEST_VERSION}..{VERSION}")
        pos = _ROOT_HEAD.size
        if ver == 1:
            arrays = []
            for _ in range(3):
                arr, pos = _unpack_array(buf, pos)
                arrays.append(arr)
            devices = []
            for _ in range(ndev):
                rec, pos = _unpack_device(buf, pos, 1)
                devices.append(rec)
            return RootRecord(arrays[0], arrays[1], arrays[2], next_id, devices, low_water,
                              flags, None, ndev, 1)
        trees = []
        for _ in range(4):
            tree, pos = _unpack_tree(buf, pos)
            trees.append(tree)
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise CorruptMetadata(f"root record: malformed ({e})") from None
    return RootRecord(trees[0], trees[1], trees[2], next_id, [], low_water, flags, trees[3],
                      ndev, ver)


def pack_device_leaf(records: list) -> bytes:
    """A device table leaf's payload: a count, then the packed records (pack_device's
    bytes, in id order)."""
    body = b"".join(records)
    if _DEVLEAF_HEAD.size + len(body) > PAYLOAD_SIZE:
        raise ValueError("device records do not fit a leaf")
    return _DEVLEAF_HEAD.pack(len(records), 0) + body


def unpack_device_leaf(payload: memoryview) -> list:
    """The DeviceRecords of a device table leaf."""
    try:
        count, _ = _DEVLEAF_HEAD.unpack_from(payload, 0)
        if count > DEVS_PER_LEAF:
            raise CorruptMetadata(f"device table leaf holds {count} records")
        pos, out = _DEVLEAF_HEAD.size, []
        for _ in range(count):
            rec, pos = _unpack_device(payload, pos, VERSION)
            out.append(rec)
    except (struct.error, IndexError, UnicodeDecodeError) as e:
        raise CorruptMetadata(f"device table leaf: malformed ({e})") from None
    return out


# root chain blocks: payload = u64 next block, u32 bytes used, u32 reserved, data
_CHAIN = struct.Struct("<QII")
CHAIN_DATA = PAYLOAD_SIZE - _CHAIN.size


def pack_chain_payload(next_block: int, data: bytes) -> bytes:
    return _CHAIN.pack(next_block, len(data), 0) + data


def unpack_chain_payload(payload: memoryview) -> tuple[int, bytes]:
    nxt, used, _ = _CHAIN.unpack_from(payload, 0)
    if used > CHAIN_DATA:
        raise CorruptMetadata("root chain block: length out of range")
    return nxt, bytes(payload[_CHAIN.size:_CHAIN.size + used])


def new_uuid() -> bytes:
    return _uuid.uuid4().bytes


# ---------------------------------------------------------------- intent log records
# The intent log (``POOL/log``, thinstore/synclog.py) holds what FLUSH and FUA made
# durable since the last commit. One record per flush:
#   header (LOG_HEADER), n_entries x LOG_ENTRY, the bytes of each DATA entry in order,
#   zeros up to a multiple of LOG_ALIGN.
# The checksum covers everything from byte 8 to the record's end. A record applies only
# to the tree it was written on top of (generation, commit time and pool uuid of the
# committed superblock) and only as the next in sequence, so records of an earlier
# epoch, torn records and stale bytes past the tail all end the replay.
LOG_MAGIC = 0x474C5354       # b"TSLG"
LOG_ALIGN = 512              # records start on a sector boundary
LOG_DATA, LOG_ZERO = 1, 2    # entry kinds: bytes follow / the range reads as zeros

LOG_HEADER = struct.Struct("<IIHHIQQQQ16s")
# magic, checksum, version, flags, n_entries, record length, sequence, base generation,
# base commit time (ns), pool uuid                                             (64 bytes)
LOG_ENTRY = struct.Struct("<QQQII")   # device id, offset, length, kind, reserved (32 bytes)


class LogBase(NamedTuple):
    """The committed tree a log record builds on."""
    generation: int
    commit_time_ns: int
    pool_uuid: bytes


class LogEntry(NamedTuple):
    dev_id: int
    offset: int
    length: int
    kind: int                 # LOG_DATA or LOG_ZERO
    data: bytes | None        # LOG_DATA: `length` bytes


def log_base(sb: Superblock) -> LogBase:
    return LogBase(sb.generation, sb.commit_time_ns, sb.pool_uuid)


def pack_log_record(base: LogBase, sequence: int, entries: list) -> bytes:
    """One record: `entries` are LogEntry; returns bytes padded to LOG_ALIGN."""
    data = [e.data for e in entries if e.kind == LOG_DATA]
    head = log_record_head(len(entries))
    out = bytearray(log_record_size(head + sum(len(b) for b in data)))
    pos = head
    for b in data:
        out[pos:pos + len(b)] = b
        pos += len(b)
    return bytes(finish_log_record(out, pos, base, sequence, entries))


def log_record_head(n_entries: int) -> int:
    """Where the data of a record of n_entries entries starts."""
    return LOG_HEADER.size + n_entries * LOG_ENTRY.size


def log_record_size(end: int) -> int:
    """A record's length when its last byte of data ends at `end`."""
    return -(-end // LOG_ALIGN) * LOG_ALIGN


def finish_log_record(out: bytearray, end: int, base: LogBase, sequence: int,
                      entries) -> memoryview:
    """A record built in place: `out` holds the data of the DATA entries, in order, from
    log_record_head(len(entries)) to `end`; `entries` are (dev_id, offset, length,
    kind, ...) tuples. Writes the header, the entry table, zeros up to LOG_ALIGN and
    the checksum; returns the record (a view of `out`, which may be longer)."""
    total = log_record_size(end)
    out[end:total] = bytes(total - end)
    LOG_HEADER.pack_into(out, 0, LOG_MAGIC, 0, LOG_VERSION, 0, len(entries), total, sequence,
                         base.generation, base.commit_time_ns, base.pool_uuid)
    for i, e in enumerate(entries):
        LOG_ENTRY.pack_into(out, LOG_HEADER.size + i * LOG_ENTRY.size,
                            e[0], e[1], e[2], e[3], 0)
    view = memoryview(out)[:total]
    struct.pack_into("<I", out, 4, checksum(view[8:]))
    return view


def log_record_length(header: bytes, base: LogBase, sequence: int) -> int:
    """The length of the record whose first LOG_HEADER.size bytes are `header`, or 0
    when it cannot be the next record on `base` (wrong magic, version, epoch or
    sequence: the end of the log)."""
    if len(header) < LOG_HEADER.size:
        return 0
    magic, _, ver, _, n, total, seq, gen, ctime, puuid = LOG_HEADER.unpack_from(header, 0)
    if magic != LOG_MAGIC or ver != LOG_VERSION or seq != sequence or \
            LogBase(gen, ctime, puuid) != base:
        return 0
    if total % LOG_ALIGN or total < LOG_HEADER.size + n * LOG_ENTRY.size:
        return 0
    return total


def unpack_log_record(record: bytes) -> list | None:
    """The entries of a whole record, or None when its checksum or layout is wrong."""
    buf = memoryview(record)
    _, csum, _, _, n, total, *_ = LOG_HEADER.unpack_from(buf, 0)
    if total != len(buf) or csum != checksum(buf[8:]):
        return None
    pos, entries = LOG_HEADER.size, []
    data_pos = pos + n * LOG_ENTRY.size
    for i in range(n):
        dev_id, off, ln, kind, _ = LOG_ENTRY.unpack_from(buf, pos + i * LOG_ENTRY.size)
        if kind == LOG_DATA:
            if data_pos + ln > total:
                return None
            entries.append(LogEntry(dev_id, off, ln, kind, bytes(buf[data_pos:data_pos + ln])))
            data_pos += ln
        elif kind == LOG_ZERO:
            entries.append(LogEntry(dev_id, off, ln, kind, None))
        else:
            return None
    return entries
