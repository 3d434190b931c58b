"""A pool on Ceph RADOS: the storage layer's second home (docs/rados.md, docs/format.md §RADOS).

Only thinstore/storage.py imports this module. A pool ``rados://CEPHPOOL/NAME`` is a
set of objects in the RADOS pool CEPHPOOL, every name starting ``NAME.``::

    NAME.header            empty; xattr "thinstore" (format tag), omap "size.FILE" (u64 LE
                           byte size of each file); the exclusive lock "thinstore" (cls_lock)
    NAME.FILE.%016x        bytes [i*4 MiB, (i+1)*4 MiB) of FILE (data, meta, intent, ...)

Each of the pool's files (`data`, `meta`, `intent`) keeps the byte addresses the
directory form has, cut into 4 MiB objects (RBD's default object size): a chunk (4 KiB
to 1 MiB, a power of two) never straddles two objects, an object is big enough that a
1 TiB pool is 262144 objects rather than millions, and small enough that a
random-write load spreads over every placement group. A range that is absent reads as
zeros, so a sparse file is a sparse set of objects.

Durability: writes are sent asynchronously (``aio_write``) and ``fsync`` waits for every
write sent before it, so one request's extents, and many requests, are in flight
together; a read first waits for the writes still in flight to the objects it reads.
The superblock is written by `RadosFile.write_superblock` (thinstore/rados_file.py, the
byte layer: one file's objects and the writes in flight): one write operation on the
first meta object that compares the omap value ``generation`` with the generation the
writer believes current, writes the slot and stores the new generation. RADOS applies
an operation whole or not at all, so a writer that another process has overtaken (a
stale holder that was only paused) fails its commit instead of writing a superblock.

Ownership is a cls_lock exclusive lock on the header, its description naming host,
pid and process start time. Taking over (`RadosStore.lock(takeover=True)`) blocklists
the holder's client address through the monitor (``osd blocklist add``), waits for
the OSD map that carries it, breaks the lock and takes it: from then on every
operation the old holder sends fails with EBLOCKLISTED.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import socket
import sys
import urllib.parse
import uuid

from .errors import Fenced, PoolNotFound, StorageUnavailable, UsageError
from .rados_file import (EBLOCKLISTED, OBJECT_SIZE, U64, RadosFile,  # noqa: F401
                         generation_text)

LOCK_NAME = "thinstore"
FORMAT_TAG = b"thinstore-rados 1"
BLOCKLIST_SECONDS = 7 * 24 * 3600       # long enough that a paused holder never returns
_DEBIAN_DIR = "/usr/lib/python3/dist-packages"
_ZERO_SWAPPED: bool | None = None
log = logging.getLogger("thinstore")
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")   # no dot: NAME. prefixes never overlap


def load_rados():
    """The ``rados`` module (librados' Python binding).

    There is no PyPI build: it comes with the distribution (Debian: python3-rados), built
    for the system's Python. When this interpreter cannot import it but is the same
    minor version, the system's module directory is put on sys.path for that one import.
    """
    try:
        import rados
        return rados
    except ImportError:
        pass
    tag = f"cpython-{sys.version_info.major}{sys.version_info.minor}"
    if os.path.isdir(_DEBIAN_DIR) and any(n.startswith("rados.") and tag in n
                                         for n in os.listdir(_DEBIAN_DIR)):
        sys.path.append(_DEBIAN_DIR)
        try:
            import rados
            return rados
        except ImportError:
            pass
        finally:
            sys.path.remove(_DEBIAN_DIR)
    raise StorageUnavailable(
        "rados:// pools need librados' Python module, which this Python "
        f"({sys.version.split()[0]}) cannot import: install Debian's package python3-rados "
        "(apt-get install python3-rados) and use a Python of the same minor version")


def parse_uri(uri: str) -> tuple[str, str, str | None, str | None]:
    """``rados://CEPHPOOL/NAME[?conf=FILE&id=CLIENT]`` -> (cephpool, name, conf, id)."""
    u = urllib.parse.urlsplit(uri)
    name = u.path.lstrip("/")
    if u.scheme != "rados" or not u.netloc or not _NAME.fullmatch(name):
        raise UsageError(f"invalid pool {uri!r}: use rados://CEPHPOOL/NAME"
                         "[?conf=FILE&id=CLIENT] (NAME: letters, digits, _ and -, at most "
                         "64) or a directory")
    q = urllib.parse.parse_qs(u.query)
    unknown = set(q) - {"conf", "id"}
    if unknown:
        raise UsageError(f"invalid pool {uri!r}: unknown option {sorted(unknown)[0]!r} "
                         "(known: conf, id)")
    return u.netloc, name, q.get("conf", [None])[0], q.get("id", [None])[0]


def runtime_base() -> str:
    """$THINSTORE_RUNTIME_DIR, else $XDG_RUNTIME_DIR/thinstore, else /tmp/thinstore-UID."""
    return (os.environ.get("THINSTORE_RUNTIME_DIR")
            or (os.environ.get("XDG_RUNTIME_DIR") and
                os.path.join(os.environ["XDG_RUNTIME_DIR"], "thinstore"))
            or f"/tmp/thinstore-{os.getuid()}")


def local_runtime_dir(cephpool: str, name: str, conf: str | None = None, *,
                      create: bool = True) -> str:
    """A local directory for a rados:// pool's sockets and frontend state (the pool has
    no directory of its own): ``rados-CEPHPOOL-NAME-HASH`` under `runtime_base`, HASH
    naming the cluster too (`cluster_identity`): two clusters on one host may both hold
    ``rados://rbd/vm``, and a command for one must never reach the other's server through
    a shared control socket. A name whose sockets would pass the 107 bytes of a unix
    socket path is ``rados-HASH`` alone."""
    base = runtime_base()
    key = "\n".join((cluster_identity(conf), cephpool, name)).encode()
    digest = hashlib.sha256(key).hexdigest()
    d = os.path.join(base, f"rados-{cephpool}-{name}-{digest[:12]}")
    if len(os.path.join(d, "control.sock").encode()) > 107:
        d = os.path.join(base, f"rados-{digest[:24]}")
    if create:
        os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def adopt_legacy_runtime_dir(cephpool: str, name: str, conf: str | None) -> str | None:
    """Earlier versions kept a pool's sockets, receive tokens and frontend state (the
    containerd snapshotter's records, the Docker plugin's volumes, CSI's) in
    ``rados-CEPHPOOL-NAME``, whatever the cluster. Called by the pool's lock holder:
    move that directory to this cluster's name, leaving a symbolic link to it in its
    place, unless a server still answers in it or this cluster's directory holds
    something already. Returns the old path if moved."""
    legacy = os.path.join(runtime_base(), f"rados-{cephpool}-{name}")
    if not os.path.isdir(legacy) or os.path.islink(legacy) or \
            _answers(os.path.join(legacy, "control.sock")):
        return None
    new = local_runtime_dir(cephpool, name, conf, create=False)
    try:
        os.rmdir(new)                     # an empty one a command made while looking
    except FileNotFoundError:
        pass
    except OSError:
        return None                       # in use: this cluster's own state stays
    os.rename(legacy, new)
    try:                                  # paths configured before (containerd's config
        os.symlink(os.path.basename(new), legacy)   # naming the snapshotter's socket) hold
    except OSError:
        pass
    return legacy


def _answers(path: str) -> bool:
    """Whether a server listens on the unix socket at `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def cluster_identity(conf: str | None) -> str:
    """Which Ceph cluster `conf` leads to, read locally (no cluster is contacted): the
    ``fsid`` in the [global] section of the configuration file librados reads (`conf`,
    else $CEPH_CONF, else the first of /etc/ceph/ceph.conf, ~/.ceph/ceph.conf and
    ./ceph.conf, its default search), else that file's real path, else "" (no file)."""
    if conf is None:
        candidates = ([os.environ["CEPH_CONF"]] if os.environ.get("CEPH_CONF") else
                      ["/etc/ceph/ceph.conf", os.path.expanduser("~/.ceph/ceph.conf"),
                       "ceph.conf"])
        conf = next((c for c in candidates if os.path.isfile(c)), None)
        if conf is None:
            return ""
    try:
        with open(conf, encoding="utf-8", errors="replace") as f:
            fsid = _conf_fsid(f)
    except OSError:
        fsid = None
    return f"fsid {fsid}" if fsid else f"file {os.path.realpath(conf)}"


def _conf_fsid(lines) -> str | None:
    """The [global] fsid of a ceph.conf (keys ignore case, and ``_`` is a space)."""
    section = ""
    for line in lines:
        line = re.split(r"[#;]", line, maxsplit=1)[0].strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1].strip().lower()
        elif section == "global" and "=" in line:
            key, _, value = line.partition("=")
            if " ".join(key.replace("_", " ").split()).lower() == "fsid" and value.strip():
                return value.strip().lower()
    return None


