"""One file of a rados:// pool as 4 MiB RADOS objects (docs/rados.md).

The byte layer under RadosStore: a RadosFile has FileIO's interface (thinstore/
storage.py), so the metadata, intent log and data path use it as they use a file. It
cuts byte ranges into pieces of OBJECT_SIZE objects, sends writes asynchronously and
keeps them in flight until `fsync` (a read waits only for the writes to the objects
it reads), turns removed and absent ranges into zeros, keeps the file's size in the
header's omap, and writes the superblock as one compare-and-write operation on the
first meta object (`write_superblock`: the commit a fenced holder cannot make).

Kept apart from rados_store.py, which knows the pool as a whole (its objects, the
cluster connection, the header, ownership): this module knows one file's objects
and the operations in flight on them; it reaches the store only through the
RadosStore it is given.
"""

from __future__ import annotations

import errno
import struct
import threading
from typing import TYPE_CHECKING

from .errors import Fenced

if TYPE_CHECKING:
    from .rados_store import RadosStore

OBJECT_SIZE = 4 << 20
EBLOCKLISTED = errno.ESHUTDOWN          # what librados returns to a blocklisted client
U64 = struct.Struct("<Q")               # a file's size in the header's omap
_REAP = 256                             # writes in flight before finished ones are dropped
_MAX_IN_FLIGHT = 4096                   # ... and before the writer waits for them all


def generation_text(generation: int) -> str:
    """A generation as the omap value compared at commit: 20 decimal digits (the
    binding's omap_cmp takes text, and fixed width keeps the order of the numbers)."""
    return f"{generation:020d}"


def errno_of(exc) -> int:
    return abs(getattr(exc, "errno", 0) or 0)


