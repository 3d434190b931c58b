"""Resume state of an interrupted receive: a small token next to the pool.

    POOL/resume/NAME.json   one per volume NAME with a receive in progress

The token names the hidden workspace device and the point just past the last record
applied: record number ``seq``, stream byte offset ``pos``, the stream checksum chain
``state`` there, the running record counts, and the stream header.  With these a
reader can continue from the whole stream (records before ``seq`` are verified and
skipped) or from its remainder (bytes from ``pos`` on), and still verify the trailer.

It is written only after the pool committed the records it claims (replication.py),
and replaced atomically (write, fsync, rename, fsync the directory), so after a
crash it is either the old token or the new one, never a torn one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid as _uuid
from typing import BinaryIO

from . import stream as S
from .errors import StreamError
from .hidden import workspace_name

TOKEN_FORMAT = 1


def hidden_name(name: str) -> str:
    """The hidden workspace of a receive into volume NAME (a name no user name can be)."""
    return workspace_name(name)


@dataclasses.dataclass
class Token:
    name: str
    hidden: str
    header: S.Header
    seq: int
    pos: int
    state: bytes
    counts: list[int]
    force: bool = False  # receive -F: NAME's changes since the base may be discarded
    complete: bool = False  # every record applied and the trailer verified

    @classmethod
    def start(cls, name: str, hidden: str, header: S.Header, force: bool = False) -> "Token":
        return cls(name, hidden, header, 0, S.header_len(header), header.checksum,
                   [0, 0, 0, 0, 0], force)

    def advance(self, reader: S.RecordReader) -> None:
        """Move to the point just past the record the reader last yielded."""
        self.seq, self.pos, self.state = reader.seq, reader.pos, reader.state
        self.counts = list(reader.counts)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["header"] = _header_to_json(self.header)
        d["state"] = self.state.hex()
        d["format"] = TOKEN_FORMAT
        return d

    @classmethod
    def from_json(cls, d: dict) -> "Token":
        if d.get("format") != TOKEN_FORMAT:
            raise StreamError(f"resume token format {d.get('format')} is not understood")
        return cls(d["name"], d["hidden"], _header_from_json(d["header"]), d["seq"],
                   d["pos"], bytes.fromhex(d["state"]), list(d["counts"]), d["force"],
                   d["complete"])


def _header_to_json(h: S.Header) -> dict:
    return {"version": h.version, "flags": h.flags, "chunk_size": h.chunk_size,
            "device_size": h.device_size, "name": h.name, "snap_uuid": h.snap_uuid.hex,
            "base_uuid": h.base_uuid.hex if h.base_uuid else None,
            "checksum": h.checksum.hex()}


def _header_from_json(d: dict) -> S.Header:
    base = _uuid.UUID(hex=d["base_uuid"]) if d["base_uuid"] else None
    return S.Header(d["version"], d["flags"], d["chunk_size"], d["device_size"], d["name"],
                    _uuid.UUID(hex=d["snap_uuid"]), base, bytes.fromhex(d["checksum"]))


def _path(pool, name: str) -> str:
    return os.path.join(pool.local_dir, "resume", name + ".json")


def load(pool, name: str) -> Token | None:
    try:
        with open(_path(pool, name), encoding="utf-8") as f:
            return Token.from_json(json.load(f))
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as e:
        raise StreamError(f"resume token {_path(pool, name)} is damaged ({e}); drop it "
                          f"with 'receive --abort {name}'") from None


def save(pool, token: Token) -> None:
    path = _path(pool, token.name)
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with open(fd, "w", encoding="utf-8") as f:
        json.dump(token.to_json(), f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path))


def remove(pool, name: str) -> None:
    try:
        os.unlink(_path(pool, name))
    except FileNotFoundError:
        return
    _fsync_dir(os.path.dirname(_path(pool, name)))


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Prefixed:
    """A reader that returns `prefix` first, then reads from `f` (after a peek)."""

    def __init__(self, prefix: bytes, f: BinaryIO):
        self.prefix, self.f = prefix, f

    def read(self, n: int = -1) -> bytes:
        if self.prefix:
            n = len(self.prefix) if n < 0 else n
            out, self.prefix = self.prefix[:n], self.prefix[n:]
            return out
        return self.f.read(n)
