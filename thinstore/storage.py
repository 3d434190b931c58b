"""The storage layer's file interface: every byte thinstore puts on disk goes through here.

`FileIO` wraps one file (the pool's ``data`` or ``meta``). Keeping this surface small
and explicit is what lets tests swap in a double that loses unsynced writes at a
simulated power cut: nothing above this module calls ``os.pwrite`` or ``os.fsync``
itself. ``fd`` is a real descriptor for native kernels; a double sets it to None and
the kernels fall back to their Python twins, which call these methods.
"""

from __future__ import annotations

import errno
import os
import stat
import struct

from .errors import UsageError

_ZEROS = bytes(1 << 20)
_CLONE_ALIGN = 4096                      # the file-system block a reflink shares
_FICLONERANGE = 0x4020940D               # _IOW(0x94, 13, struct file_clone_range)
_CLONE_RANGE = struct.Struct("=qQQQ")    # src_fd, src_offset, src_length, dest_offset
_KEEP_SIZE = 0x01                        # FALLOC_FL_KEEP_SIZE
_PUNCH = 0x02 | _KEEP_SIZE               # FALLOC_FL_PUNCH_HOLE

try:
    import fcntl as _fcntl
except ImportError:  # pragma: no cover
    _fcntl = None


def _fallocate_punch(fd: int, offset: int, length: int) -> bool:
    """Deallocate a range so it reads as zeros; False where the file system cannot."""
    import ctypes
    libc = _libc()
    if libc is None:
        return False
    res = libc.fallocate(fd, _PUNCH, ctypes.c_long(offset), ctypes.c_long(length))
    return res == 0


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        import ctypes
        try:
            # the C library the interpreter already has loaded: find_library would run
            # ldconfig in a subprocess, forking a process that inherits the pool's files
            lib = ctypes.CDLL(None, use_errno=True)
            lib.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
            _LIBC = lib
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC or None


def private_dir(path: str) -> None:
    """Create directory `path` (and its parents) readable and writable by its owner only,
    whatever the umask, or accept an existing one that no one else can write to.

    A pool's directory decides who can swap its ``meta`` or plant a ``control.sock``;
    like ZFS's and LVM's state it belongs to root or its owner alone (0700).
    """
    if os.path.exists(path) and not os.path.isdir(path):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    check_private_dir(path)


def check_private_dir(path: str) -> None:
    """Refuse a directory that group or others may write to: anyone could replace the
    pool's files or plant a fake control socket there. The message gives the fix."""
    from .errors import ThinstoreError
    mode = os.stat(path).st_mode
    if mode & 0o022:
        raise ThinstoreError(f"pool directory {path} is writable by {_who(mode)} (mode "
                             f"{mode & 0o7777:04o}): any local user could replace its files "
                             f"or plant a fake control socket; make it private with "
                             f"'chmod 700 {path}' (check who owns it)")


def _who(mode: int) -> str:
    return " and ".join(w for w, bit in (("its group", 0o020), ("others", 0o002)) if mode & bit)