class RadosFile:
    """One of the pool's files as 4 MiB objects, with FileIO's interface (fd is None, so
    the kernels take their Python twins, which call these methods)."""

    fd = None
    punch_unit = OBJECT_SIZE

    def __init__(self, store: RadosStore, name: str, *, readonly: bool = False):
        self.store, self.name, self.readonly = store, name, readonly
        self.path = f"{store.uri}:{name}"
        self.ioctx = store.ioctx
        self._size = store.file_size(name) or 0
        self._size_dirty = False
        self._mu = threading.Lock()
        self._pending: dict[str, list] = {}     # object -> [(completion, data)]
        self._count = 0
        self._error = 0

    def object_name(self, index: int) -> str:
        return f"{self.store.name}.{self.name}.{index:016x}"

    @staticmethod
    def _pieces(offset: int, length: int):
        """(object index, offset in object, offset in the request, length) pieces."""
        done = 0
        while done < length:
            index, off = divmod(offset + done, OBJECT_SIZE)
            n = min(length - done, OBJECT_SIZE - off)
            yield index, off, done, n
            done += n

    # ------------------------------------------------------------ reads
    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.preadinto(buf, offset)
        return bytes(buf)

    def preadinto(self, buf, offset: int) -> None:
        self.preadinto_many([(memoryview(buf).cast("B"), offset)])

    def preadinto_many(self, parts) -> None:
        """Fill each (writable buffer, file offset) pair, all object reads in flight at once."""
        reads = []
        for view, offset in parts:
            view = memoryview(view).cast("B")
            for index, off, at, n in self._pieces(offset, len(view)):
                obj = self.object_name(index)
                self._wait_object(obj)
                reads.append((obj, off, view[at:at + n]))
        got: list = [None] * len(reads)

        def landed(i):
            return lambda _comp, data: got.__setitem__(i, data)
        comps = [self.ioctx.aio_read(obj, len(v), off, landed(i))
                 for i, (obj, off, v) in enumerate(reads)]
        for i, (comp, (obj, _, view)) in enumerate(zip(comps, reads)):
            comp.wait_for_complete_and_cb()
            rc = comp.get_return_value()
            if rc < 0 and rc != -errno.ENOENT:
                self.store.raise_failure(f"read of {obj}", -rc)
            n = max(rc, 0)             # the binding leaves a 0-byte read's buffer unfilled
            if n:
                view[:n] = got[i][:n]
            if n < len(view):
                view[n:] = bytes(len(view) - n)

    # ------------------------------------------------------------ writes
    def pwrite(self, data, offset: int) -> None:
        self._check()
        data = memoryview(data).cast("B")
        for index, off, at, n in self._pieces(offset, len(data)):
            piece = bytes(data[at:at + n])
            obj = self.object_name(index)
            self._track(obj, self.ioctx.aio_write(obj, piece, off), piece)
        self._grow_to(offset + len(data))

    def append(self, data) -> int:
        """Write `data` at the end of the file; returns the offset it starts at."""
        at = self._size
        self.pwrite(data, at)
        return at

    def punch(self, offset: int, length: int) -> None:
        """Whole objects in the range are removed; partial ones zeroed (reads give zeros)."""
        self._check()
        for index, off, _, n in self._pieces(offset, length):
            obj = self.object_name(index)
            if off == 0 and n == OBJECT_SIZE:
                self._track(obj, self.ioctx.aio_remove(obj), None)
            else:
                self._zero(obj, off, n)

    def write_zeros(self, offset: int, length: int) -> None:
        """Zeros, extending the file like a write (an intent log's preallocation)."""
        self.punch(offset, length)
        self._grow_to(offset + length)

    def _zero(self, obj: str, off: int, n: int) -> None:
        op = self.ioctx.create_write_op()
        try:
            if self.store.zero_swapped():
                op.zero(n, off)
            else:
                op.zero(off, n)
            self._track(obj, self.ioctx.operate_aio_write_op(op, obj), op)
        except BaseException:
            self.ioctx.release_write_op(op)
            raise

    def copy(self, src: int, dst: int, length: int) -> None:
        if length > 0:
            self.pwrite(self.pread(length, src), dst)

    def copy_shared(self, src: int, dst: int, length: int) -> bool:
        return False

    def preallocate(self, offset: int, length: int) -> bool:
        return False

    def write_superblock(self, data, offset: int, generation: int) -> None:
        """The commit point: in one operation on the first meta object, assert that the
        stored generation is `generation` - 1, write the slot, store `generation`."""
        self.fsync()
        rados = self.store._rados
        obj = self.object_name(offset // OBJECT_SIZE)
        op = self.ioctx.create_write_op()
        try:
            op.omap_cmp("generation", generation_text(generation - 1),
                        rados.LIBRADOS_CMPXATTR_OP_EQ)
            op.write(bytes(data), offset % OBJECT_SIZE)
            self.ioctx.set_omap(op, ("generation",), (generation_text(generation).encode(),))
            self.ioctx.operate_write_op(op, obj)
        except rados.Error as e:
            rc = errno_of(e)
            if rc == errno.ECANCELED:
                self.store.fenced = True
                raise Fenced(f"pool {self.store.uri}: commit of generation {generation} "
                             "refused: the pool has moved on without this process (another "
                             "process took it over)") from None
            self.store.raise_failure("superblock write", rc)
        finally:
            self.ioctx.release_write_op(op)

    # ------------------------------------------------------------ in-flight writes
    def _track(self, obj: str, comp, keep) -> None:
        with self._mu:
            self._pending.setdefault(obj, []).append((comp, keep))
            self._count += 1
            if self._count >= _REAP:
                self._reap(block=False)
            if self._count >= _MAX_IN_FLIGHT:   # a slow cluster: wait rather than buffer
                self._reap(block=True)

    def _reap(self, block: bool, only: str | None = None) -> None:
        """Drop finished writes (waiting for all with `block`), keeping the first error."""
        for obj in ([only] if only is not None else list(self._pending)):
            left = []
            for comp, keep in self._pending.get(obj, ()):
                if block:
                    comp.wait_for_complete()
                elif not comp.is_complete():
                    left.append((comp, keep))
                    continue
                rc = comp.get_return_value()
                if rc < 0 and rc != -errno.ENOENT and not self._error:
                    self._error = -rc
                if isinstance(keep, self.store._rados.WriteOp):
                    self.ioctx.release_write_op(keep)
            if left:
                self._pending[obj] = left
            else:
                self._pending.pop(obj, None)
        self._count = sum(len(v) for v in self._pending.values())

    def _wait_object(self, obj: str) -> None:
        with self._mu:
            if obj in self._pending:
                self._reap(block=True, only=obj)

    def _check(self) -> None:
        if self.readonly:
            raise OSError(errno.EBADF, "pool file opened read-only", self.path)
        if self._error or self.store.fenced:
            self.store.raise_failure(f"write to {self.path}", self._error or EBLOCKLISTED)

    def fsync(self) -> None:
        """Wait for every write sent so far; the first failure among them is raised."""
        with self._mu:
            self._reap(block=True)
        if self._error:
            self.store.raise_failure(f"write to {self.path}", self._error)
        if self._size_dirty:
            self._store_size()

    datasync = fsync      # no times to skip: an object's data and size are one

    # ------------------------------------------------------------ size
    def size(self) -> int:
        return self._size

    def _grow_to(self, end: int) -> None:
        if end > self._size:
            self._size, self._size_dirty = end, True

    def _store_size(self) -> None:
        try:
            self.store._set_omap(self.store.header, {f"size.{self.name}": U64.pack(self._size)})
        except self.store._rados.Error as e:
            self.store.raise_failure(f"size of {self.path}", errno_of(e))
        self._size_dirty = False

    def truncate(self, size: int) -> None:
        """Set the size; objects wholly past it are removed, a partial last one cut."""
        if size < self._size:
            self.fsync()
            first = -(-size // OBJECT_SIZE)
            for index in range(first, -(-self._size // OBJECT_SIZE)):
                self._track(self.object_name(index), self.ioctx.aio_remove(
                    self.object_name(index)), None)
            if size % OBJECT_SIZE:
                self._zero(self.object_name(size // OBJECT_SIZE), size % OBJECT_SIZE,
                           OBJECT_SIZE - size % OBJECT_SIZE)
            self.fsync()
        self._size = size
        self._store_size()

    def close(self) -> None:
        with self._mu:
            try:
                self._reap(block=True)
            except Exception:          # closing after a failure: the error was raised before
                pass
