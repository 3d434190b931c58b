"""A power-cut test double of thinstore.storage.FileIO (after SQLite's crash-test VFS).

Every file a `FaultDisk` opens keeps the writes issued since its last fsync in a
volatile list, as an OS page cache does; reads see them. `power_cut()` then keeps a
random subset of each file's unsynced writes, tearing some of them (only some of their
512-byte sectors land), drops the rest, and writes the survivors to the real file, which
is the "platter". A disk can also stop the process at its n-th I/O call by raising
`PowerCut` (a BaseException, so no `except Exception` in the pool swallows it), which
puts crashes inside commit, between a page write and its fsync.

Usage: ``disk = FaultDisk(seed); Pool.create(path, ..., fileio=disk.open)``.
"""

from __future__ import annotations

import os
import random

SECTOR = 512


class PowerCut(BaseException):
    """The simulated machine lost power: stop using every object of the pool."""


class FaultDisk:
    def __init__(self, seed: int, crash_after: int | None = None):
        self.rng = random.Random(seed)
        self.crash_after = crash_after
        self.ops = 0
        self.files: list[FaultFile] = []
        self.cuts = 0
        self.torn = 0
        self.dropped = 0

    def open(self, path: str, *, create: bool = False, readonly: bool = False) -> "FaultFile":
        f = FaultFile(self, path, create=create, readonly=readonly)
        self.files.append(f)
        return f

    def tick(self) -> None:
        """Count one I/O call; raise PowerCut when the planned moment comes."""
        self.ops += 1
        if self.crash_after is not None and self.ops >= self.crash_after:
            self.crash_after = None
            raise PowerCut(f"power cut at I/O call {self.ops}")

    def power_cut(self) -> None:
        """Lose a random part of every file's unsynced writes; keep the rest."""
        for f in self.files:
            f.cut(self.rng)
            f.close_real()
        self.files.clear()
        self.cuts += 1


class FaultFile:
    """FileIO's interface over a real file that only fsync makes durable."""

    def __init__(self, disk: FaultDisk, path: str, *, create: bool, readonly: bool):
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create:
            flags |= os.O_CREAT | os.O_EXCL
        self.disk = disk
        self.path = path
        self.fd = None                  # kernels fall back to their Python twins
        self._fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        self.pending: list[tuple[int, bytes]] = []   # (offset, bytes) in issue order

    # -- reads see the volatile writes over the durable file
    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(os.pread(self._fd, length, offset))
        buf += bytes(length - len(buf))
        end = offset + length
        for off, data in self.pending:
            lo, hi = max(off, offset), min(off + len(data), end)
            if lo < hi:
                buf[lo - offset:hi - offset] = data[lo - off:hi - off]
        return bytes(buf)

    def preadinto(self, buf, offset: int) -> None:
        view = memoryview(buf).cast("B")
        view[:] = self.pread(len(view), offset)

    # -- writes stay volatile until fsync
    def pwrite(self, data, offset: int) -> None:
        self.pending.append((offset, bytes(data)))
        self.disk.tick()

    def punch(self, offset: int, length: int) -> None:
        if length > 0:
            self.pwrite(bytes(length), offset)

    def write_zeros(self, offset: int, length: int) -> None:
        self.punch(offset, length)

    def copy(self, src: int, dst: int, length: int) -> None:
        self.pwrite(self.pread(length, src), dst)

    def copy_shared(self, src: int, dst: int, length: int) -> bool:
        return False        # a disk without reflinks: copies move bytes

    def preallocate(self, offset: int, length: int) -> bool:
        return True         # changes no byte: nothing to simulate

    def fsync(self) -> None:
        self.disk.tick()
        for off, data in self.pending:
            os.pwrite(self._fd, data, off)
        self.pending.clear()

    def datasync(self) -> None:
        self.fsync()

    def size(self) -> int:
        end = max((off + len(d) for off, d in self.pending), default=0)
        return max(os.fstat(self._fd).st_size, end)

    def truncate(self, size: int) -> None:
        """Size changes are taken as durable at once (a journaling file system's metadata)."""
        os.ftruncate(self._fd, size)
        self.pending = [(o, d[:max(0, size - o)]) for o, d in self.pending if o < size]

    def close(self) -> None:
        """Closing does not sync: the writes stay in the 'page cache' until a cut."""

    # -- the cut
    def cut(self, rng: random.Random) -> None:
        for off, data in self.pending:
            fate = rng.random()
            if fate < 0.35:
                self.disk.dropped += 1
                continue
            if fate < 0.7 and len(data) > SECTOR:
                self.disk.torn += 1
                self._write_some_sectors(rng, off, data)
                continue
            os.pwrite(self._fd, data, off)
        self.pending.clear()

    def _write_some_sectors(self, rng: random.Random, off: int, data: bytes) -> None:
        """A torn write: a random subset of its sectors reaches the platter."""
        for pos in range(0, len(data), SECTOR):
            if rng.random() < 0.5:
                os.pwrite(self._fd, data[pos:pos + SECTOR], off + pos)

    def close_real(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
