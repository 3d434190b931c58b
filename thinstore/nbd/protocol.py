"""NBD wire formats: constants, struct layouts and pure encode/decode helpers.

Bytes in, bytes out: nothing here touches a socket, so every message can be
checked in isolation.  All integers are big-endian (network order), as the
protocol (doc/proto.md in NetworkBlockDevice/nbd) prescribes.

Each fixed-size message is a module-level :class:`struct.Struct` paired with a
named tuple of the same field order; the decoders below check lengths and
counts against the option length the client declared and raise
:class:`OptionError` carrying the reply code the spec asks for.
"""

from __future__ import annotations

import errno as _errno
import struct
from enum import IntEnum
from typing import NamedTuple

from thinstore.errors import ProtocolError

# -- magics --------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# -- handshake flags (server) and client flags ---------------------------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
CLIENT_FLAG_FIXED_NEWSTYLE = 1 << 0
CLIENT_FLAG_NO_ZEROES = 1 << 1
KNOWN_CLIENT_FLAGS = CLIENT_FLAG_FIXED_NEWSTYLE | CLIENT_FLAG_NO_ZEROES

# -- transmission flags --------------------------------------------------
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_RESIZE = 1 << 9
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11


class Opt(IntEnum):
    """Option codes of the fixed newstyle negotiation."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class Rep(IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR + 1
    ERR_POLICY = _ERR + 2
    ERR_INVALID = _ERR + 3
    ERR_PLATFORM = _ERR + 4
    ERR_TLS_REQD = _ERR + 5
    ERR_UNKNOWN = _ERR + 6
    ERR_SHUTDOWN = _ERR + 7
    ERR_BLOCK_SIZE_REQD = _ERR + 8
    ERR_TOO_BIG = _ERR + 9


class Info(IntEnum):
    """Information types of NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    """Transmission request types."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


# -- command flags -------------------------------------------------------
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

#: Flags each command accepts (FUA is accepted on every command, as the spec
#: requires once NBD_FLAG_SEND_FUA is advertised).
ALLOWED_CMD_FLAGS = {
    Cmd.READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.DISC: CMD_FLAG_FUA,
    Cmd.FLUSH: CMD_FLAG_FUA,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.CACHE: CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
    Cmd.BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

# -- structured reply chunk types and flags --------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = (1 << 15) + 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 2

# -- base:allocation ------------------------------------------------------
BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
DIFF_PREFIX = "thinstore:diff:"       # + snapshot name: changed (1) / unchanged (0)
STATE_CHANGED = 1 << 0
STATE_HOLE = 1 << 0
STATE_ZERO = 1 << 1

# -- the error values a reply may carry ------------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108
_WIRE_ERRNOS = {EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN}
_ERRNO_MAP = {_errno.EDQUOT: ENOSPC, _errno.EFBIG: ENOSPC, _errno.EROFS: EPERM,
              _errno.EACCES: EPERM, _errno.EOPNOTSUPP: ENOTSUP}

# -- limits -----------------------------------------------------------------
MAX_STRING = 4096                 # the spec's bound on names and queries
MAX_PAYLOAD = 64 << 20            # largest READ/WRITE payload we accept (nbdkit's limit)


def wire_errno(value: int | None) -> int:
    """Map a host errno to one of the values the spec allows on the wire.

    Anything unknown becomes EIO, so a client never sees an errno it cannot
    interpret (host errno numbers are not portable).
    """
    value = _ERRNO_MAP.get(value, value)
    return value if value in _WIRE_ERRNOS else EIO


# == handshake messages ====================================================
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
EXPORT_NAME_REPLY = struct.Struct(">QH")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")


class OptionHeader(NamedTuple):
    magic: int
    option: int
    length: int


class OptionError(ProtocolError):
    """A malformed or refused option; ``reply`` is the NBD_REP_ERR_* to send."""

    def __init__(self, reply: Rep, message: str):
        super().__init__(message)
        self.reply = reply


def greeting() -> bytes:
    return GREETING.pack(NBDMAGIC, IHAVEOPT, SERVER_HANDSHAKE_FLAGS)


def option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def export_name_reply(size: int, flags: int, no_zeroes: bool) -> bytes:
    return EXPORT_NAME_REPLY.pack(size, flags) + (b"" if no_zeroes else bytes(124))


def rep_server(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return U32.pack(len(raw)) + raw + description.encode()


def info_export(size: int, flags: int) -> bytes:
    return INFO_EXPORT.pack(Info.EXPORT, size, flags)


def info_string(kind: Info, text: str) -> bytes:
    return U16.pack(kind) + text.encode()[:MAX_STRING]


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, minimum, preferred, maximum)


def rep_meta_context(context_id: int, name: str) -> bytes:
    return U32.pack(context_id) + name.encode()


class _Reader:
    """Sequential decoder over an option payload; short data is ERR_INVALID."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise OptionError(Rep.ERR_INVALID, "option data shorter than its fields")
        self.pos += n
        return self.data[self.pos - n:self.pos]

    def u16(self) -> int:
        return U16.unpack(self.take(2))[0]

    def u32(self) -> int:
        return U32.unpack(self.take(4))[0]

    def string(self, n: int, what: str) -> str:
        if n > MAX_STRING:
            raise OptionError(Rep.ERR_TOO_BIG, f"{what} longer than {MAX_STRING} bytes")
        raw = self.take(n)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            raise OptionError(Rep.ERR_INVALID, f"{what} is not UTF-8") from None
        if "\0" in text:
            raise OptionError(Rep.ERR_INVALID, f"{what} contains NUL")
        return text

    def end(self) -> None:
        if self.pos != len(self.data):
            raise OptionError(Rep.ERR_INVALID, "option data longer than its fields")