class FileIO:
    """One open file with positional I/O. Short reads past EOF read as zeros."""

    def __init__(self, path: str, *, create: bool = False, readonly: bool = False):
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self.path = path
        self.fd = os.open(path, flags | getattr(os, "O_CLOEXEC", 0), 0o600)
        self._can_punch = True
        # a raw block device (DESIGN §1): fixed size, no truncate; punch is BLKDISCARD-like
        self.block = stat.S_ISBLK(os.fstat(self.fd).st_mode)

    def pread(self, length: int, offset: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        if len(data) < length:
            data += bytes(length - len(data))
        return data

    def preadinto(self, buf, offset: int) -> None:
        """Fill the writable buffer `buf` from `offset` (zeros past EOF)."""
        view = memoryview(buf).cast("B")
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], offset + done)
            if n == 0:
                view[done:] = bytes(len(view) - done)
                return
            done += n

    def pwrite(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self.fd, view[done:], offset + done)

    def punch(self, offset: int, length: int) -> None:
        """Make [offset, offset+length) read as zeros, freeing the space where possible."""
        if length <= 0:
            return
        if self._can_punch and _fallocate_punch(self.fd, offset, length):
            return
        self._can_punch = False
        self.write_zeros(offset, length)

    def write_zeros(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, len(_ZEROS))
            self.pwrite(memoryview(_ZEROS)[:n], offset)
            offset += n
            length -= n

    def copy(self, src: int, dst: int, length: int) -> None:
        """Copy within the file: the whole 4 KiB blocks shared (a reflink) where the
        file system can, everything else read and written (ts_cow_copy's rule)."""
        if not self.copy_shared(src, dst, length):
            self._copy_bytes(src, dst, length)

    def preallocate(self, offset: int, length: int) -> bool:
        """Have the file system set blocks aside for [offset, offset+length) without
        changing a byte or the size (fallocate KEEP_SIZE); False where it cannot."""
        import ctypes
        libc = _libc()
        if libc is None or length <= 0:
            return False
        return libc.fallocate(self.fd, _KEEP_SIZE, ctypes.c_long(offset),
                              ctypes.c_long(length)) == 0

    def copy_shared(self, src: int, dst: int, length: int) -> bool:
        """Copy by sharing the whole 4 KiB blocks of [src, src+length) with
        FICLONERANGE and copying the unaligned edges; False, with nothing done,
        where there is no whole block or the file system cannot share (ext4, tmpfs)."""
        head = -src % _CLONE_ALIGN
        if _fcntl is None or src % _CLONE_ALIGN != dst % _CLONE_ALIGN \
                or length < head + _CLONE_ALIGN:
            return False
        tail = head + (length - head) // _CLONE_ALIGN * _CLONE_ALIGN
        try:
            _fcntl.ioctl(self.fd, _FICLONERANGE, _CLONE_RANGE.pack(self.fd, src + head,
                                                                   tail - head, dst + head))
        except OSError:
            return False
        self._copy_bytes(src, dst, head)
        self._copy_bytes(src + tail, dst + tail, length - tail)
        return True

    def _copy_bytes(self, src: int, dst: int, length: int) -> None:
        if length > 0:
            self.pwrite(self.pread(length, src), dst)

    def fsync(self) -> None:
        os.fsync(self.fd)

    def datasync(self) -> None:
        """Make the file's bytes durable, and its size, but not its times (fdatasync):
        what the intent log needs after an append, one device cache flush."""
        os.fdatasync(self.fd)

    def size(self) -> int:
        if self.block:
            return os.lseek(self.fd, 0, os.SEEK_END)
        return os.fstat(self.fd).st_size

    def truncate(self, size: int) -> None:
        """Set the file's size. A block device's size is fixed: a size it holds is
        accepted as is, a larger one is ENOSPC naming the device's size."""
        if self.block:
            have = self.size()
            if size > have:
                raise OSError(errno.ENOSPC, f"the block device holds {have} bytes, "
                              f"{size} are needed", self.path)
            return
        try:
            os.ftruncate(self.fd, size)
        except OSError as e:       # EFBIG, ENOSPC: say which file
            raise OSError(e.errno, e.strerror, self.path) from None

    def close(self) -> None:
        if self.fd is not None and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def append(self, data) -> int:
        """Write `data` at the end of the file; returns the offset it starts at."""
        at = self.size()
        self.pwrite(data, at)
        return at

    def write_superblock(self, data, offset: int, generation: int) -> None:
        """The commit point (metadata.py step 6): a plain write here; the slot's checksum
        and the other slot make a torn one harmless. RADOS asserts the generation too."""
        self.pwrite(data, offset)


# ---------------------------------------------------------------- where a pool lives
def is_rados(location: str) -> bool:
    return str(location).startswith("rados://")


def open_store(location: str, fileio=FileIO):
    """The store of the pool at `location`: a directory (`DirStore`), or a
    ``rados://CEPHPOOL/NAME[?conf=FILE&id=CLIENT]`` URI (thinstore/rados_store.py).
    Both give the same interface: exists, make, has, open(name) -> a file with FileIO's
    methods, lock(takeover) -> an object with release(), holder, runtime_dir, close."""
    if is_rados(location):
        if fileio is not FileIO:
            raise ValueError("a rados:// pool takes no fileio double")
        from .rados_store import RadosStore
        return RadosStore(location)
    return DirStore(location, fileio)


