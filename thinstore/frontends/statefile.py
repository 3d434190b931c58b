"""The frontends' state files: one small JSON document, checksummed, replaced atomically.

The attach module (``attach.json``), the Docker volume driver (``volumes.json``), the
containerd snapshotter (``snapshots.json``) and the CSI plugin (``csi/state``,
``csi/node``) each keep what the pool does not: which mounts exist, what options a
volume was made with, which containerd key is which device.  They share this module, so
every such file has one layout (docs/statefile.md, byte by byte)::

    line 1   b"<magic> <version> <length> <checksum>\\n"     ASCII, single spaces
             magic     names the file's kind, e.g. "thinstore-attach-state"
             version   decimal; 2 is this layout (1 was each module's own)
             length    decimal count of the body's bytes
             checksum  mmh3 x86 32-bit, seed 0, unsigned, of the body: 8 lowercase hex
    body     ``length`` bytes of UTF-8 JSON (sorted keys), nothing after them

Saving writes ``NAME.tmp`` in the same directory (mode 0600 whatever the umask), fsyncs
it, renames it over ``NAME`` and fsyncs the directory, so a crash leaves the old file
or the new one, never a torn one.  Loading refuses, with an error that names the file
and says what is wrong, a file of another kind, of a newer version, cut short, with
bytes after its body or failing its checksum; such a file is never silently replaced
(it may describe mounts or devices that someone must look at).

Files written before this layout (version 1) are still read: the attach, Docker and
containerd files were one JSON object ``{"magic", "version": 1, "crc32" | "checksum",
KEY: payload}`` and the CSI files were a ``<magic> 1 <checksum>`` line and the body.
The next save writes them in version 2 (docs/statefile.md, "Older files").
"""

from __future__ import annotations

import json
import os
import threading
import zlib

import mmh3

from thinstore.errors import ThinstoreError

VERSION = 2
SUFFIX = ".tmp"


class StateFileError(ThinstoreError):
    """A state file is damaged, cut short, of another kind or of a newer version."""


def checksum(body: bytes) -> str:
    """mmh3 x86 32-bit (seed 0, unsigned) of ``body`` as 8 lowercase hex digits."""
    return f"{mmh3.hash(body, 0, signed=False):08x}"


def encode(magic: str, data) -> bytes:
    """The whole file for ``data`` (any JSON value): header line and body."""
    body = json.dumps(data, sort_keys=True, indent=1).encode() + b"\n"
    return f"{magic} {VERSION} {len(body)} {checksum(body)}\n".encode() + body


def decode(raw: bytes, magic: str, path: str, legacy_key: str | None = None):
    """The data of a file's bytes ``raw``; raises StateFileError naming ``path``.

    ``legacy_key``: the key that held the payload in this kind's version-1 JSON object
    (None: this kind never had one)."""
    if raw[:1] == b"{":
        return _legacy_json(raw, magic, path, legacy_key)
    head, newline, body = raw.partition(b"\n")
    fields = head.decode("ascii", "replace").split(" ")
    if not newline or fields[0] != magic:
        found = fields[0][:40] if newline and fields[0] else "no header line"
        raise StateFileError(f"{path} is not a {magic} file ({found!r})")
    if not fields[1].isdigit():
        raise StateFileError(f"{path}: version {fields[1][:20]!r} is not a number")
    version = int(fields[1])
    if version > VERSION:
        raise StateFileError(f"{path} has version {version}; this thinstore reads up to "
                             f"{VERSION}: upgrade thinstore")
    if version == 1 and len(fields) == 3:          # the CSI files' first layout
        return _checked(body, fields[2], path)
    if version != VERSION or len(fields) != 4 or not fields[2].isdigit():
        raise StateFileError(f"{path}: malformed header line {head[:80]!r}")
    length = int(fields[2])
    if len(body) < length:
        raise StateFileError(f"{path} is cut short: its header promises {length} bytes "
                             f"of body, {len(body)} are there")
    if len(body) > length:
        raise StateFileError(f"{path} has {len(body) - length} bytes after its body")
    return _checked(body, fields[3], path)


def _checked(body: bytes, expected: str, path: str):
    if checksum(body) != expected:
        raise StateFileError(f"{path} fails its checksum (torn or edited)")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise StateFileError(f"{path}: its body is not JSON ({exc})") from None


def _canonical(value) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _legacy_json(raw: bytes, magic: str, path: str, key: str | None):
    """A version-1 JSON object: zlib CRC-32 ("crc32", attach and Docker) or mmh3 x64
    128 hex ("checksum", containerd) of the canonical JSON of ``doc[key]``."""
    try:
        doc = json.loads(raw)
        found = doc.get("magic")
    except (ValueError, AttributeError):
        raise StateFileError(f"{path} is cut short or is not a {magic} file") from None
    if key is None or found != magic:
        raise StateFileError(f"{path} is not a {magic} file (magic {found!r})")
    if doc.get("version") != 1 or key not in doc:
        raise StateFileError(f"{path}: a {magic} file of unknown version "
                             f"{doc.get('version')!r}")
    payload = _canonical(doc[key])
    ok = (doc["crc32"] == zlib.crc32(payload) if "crc32" in doc else
          doc.get("checksum") == "%032x" % mmh3.hash128(payload, 0, True, signed=False))
    if not ok:
        raise StateFileError(f"{path} fails its checksum (torn or edited)")
    return doc[key]


class StateFile:
    """One state file at ``path`` of kind ``magic``.

    :meth:`load` returns the stored data (``default`` when there is no file); :meth:`save`
    replaces it durably.  Errors are raised as ``error`` (a subclass of the caller's
    choosing; :class:`StateFileError` by default) with ``advice`` appended, e.g. what to
    check before moving a damaged file away.  Saves are serialized by the object's lock.
    """

    def __init__(self, path: str, magic: str, legacy_key: str | None = None,
                 error: type[Exception] = StateFileError, advice: str = ""):
        self.path = os.path.abspath(path)
        self.directory = os.path.dirname(self.path)
        self.magic, self.legacy_key = magic, legacy_key
        self.error, self.advice = error, advice
        self._lock = threading.Lock()

    def load(self, default=None):
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return default
        try:
            return decode(raw, self.magic, self.path, self.legacy_key)
        except StateFileError as exc:
            if self.error is StateFileError and not self.advice:
                raise
            raise self.error(f"{exc}{'; ' + self.advice if self.advice else ''}") from None

    def save(self, data) -> None:
        """Replace the file with ``data``: tmp (0600) + fsync + rename + directory fsync."""
        raw = encode(self.magic, data)
        with self._lock:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            tmp = self.path + SUFFIX
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
                         | os.O_NOFOLLOW, 0o600)
            try:
                os.fchmod(fd, 0o600)        # a tmp left by a crash keeps its old mode
                view = memoryview(raw)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