def decode_export_name(data: bytes) -> str:
    """The payload of NBD_OPT_EXPORT_NAME: the whole option is the name."""
    r = _Reader(data)
    return r.string(len(data), "export name")


class InfoRequest(NamedTuple):
    name: str
    requests: tuple[int, ...]


def decode_info_request(data: bytes) -> InfoRequest:
    """NBD_OPT_INFO / NBD_OPT_GO: u32 name length, name, u16 count, u16 each.

    The count must account for exactly the remaining bytes; a mismatch in either
    direction is NBD_REP_ERR_INVALID.
    """
    r = _Reader(data)
    name = r.string(r.u32(), "export name")
    count = r.u16()
    if len(data) - r.pos != 2 * count:
        raise OptionError(Rep.ERR_INVALID, "information request count does not match length")
    requests = tuple(r.u16() for _ in range(count))
    r.end()
    return InfoRequest(name, requests)


class MetaContextRequest(NamedTuple):
    name: str
    queries: tuple[str, ...]


def decode_meta_context_request(data: bytes) -> MetaContextRequest:
    """LIST/SET_META_CONTEXT: u32 name length, name, u32 count, (u32 len, query)*."""
    r = _Reader(data)
    name = r.string(r.u32(), "export name")
    count = r.u32()
    if count > (len(data) - r.pos) // 4:
        raise OptionError(Rep.ERR_INVALID, "query count does not match length")
    queries = tuple(r.string(r.u32(), "query") for _ in range(count))
    r.end()
    return MetaContextRequest(name, queries)


#: An export whose volume has more snapshots than this answers a LIST_META_CONTEXT with no
#: query by the namespace ``thinstore:diff:`` alone instead of one record per snapshot,
#: as the NBD spec allows (fewer records, so long as a client that knows the namespace can
#: still select each context by name): 'nbdinfo --list' asks it of every
#: export, so a volume of 3,000 snapshots cost 9 million records and outran the handshake.
LISTED_DIFF_BASES = 64


