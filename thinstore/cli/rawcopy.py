"""Raw image copies between files and devices that keep holes as holes.

Import reads only the data segments of the source (SEEK_DATA/SEEK_HOLE), widened to chunk
boundaries so that each write covers whole chunks, in big blocks; chunks that are all zero
are not written, so they stay unmapped (the core's pwrite leaves a write that is all zeros
unmapped, but maps every chunk of a write that holds any data, zero chunks included).  Export writes only the device's mapped extents, skips
all-zero chunks within them, and sets the file's size with ftruncate, so an unmapped range
becomes a hole.  Both copy through one reused buffer: no per-block allocation.

A target that is not a regular file (a pipe, stdout as ``-``, a block device) cannot hold
holes; it gets every byte, zeros included, in order.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

from thinstore.errors import UsageError
from thinstore.units import format_size

BLOCK_SIZE = 4 << 20
EXTENT_WINDOW = 1 << 30
_ZEROS = bytes(BLOCK_SIZE)
_NO_SEEK_DATA = (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTTY, errno.ESPIPE)


def data_segments(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, end)`` of the ranges of ``fd`` below ``size`` that may hold data.

    Where the file system cannot tell (SEEK_DATA unsupported, a block device), the whole
    range counts as data; zero detection then still keeps zeros out of the pool.
    """
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only a hole remains
                return
            if err.errno not in _NO_SEEK_DATA:
                raise
            yield offset, size
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def align_segments(segments, align: int, size: int) -> Iterator[tuple[int, int]]:
    """Widen each segment to ``align`` boundaries (capped at ``size``) and merge overlaps."""
    pending = None
    for start, end in segments:
        start, end = start - start % align, min(size, -(-end // align) * align)
        if pending and start <= pending[1]:
            pending = (pending[0], max(pending[1], end))
            continue
        if pending:
            yield pending
        pending = (start, end)
    if pending:
        yield pending


def blocks(start: int, end: int, block: int = BLOCK_SIZE) -> Iterator[tuple[int, int]]:
    """Split ``[start, end)`` into pieces of at most ``block`` bytes ending on multiples of it."""
    while start < end:
        stop = min(end, (start // block + 1) * block)
        yield start, stop - start
        start = stop


def is_zero(buf: bytearray, length: int) -> bool:
    """True when the first ``length`` bytes of ``buf`` are zero.

    ``startswith`` on a memoryview is one memcmp without copying either side (slicing
    ``bytes`` or calling ``tobytes`` would copy the block first).
    """
    return _ZEROS.startswith(memoryview(buf)[:length])


def nonzero_runs(buf: bytearray, length: int, granule: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, length)`` of the runs of ``granule``-sized pieces of ``buf[:length]``
    that are not all zero (``start`` is a multiple of ``granule``; the last piece may be short).

    A block that holds a little data among zeros (a preallocated image, a block device,
    which SEEK_DATA cannot see into) then maps only the chunks with data, as a write of
    zeros over NBD does, instead of every chunk of the 4 MiB block.
    """
    if is_zero(buf, length):
        return
    view, run = memoryview(buf), None
    for start in range(0, length, granule):
        piece = min(granule, length - start)
        if not _ZEROS.startswith(view[start:start + piece]):
            run = (run[0], start + piece - run[0]) if run else (start, piece)
        elif run:
            yield run
            run = None
    if run:
        yield run


def import_file(fd: int, file_size: int, dev, progress) -> None:
    """Copy the data of ``fd`` into the fresh (all unmapped) device ``dev`` at the same offsets;
    chunks that would hold only zeros are not written, so they stay unmapped."""
    buf = bytearray(BLOCK_SIZE)
    view, done = memoryview(buf), 0
    segments = align_segments(data_segments(fd, file_size), dev.chunk_size, file_size)
    for seg_start, seg_end in segments:
        for offset, length in blocks(seg_start, seg_end):
            got = _read_full(fd, view[:length], offset)
            for start, run in nonzero_runs(buf, got, dev.chunk_size):
                dev.pwrite(view[start:start + run], offset + start)
            progress.advance(offset + length - done)
            done = offset + length
    progress.advance(file_size - done)


def import_stream(fd: int, dev, progress) -> None:
    """Copy a pipe into the fresh device ``dev`` from byte 0, skipping all-zero chunks.

    More bytes than the device holds is an error (data would be cut off), raised after the
    device is full; the caller then destroys the half-made volume.
    """
    buf = bytearray(BLOCK_SIZE)
    view, offset = memoryview(buf), 0
    while True:
        got = _read_full(fd, view, None)
        if got == 0:
            return
        if offset + got > dev.size:
            raise UsageError(f"the input is longer than the volume ({format_size(dev.size)}): "
                             "give a larger --size")
        for start, run in nonzero_runs(buf, got, dev.chunk_size):
            dev.pwrite(view[start:start + run], offset + start)
        offset += got
        progress.advance(got)


@contextlib.contextmanager
def _naming(fd: int):
    """Give an OS error on the image file its name: 'thinstore: File too large' alone does
    not say that the output file, not the pool, is the one that cannot grow."""
    try:
        yield
    except OSError as err:
        if err.filename is not None:
            raise
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = f"file descriptor {fd}"
        raise OSError(err.errno, err.strerror, name) from err


def _read_full(fd: int, view: memoryview, offset: int | None) -> int:
    """Fill ``view`` from ``offset`` (from the file position when None, as for a pipe);
    fewer bytes only at end of file."""
    with _naming(fd):
        return _read_loop(fd, view, offset)


def _read_loop(fd: int, view: memoryview, offset: int | None) -> int:
    got = 0
    while got < len(view):
        if offset is None:
            n = os.readv(fd, [view[got:]])
        else:
            n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def export_device(dev, fd: int, progress) -> None:
    """Copy ``dev`` to ``fd``: sparse into a regular file, every byte into anything else."""
    if stat.S_ISREG(os.fstat(fd).st_mode):
        _export_sparse(dev, fd, progress)
    else:
        _export_dense(dev, fd, progress)


def _export_sparse(dev, fd: int, progress) -> None:
    with _naming(fd):
        os.ftruncate(fd, 0)  # drop old blocks: the extents we skip must read as holes
        os.ftruncate(fd, dev.size)  # EFBIG: a 16T device on ext4
    buf = bytearray(BLOCK_SIZE)
    view = memoryview(buf)
    for offset, length, mapped in device_extents(dev):
        if mapped:
            for start, piece in blocks(offset, offset + length):
                dev.readinto(view[:piece], start)
                for at, run in nonzero_runs(buf, piece, dev.chunk_size):
                    _write_full(fd, view[at:at + run], start + at)
                progress.advance(piece)
        else:
            progress.advance(length)
    with _naming(fd):
        os.fsync(fd)


def _export_dense(dev, fd: int, progress) -> None:
    buf = bytearray(BLOCK_SIZE)
    view = memoryview(buf)
    for offset, length, mapped in device_extents(dev):
        for start, piece in blocks(offset, offset + length):
            if mapped:
                dev.readinto(view[:piece], start)
            _write_full(fd, view[:piece] if mapped else memoryview(_ZEROS)[:piece], None)
            progress.advance(piece)


def device_extents(dev) -> Iterator[tuple[int, int, bool]]:
    """The device's extents, asked for a window at a time so a huge device stays cheap."""
    for window_start in range(0, dev.size, EXTENT_WINDOW):
        window = min(EXTENT_WINDOW, dev.size - window_start)
        yield from dev.extents(window_start, window)


def _write_full(fd: int, view: memoryview, offset: int | None) -> None:
    """Write all of ``view`` at ``offset`` (or at the file position when None)."""
    with _naming(fd):
        _write_loop(fd, view, offset)


def _write_loop(fd: int, view: memoryview, offset: int | None) -> None:
    while len(view):
        n = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
        view = view[n:]
        if offset is not None:
            offset += n
