"""Raw images in and out: ``import`` makes a volume from a file, ``export`` writes one back.

Both keep sparseness (see rawcopy.py) and show a progress bar only on a terminal.
"""

from __future__ import annotations

import os
import stat
import sys

from thinstore.cli import files, rawcopy
from thinstore.cli.context import open_pool
from thinstore.cli.device_cmds import note_partial_sector
from thinstore.cli.names import device_name, new_volume_name
from thinstore.errors import PoolFull, ReadOnlyDevice, UsageError
from thinstore.progress import Progress
from thinstore.units import format_size, parse_size


def register(subparsers) -> None:
    p = subparsers.add_parser("import", help="create a volume from a raw image file")
    p.add_argument("name", type=_import_target, metavar="NAME")
    p.add_argument("file", metavar="FILE",
                   help="raw image: a file or block device; - or a pipe needs --size")
    p.add_argument("--size", "-s", type=parse_size, metavar="SIZE",
                   help="volume size (default: the file's size; never smaller)")
    p.set_defaults(func=cmd_import)

    p = subparsers.add_parser("export", help="write a device to a sparse raw image file")
    p.add_argument("name", type=device_name, metavar="NAME[@SNAP]")
    p.add_argument("file", metavar="FILE", help="output file (overwritten), or - for stdout")
    p.set_defaults(func=cmd_export)


def _import_target(text: str) -> str:
    """Import creates a volume: a snapshot name is refused the way a write to one is."""
    if "@" in text:
        device_name(text)
        raise ReadOnlyDevice(f"{text}: snapshots are read-only; import into a new volume "
                             "(NAME without @), then snapshot it")
    return new_volume_name(text)


def cmd_import(args) -> int:
    files.check_input(args.file)
    if args.size is None and args.file != "-" and _is_stream(args.file):
        raise UsageError(f"{args.file}: a pipe or character device has no size: give the "
                         "volume's --size (e.g. the source's 'thinstore list -Hp -o size NAME')")
    fd = os.dup(sys.stdin.fileno()) if args.file == "-" else os.open(args.file, os.O_RDONLY)
    try:
        file_size = _seekable_size(fd)
        if file_size is None:
            return _import_stream(args, fd)
        _warn_if_image_format(fd, args.file)
        size = _volume_size(args.size, file_size, args.file)
        with open_pool(args) as pool:
            _fits(pool, fd, file_size, args.file, args.name)
            _import_into_new_volume(pool, args.name, size, fd, file_size)
    finally:
        os.close(fd)
    return 0


#: magics of image formats whose bytes are not the disk they describe (qemu's docs)
_IMAGE_MAGICS = ((b"QFI\xfb", "qcow2"), (b"conectix", "vpc (VHD)"), (b"vhdxfile", "vhdx"),
                 (b"KDMV", "vmdk"), (b"<<< Oracle VM VirtualBox Disk Image >>>", "vdi"))


def _warn_if_image_format(fd: int, path: str) -> None:
    """import takes raw bytes: a qcow2 (or other format) file imported as is gives a
    volume of the file's bytes, not of the disk it holds; say so, and how to convert."""
    head = os.pread(fd, 64, 0)
    for magic, name in _IMAGE_MAGICS:
        if head.startswith(magic):
            print(f"thinstore import: warning: {path} looks like a {name} image; import "
                  f"takes raw bytes, so the volume holds the file, not the disk in it "
                  f"(convert first: qemu-img convert -O raw {path} disk.raw)", file=sys.stderr)
            return


def _is_stream(path: str) -> bool:
    """A FIFO, socket or character device: read as a stream (opening a FIFO would wait
    for a writer, so this is asked of the path before it is opened)."""
    mode = os.stat(path).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISSOCK(mode)


def _seekable_size(fd: int) -> int | None:
    """The size of a file or block device; None for a pipe, socket, terminal or character
    device (/dev/zero seeks, to 0: it would make an empty volume)."""
    if stat.S_ISCHR(os.fstat(fd).st_mode):
        return None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    except OSError:
        return None


def _import_stream(args, fd: int) -> int:
    """``export vm - | import vm - --size S``: a pipe has no size to read, so --size says it;
    the stream fills the volume from byte 0 and may be shorter (the rest reads zero)."""
    if os.isatty(fd):
        raise UsageError(f"{args.file} is a terminal: pipe a raw image in")
    if args.size is None:
        raise UsageError(f"{args.file}: a pipe has no size: give the volume's --size "
                         "(e.g. the source's 'thinstore list -Hp -o size NAME')")
    with open_pool(args) as pool:
        _import_into_new_volume(pool, args.name, args.size, fd, None)
    return 0


def _volume_size(requested: int | None, file_size: int, path: str) -> int:
    if requested is None:
        if file_size == 0:
            raise UsageError(f"{path} is empty: a volume needs a size above 0; give --size "
                             "to import it as an empty volume of that size")
        return file_size
    if requested < file_size:
        raise UsageError(f"--size {format_size(requested)} is smaller than {path} "
                         f"({format_size(file_size)}): data would be cut off")
    return requested


def _fits(pool, fd: int, file_size: int, path: str, name: str) -> None:
    """Refuse, before writing anything, an image whose data (its allocated extents, to
    whole chunks) cannot fit the pool's free space: 100M into a 64M pool wrote 64M and
    only then failed.  All-zero chunks inside the extents are not written, so an image
    may need less than this; it never needs more."""
    if not stat.S_ISREG(os.fstat(fd).st_mode):   # a block device: no extents to count
        return
    status = pool.status()
    chunk, free = status["chunk_size"], status["free"]
    need = sum(end - start for start, end in
               rawcopy.align_segments(rawcopy.data_segments(fd, file_size), chunk, file_size))
    need = -(-need // chunk) * chunk
    if need > free:
        raise PoolFull(f"cannot import {path} into {name!r}: it holds up to "
                       f"{format_size(need)} of data but the pool has {format_size(free)} "
                       f"free, so it would be full: grow the pool first ('thinstore grow "
                       f"+{format_size(need - free)}' or more) or free space; nothing was "
                       "written")


def _import_into_new_volume(pool, name: str, size: int, fd: int, file_size: int | None) -> None:
    """Create ``name``, copy, flush; on any failure destroy the half-made volume."""
    pool.create_volume(name, size)
    note_partial_sector(name, size)
    try:
        dev = pool.open_device(name)
        try:
            with Progress(file_size or size, f"import {name}") as progress:
                if file_size is None:
                    rawcopy.import_stream(fd, dev, progress)
                else:
                    rawcopy.import_file(fd, file_size, dev, progress)
            dev.flush()
        finally:
            dev.close()
    except BaseException:
        pool.destroy(name, force=True)
        raise


def cmd_export(args) -> int:
    """A regular FILE is written beside and renamed only when complete (files.py): a failed
    export leaves the old file as it was, never a full-size image of holes."""
    if args.file == "-":
        files.refuse_terminal(sys.stdout, "a raw image", "redirect it (> FILE) or pipe it")
    files.check_output(args.file)
    with open_pool(args) as pool:
        dev = pool.open_device(args.name)
        try:
            progress = Progress(dev.size, f"export {args.name}")
            with files.output(args.file, "a raw image", "redirect it or pipe it") as out, \
                    progress:
                rawcopy.export_device(dev, out.fileno(), progress)
        finally:
            dev.close()
    return 0