def match_meta_contexts(queries: tuple[str, ...], listing: bool, bases=(),
                        known=lambda base: False) -> list[str]:
    """The contexts a query list selects, in query order, each once.

    Served: ``base:allocation``, and ``thinstore:diff:BASE`` (ranges that differ from
    snapshot BASE, docs/nbd.md). `bases` are the diff bases listed for this export
    (its volume's snapshots); `known(BASE)` says whether any other name is a base.
    An empty list selects every listed context when listing (the diff contexts as their
    namespace alone past LISTED_DIFF_BASES bases) and none when setting (as the spec
    says); when listing, a namespace alone (``base:``, ``thinstore:``,
    ``thinstore:diff:``) selects every listed context in it.
    """
    every = [BASE_ALLOCATION] + [DIFF_PREFIX + b for b in bases]
    if not queries:
        if listing and len(bases) > LISTED_DIFF_BASES:
            return [BASE_ALLOCATION, DIFF_PREFIX]
        return every if listing else []
    chosen: list[str] = []
    for q in queries:
        if listing and q in ("base:", "thinstore:", DIFF_PREFIX):
            hits = [c for c in every if c.startswith(q)]
        elif q == BASE_ALLOCATION:
            hits = [q]
        elif q.startswith(DIFF_PREFIX) and (q[len(DIFF_PREFIX):] in bases
                                            or known(q[len(DIFF_PREFIX):])):
            hits = [q]
        else:
            hits = []
        chosen += [h for h in hits if h not in chosen]
    return chosen


# == transmission messages ===================================================
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
STRUCTURED_HEADER = struct.Struct(">IHHQI")
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")   # chunk header + data offset
OFFSET_HOLE = struct.Struct(">IHHQIQI")         # chunk header + offset + size
ERROR_CHUNK = struct.Struct(">IHHQIIH")         # chunk header + error + msg len
DESCRIPTOR = struct.Struct(">II")
HOLE_PAYLOAD = struct.Struct(">QI")             # OFFSET_HOLE payload: offset, size


class Request(NamedTuple):
    magic: int
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def decode_request(data: bytes) -> Request:
    return Request._make(REQUEST.unpack(data))


def encode_request(flags: int, kind: int, cookie: int, offset: int, length: int) -> bytes:
    """A request header (the test clients use it; the server only decodes)."""
    return REQUEST.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_none(cookie: int) -> bytes:
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE,
                                  REPLY_TYPE_NONE, cookie, 0)


def chunk_error(cookie: int, error: int, message: str = "", done: bool = True) -> bytes:
    text = message.encode()[:MAX_STRING]
    flags = REPLY_FLAG_DONE if done else 0
    return ERROR_CHUNK.pack(STRUCTURED_REPLY_MAGIC, flags, REPLY_TYPE_ERROR, cookie,
                            6 + len(text), error, len(text)) + text


def pack_offset_data_header(buf, cookie: int, offset: int, length: int, done: bool) -> None:
    """Write an OFFSET_DATA chunk header (28 bytes) at the front of ``buf``."""
    OFFSET_DATA_HEADER.pack_into(buf, 0, STRUCTURED_REPLY_MAGIC,
                                 REPLY_FLAG_DONE if done else 0, REPLY_TYPE_OFFSET_DATA,
                                 cookie, 8 + length, offset)


def chunk_offset_hole(cookie: int, offset: int, size: int, done: bool) -> bytes:
    return OFFSET_HOLE.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                            REPLY_TYPE_OFFSET_HOLE, cookie, 12, offset, size)


def chunk_block_status(cookie: int, context_id: int, descriptors, done: bool = True) -> bytes:
    """A BLOCK_STATUS chunk: context id then (length, flags) descriptors."""
    body = b"".join(DESCRIPTOR.pack(n, f) for n, f in descriptors)
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                                  REPLY_TYPE_BLOCK_STATUS, cookie,
                                  4 + len(body)) + U32.pack(context_id) + body