def runtime_dir(location: str) -> str:
    """The local directory for a pool's sockets (control, NBD) without opening the pool:
    the pool directory itself, or a per-user runtime directory for a rados:// pool."""
    if not is_rados(location):
        return location
    from .rados_store import local_runtime_dir, parse_uri
    cephpool, name, conf, _ = parse_uri(location)
    return local_runtime_dir(cephpool, name, conf)


class DirStore:
    """A pool in a directory (DESIGN §1): ``data``, ``meta``, ``intent`` and ``lock``."""

    kind = "dir"

    def __init__(self, path: str, fileio=FileIO):
        self.path = path
        self.fileio = fileio

    def exists(self) -> bool:
        """Whether the directory holds a pool. A directory the caller may not enter is
        said so (PermissionError), not taken for an empty one."""
        try:
            return stat.S_ISREG(os.stat(os.path.join(self.path, "meta")).st_mode)
        except PermissionError:
            raise PermissionError(errno.EACCES, "permission denied: the pool directory is "
                                  "its owner's alone (mode 0700); run as that user or root",
                                  self.path) from None
        except (FileNotFoundError, NotADirectoryError):
            return False

    def make(self) -> None:
        private_dir(self.path)
        if self.exists():
            from .errors import UsageError
            raise UsageError(f"{self.path} already holds a pool")

    def has(self, name: str) -> bool:
        return os.path.exists(os.path.join(self.path, name))

    def open(self, name: str, *, create: bool = False, readonly: bool = False):
        return self.fileio(os.path.join(self.path, name), create=create, readonly=readonly)

    def lock(self, takeover: bool = False) -> "DirLock":
        """The fcntl lock on ``lock``; the kernel drops it when its holder dies, so there
        is never a dead holder to take over (`takeover` changes nothing here)."""
        return DirLock(self.path)

    def holder(self) -> str | None:
        try:
            with open(os.path.join(self.path, "lock")) as f:
                pid = f.read().strip()
        except OSError:
            return None
        return f"process {pid}" if pid else None

    def runtime_dir(self) -> str:
        return self.path

    def collect_unreferenced(self, refs, chunk_shift: int) -> int:
        """Space a dead holder wrote but never committed: nothing to do in a file (the
        bytes are overwritten when the chunk is next allocated)."""
        return 0

    def close(self) -> None:
        pass


