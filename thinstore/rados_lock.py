"""Ownership of a rados:// pool: the cls_lock exclusive lock on ``NAME.header``, and takeover.

The Python binding takes and releases locks but cannot list or break them, so the two
class methods it lacks are called through ``Ioctx.execute`` with their inputs and
outputs in Ceph's encoding (``src/cls/lock/cls_lock_ops.h``): each structure is a
versioned envelope (u8 version, u8 compat, u32 length) around its fields; strings are
a u32 length and the bytes; an entity name is a u8 type and an s64 number; a map is a
u32 count and its pairs; all integers little-endian.

A holder is *alive* unless it ran on this host and its process (pid and start time,
from the lock's description) is gone: a dead local holder is fenced and replaced
without being asked, as the directory form's fcntl lock is released by the kernel when
its process dies. Any other holder, a paused one included, is replaced only with
``takeover`` (``serve --takeover``): the holder's client is blocklisted first, so
nothing it sends afterwards, a write or a commit, reaches the pool.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import struct

from .errors import PoolLocked

log = logging.getLogger("thinstore")

LOCK_NAME = "thinstore"
_OBJECT_SIZE = 4 << 20           # rados_store.OBJECT_SIZE
_HDR = struct.Struct("<BBI")


@dataclasses.dataclass
class Locker:
    entity_type: int
    entity_num: int
    cookie: str
    address: str          # "IP:PORT/NONCE", what `osd blocklist add` takes
    description: str

    @property
    def fields(self) -> dict:
        return dict(p.split("=", 1) for p in self.description.split() if "=" in p)


class RadosLock:
    """The held lock; `release` unlocks (a fenced holder's unlock fails, harmlessly)."""

    def __init__(self, store):
        self.store = store

    def release(self) -> None:
        try:
            self.store.ioctx.unlock(self.store.header, LOCK_NAME, self.store.cookie)
        except Exception as e:       # fenced, or the cluster is gone: nothing left to free
            log.debug("unlock of %s: %s", self.store.uri, e)


# ------------------------------------------------------------ encoding
def _envelope(body: bytes) -> bytes:
    return _HDR.pack(1, 1, len(body)) + body


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<I", len(raw)) + raw


class _Reader:
    def __init__(self, raw: bytes):
        self.raw, self.at = raw, 0

    def take(self, fmt: str):
        s = struct.Struct("<" + fmt)
        vals = s.unpack_from(self.raw, self.at)
        self.at += s.size
        return vals if len(vals) > 1 else vals[0]

    def bytes(self, n: int) -> bytes:
        out = self.raw[self.at:self.at + n]
        self.at += n
        return out

    def string(self) -> str:
        return self.bytes(self.take("I")).decode(errors="replace")

    def envelope(self) -> int:
        """Open a versioned envelope; returns where it ends."""
        _, _, length = self.take("BBI")
        return self.at + length

    def address(self) -> str:
        marker = self.take("B")
        if marker == 1:                       # entity_addr_t with the MSG_ADDR2 feature
            end = self.envelope()
            _type, nonce, elen = self.take("III")
            sa = self.bytes(elen)
            self.at = end
        else:                                 # legacy: 3 pad bytes, nonce, sockaddr_storage
            self.bytes(3)
            nonce = self.take("I")
            sa = self.bytes(128)
        port = int.from_bytes(sa[2:4], "big") if len(sa) >= 4 else 0
        if len(sa) >= 24 and len(sa) != 16 and any(sa[8:24]):
            ip = "[" + socket.inet_ntop(socket.AF_INET6, sa[8:24]) + "]"
        else:
            ip = socket.inet_ntoa(sa[4:8]) if len(sa) >= 8 else "0.0.0.0"
        return f"{ip}:{port}/{nonce}"


def _get_info(store) -> list[Locker]:
    rc, out = store.ioctx.execute(store.header, "lock", "get_info",
                                  _envelope(_string(LOCK_NAME)), 65536)
    r = _Reader(out)
    r.envelope()
    found = []
    for _ in range(r.take("I")):
        end = r.envelope()
        etype, enum = r.take("Bq")
        cookie = r.string()
        r.at = end
        end = r.envelope()
        r.take("II")                          # expiration (utime_t)
        addr = r.address()
        desc = r.string()
        r.at = end
        found.append(Locker(etype, enum, cookie, addr, desc))
    return found


def lockers(store) -> list[Locker]:
    try:
        return _get_info(store)
    except store._rados.ObjectNotFound:
        return []


def _break(store, locker: Locker) -> None:
    body = _string(LOCK_NAME) + struct.pack("<Bq", locker.entity_type, locker.entity_num)
    try:
        store.ioctx.execute(store.header, "lock", "break_lock",
                            _envelope(body + _string(locker.cookie)), 0)
    except store._rados.ObjectNotFound:
        pass


# ------------------------------------------------------------ who and whether alive
def _start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def my_description() -> str:
    pid = os.getpid()
    return f"thinstore host={socket.gethostname()} pid={pid} start={_start_time(pid)}"


def describe(locker: Locker) -> str:
    f = locker.fields
    who = f"process {f.get('pid', '?')} on host {f.get('host', '?')}" if f else "a client"
    return f"{who} (client.{locker.entity_num} at {locker.address})"


def dead_here(locker: Locker) -> bool:
    """True only when the holder ran on this host and its process is gone."""
    f = locker.fields
    if f.get("host") != socket.gethostname() or not f.get("pid", "").isdigit():
        return False
    return _start_time(int(f["pid"])) != f.get("start")


# ------------------------------------------------------------ acquire
def acquire(store, takeover: bool) -> RadosLock:
    rados = store._rados
    for _ in range(3):
        try:
            store.ioctx.lock_exclusive(store.header, LOCK_NAME, store.cookie,
                                       desc=my_description())
            return RadosLock(store)
        except (rados.ObjectBusy, rados.ObjectExists):
            pass
        for locker in lockers(store):
            if not (takeover or dead_here(locker)):
                raise PoolLocked(
                    f"pool {store.uri} is in use by {describe(locker)}; stop it, or, if it is "
                    f"dead or hung, take the pool over (this fences it): thinstore --pool "
                    f"{store.uri} serve --takeover")
            fence(store, locker)
    raise PoolLocked(f"pool {store.uri}: the lock changed hands while taking it; try again")


def fence(store, locker: Locker) -> None:
    """Blocklist the holder's client, wait until the OSDs know it, then break its lock."""
    rados = store._rados
    log.warning("pool %s: fencing %s and taking the pool over", store.uri, describe(locker))
    try:
        store.cluster.blocklist_add(locker.address, 7 * 24 * 3600)
    except rados.Error as e:
        raise PoolLocked(f"pool {store.uri}: cannot fence {describe(locker)} ({e}); the "
                         "client needs the monitor capability to blocklist "
                         "('osd blocklist')") from None
    store.cluster.wait_for_latest_osdmap()
    _break(store, locker)
    store.took_over = True


# ------------------------------------------------------------ after a takeover
def collect_garbage(store, refs, chunk_shift: int) -> int:
    """After taking over from a dead or fenced holder: remove the data objects in
    which no chunk is referenced (written in a transaction that never committed) and
    any object past its file's size. Returns how many were removed."""
    unit = _OBJECT_SIZE >> chunk_shift
    removed = 0
    for obj in store.object_names():
        file, _, index = obj[len(store.name) + 1:].rpartition(".")
        if not file or len(index) != 16:
            continue
        i = int(index, 16)
        size = store.file_size(file)
        stray = size is None or i * _OBJECT_SIZE >= size
        if file == "data" and not stray:
            stray = not refs[i * unit:(i + 1) * unit].any()
        if stray:
            try:
                store.ioctx.remove_object(obj)
                removed += 1
            except store._rados.ObjectNotFound:
                pass
    if removed:
        log.warning("pool %s: removed %d object(s) the previous holder wrote but never "
                    "committed", store.uri, removed)
    return removed