class RadosStore:
    """One pool's objects through one RADOS client (one connection per open pool, so that
    fencing one holder never fences another pool open in the same process)."""

    kind = "rados"

    def __init__(self, uri: str):
        self.uri = self.path = uri
        self.cephpool, self.name, conf, client = parse_uri(uri)
        self.conf = conf
        rados = self._rados = load_rados()
        try:
            self.cluster = rados.Rados(conffile=conf or "", rados_id=client)
            self.cluster.conf_set("client_mount_timeout", "15")
            self.cluster.conf_set("rados_osd_op_timeout", "60")
            self.cluster.connect(timeout=15)
        except rados.Error as e:
            raise StorageUnavailable(f"pool {uri}: cannot reach the Ceph cluster "
                                     f"({conf or 'default ceph.conf'}): {e}") from None
        try:
            self.ioctx = self.cluster.open_ioctx(self.cephpool)
        except rados.ObjectNotFound:
            self.cluster.shutdown()
            raise PoolNotFound(f"no RADOS pool {self.cephpool!r} for {uri} "
                               f"(create it: ceph osd pool create {self.cephpool})") from None
        self.header = f"{self.name}.header"
        self.files: list[RadosFile] = []
        self.cookie = uuid.uuid4().hex
        self.fenced = False
        self.took_over = False       # the lock was taken from a dead or fenced holder

    # ------------------------------------------------------------ pool objects
    def exists(self) -> bool:
        try:
            return self.ioctx.get_xattr(self.header, "thinstore") == FORMAT_TAG
        except self._rados.ObjectNotFound:
            return False
        except self._rados.NoData:
            return False

    def make(self) -> None:
        """Create the header (exclusively) with the format tag."""
        op = self.ioctx.create_write_op()
        try:
            op.new(self._rados.LIBRADOS_CREATE_EXCLUSIVE)
            op.set_xattr("thinstore", FORMAT_TAG)
            self.ioctx.operate_write_op(op, self.header)
        except self._rados.ObjectExists:
            raise UsageError(f"{self.uri} already holds a pool") from None
        finally:
            self.ioctx.release_write_op(op)

    def has(self, name: str) -> bool:
        return self.file_size(name) is not None

    def open(self, name: str, *, create: bool = False, readonly: bool = False) -> "RadosFile":
        size = self.file_size(name)
        if size is None and not create:
            raise FileNotFoundError(errno.ENOENT, "no such pool file", f"{self.uri}:{name}")
        f = RadosFile(self, name, readonly=readonly)
        if size is None:
            f.truncate(0)
            if name == "meta":
                self._set_omap(f.object_name(0), {"generation": generation_text(0).encode()})
        self.files.append(f)
        return f

    def file_size(self, name: str) -> int | None:
        vals = self._get_omap(self.header, [f"size.{name}"])
        raw = vals.get(f"size.{name}")
        return None if raw is None else U64.unpack(raw)[0]

    def _get_omap(self, obj: str, keys) -> dict:
        op = self.ioctx.create_read_op()
        try:
            it, _ = self.ioctx.get_omap_vals_by_keys(op, tuple(keys))
            self.ioctx.operate_read_op(op, obj)
            return dict(it)
        except self._rados.ObjectNotFound:
            return {}
        finally:
            self.ioctx.release_read_op(op)

    def _set_omap(self, obj: str, values: dict) -> None:
        op = self.ioctx.create_write_op()
        try:
            self.ioctx.set_omap(op, tuple(values), tuple(values.values()))
            self.ioctx.operate_write_op(op, obj)
        finally:
            self.ioctx.release_write_op(op)

    def zero_swapped(self) -> bool:
        """Whether this binding's WriteOp.zero passes (length, offset) to librados: Debian
        12's python3-rados (16.2) does, later ones do not. Probed once per process in the
        header's (otherwise unused) data: 8 bytes, zero(2, 4), read back, cut to 0 bytes;
        a crash in between leaves only those 8 bytes, never an object of its own."""
        global _ZERO_SWAPPED
        if _ZERO_SWAPPED is None:
            op = self.ioctx.create_write_op()
            try:
                op.write(b"x" * 8, 0)
                op.zero(2, 4)
                self.ioctx.operate_write_op(op, self.header)
            finally:
                self.ioctx.release_write_op(op)
            got = self.ioctx.read(self.header, 8, 0)
            self.ioctx.trunc(self.header, 0)
            if got not in (b"xx\0\0\0\0xx", b"xxxx\0\0xx"):
                raise StorageUnavailable(f"librados' zero operation gave {got!r}")
            _ZERO_SWAPPED = got == b"xxxx\0\0xx"
        return _ZERO_SWAPPED

    def object_names(self, file: str | None = None) -> list[str]:
        """Every object of this pool (or of one file), for tests and `destroy`."""
        prefix = f"{self.name}." + (f"{file}." if file else "")
        return sorted(o.key for o in self.ioctx.list_objects() if o.key.startswith(prefix))

    def collect_unreferenced(self, refs, chunk_shift: int) -> int:
        """After a takeover: remove what the old holder wrote but never committed."""
        if not self.took_over:
            return 0
        from . import rados_lock
        return rados_lock.collect_garbage(self, refs, chunk_shift)

    def runtime_dir(self) -> str:
        return local_runtime_dir(self.cephpool, self.name, self.conf)

    def close(self) -> None:
        for f in self.files:
            f.close()
        try:
            self.ioctx.close()
        finally:
            self.cluster.shutdown()

    # ------------------------------------------------------------ ownership
    def lock(self, takeover: bool = False):
        from . import rados_lock
        held = rados_lock.acquire(self, takeover)
        moved = adopt_legacy_runtime_dir(self.cephpool, self.name, self.conf)
        if moved:
            log.warning("pool %s: its local directory %s is now %s (it names the cluster)",
                        self.uri, moved, self.runtime_dir())
        return held

    def holder(self) -> str | None:
        from . import rados_lock
        lockers = rados_lock.lockers(self)
        return rados_lock.describe(lockers[0]) if lockers else None

    def raise_failure(self, what: str, rc: int):
        if rc == EBLOCKLISTED or self.fenced:
            self.fenced = True
            raise Fenced(f"pool {self.uri}: {what} refused: this process was fenced "
                         "(another process took the pool over with 'serve --takeover'); "
                         "nothing it writes from now on reaches the pool")
        raise OSError(rc, f"{what}: {os.strerror(rc)}", self.uri)