class DirLock:
    """The pool directory's exclusive lock; a second opener learns the holder's pid.

    Every opener of a directory pool (Pool, check, repair, dump, restore) comes here
    first, so a pool directory others can write to is refused here, with the fix.

    The lock is an flock(2) on POOL/lock, which holds the holder's pid (written once it
    has the lock). While another process holds it, ``DirLock.waiting`` decides: None
    (the default, the API's) raises PoolLocked at once; a callable ``(path, holder,
    seconds_waited) -> bool`` is asked every POLL seconds whether to try again (the CLI's
    ``--wait``), and PoolLocked says how long it waited.
    """

    waiting = None
    POLL = 0.05

    def __init__(self, path: str):
        check_private_dir(path)
        lockpath = os.path.join(path, "lock")
        fd = os.open(lockpath, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._take(fd, path)
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    @classmethod
    def _take(cls, fd: int, path: str) -> None:
        import fcntl
        import time
        from .errors import PoolLocked
        start = time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            waited = time.monotonic() - start
            if cls.waiting is None or not cls.waiting(path, holder, waited):
                err = PoolLocked(f"pool {path} is in use by process {holder} (a running "
                                 "'thinstore serve' or another opener"
                                 + (f"; waited {round(waited, 1):g} s for it" if waited >= 1 else "")
                                 + "): stop it, or let the commands reach the pool through "
                                 "the server")
                err.holder, err.waited = holder, waited
                raise err from None
            time.sleep(cls.POLL)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class locked_store:
    """``with locked_store(location) as store:`` the pool's store, held under its lock
    for a command that works on the files themselves (check, repair, dump)."""

    def __init__(self, location: str, fileio=FileIO):
        self.location, self.fileio = location, fileio

    def __enter__(self):
        from .errors import PoolNotFound
        self.store = open_store(self.location, self.fileio)
        try:
            if not self.store.exists():
                raise PoolNotFound(f"no thinstore pool at {self.location}")
            self.owner = self.store.lock()
        except BaseException:
            self.store.close()
            raise
        return self.store

    def __exit__(self, *exc):
        try:
            self.owner.release()
        finally:
            self.store.close()


def device_capacity(device: str, capacity: int | None, chunk_size: int) -> int:
    """The capacity a pool on block device `device` can have (chunk 0 is reserved)."""
    try:
        st = os.stat(device)
    except OSError as e:
        raise UsageError(f"cannot use {device} for data: {e.strerror}") from None
    if not stat.S_ISBLK(st.st_mode):
        raise UsageError(f"{device} is not a block device (--data-device takes one, "
                         "e.g. /dev/sdb or a loop device)")
    fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    try:
        have = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    most = (have // chunk_size - 1) * chunk_size
    if capacity is None:
        capacity = most
    if capacity > most:
        raise UsageError(f"{device} holds {have} bytes: a pool on it with {chunk_size}-byte "
                         f"chunks has at most {most} bytes of capacity")
    return capacity


# -- the label of a data device (docs/format.md, "Data device label") -----------------
DATA_LABEL_MAGIC = b"TSDATALB"
DATA_LABEL = struct.Struct("<8sHHI16s")   # magic, version 1, 0, checksum of 16..4095, uuid
DATA_LABEL_BYTES = 4096                   # the start of chunk 0, which no map ever names


def _data_label(pool_uuid: bytes) -> bytes:
    from .format import checksum
    block = bytearray(DATA_LABEL_BYTES)
    block[16:32] = pool_uuid
    DATA_LABEL.pack_into(block, 0, DATA_LABEL_MAGIC, 1, 0, checksum(block[16:]), pool_uuid)
    return bytes(block)


def write_data_label(device: str, pool_uuid: bytes) -> None:
    """Mark the block device `device` as the data of the pool `pool_uuid`."""
    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.pwrite(fd, _data_label(pool_uuid), 0)
        os.fsync(fd)
    finally:
        os.close(fd)


def check_data_label(store, pool_uuid: bytes, adopt: bool = False) -> str | None:
    """Before a pool on a block device (POOL/data a symlink to it) writes a byte: is the
    device it names now the one it was made on? Device names are not stable (/dev/sdb
    and /dev/sdc swap at a boot, a loop device's number is reused), and a pool writing
    into another disk destroys that disk's data. The label in chunk 0 names the pool:
    another pool's, a damaged one or none refuses (WrongDataDevice), before anything is
    written; with `adopt` (``thinstore upgrade``: a device an older thinstore made carries
    no label) an unlabelled device is labelled, and a note returned saying so."""
    if getattr(store, "kind", None) != "dir":
        return None
    link = os.path.join(store.path, "data")
    if not os.path.islink(link):
        return None
    device = os.path.realpath(link)
    with open(link, "rb") as f:
        block = f.read(DATA_LABEL_BYTES)
    magic, _version, _zero, _sum, uuid = DATA_LABEL.unpack_from(block.ljust(32, b"\0"))
    if block == _data_label(pool_uuid):
        return None
    from .errors import WrongDataDevice
    fix = (f"point {link} at the pool's own device (ln -sfn /dev/disk/by-id/... {link}; "
           "by-id names do not change between boots)")
    if magic != DATA_LABEL_MAGIC and adopt:
        write_data_label(link, pool_uuid)
        return (f"pool {store.path}: labelled its data device {device} as this pool's "
                "(its first 4096 bytes, never used for data)")
    if magic != DATA_LABEL_MAGIC:
        raise WrongDataDevice(f"{device}, the data device {link} names, carries no label of "
                              f"pool {pool_uuid.hex()} in its first {DATA_LABEL_BYTES} bytes: "
                              f"it may be another disk, which this pool would overwrite; "
                              f"{fix}; a pool made before data devices were labelled: "
                              f"label it once with 'thinstore --pool {store.path} upgrade'")
    if uuid != pool_uuid:
        raise WrongDataDevice(f"{device}, the data device {link} names, belongs to pool "
                              f"{uuid.hex()}, not to this pool ({pool_uuid.hex()}); {fix}")
    raise WrongDataDevice(f"the label of data device {device} ({link}) is damaged; {fix}")

