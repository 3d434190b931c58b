"""Raw images in and out: ``import`` makes a volume from a file, ``export`` writes one back.

Both keep sparseness (see rawcopy.py) and show a progress bar only on a terminal.
"""

from __future__ import annotations

import os
import sys

from thinstore.cli import rawcopy
from thinstore.cli.context import open_pool
from thinstore.cli.names import device_name, volume_name
from thinstore.errors import ReadOnlyDevice, UsageError
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
    return volume_name(text)


def cmd_import(args) -> int:
    fd = os.dup(sys.stdin.fileno()) if args.file == "-" else os.open(args.file, os.O_RDONLY)
    try:
        file_size = _seekable_size(fd)
        if file_size is None:
            return _import_stream(args, fd)
        size = _volume_size(args.size, file_size, args.file)
        with open_pool(args) as pool:
            _import_into_new_volume(pool, args.name, size, fd, file_size)
    finally:
        os.close(fd)
    return 0


def _seekable_size(fd: int) -> int | None:
    """The size of a file or block device; None for a pipe, socket or terminal."""
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
        return file_size
    if requested < file_size:
        raise UsageError(f"--size {format_size(requested)} is smaller than {path} "
                         f"({file_size} bytes): data would be cut off")
    return requested


def _import_into_new_volume(pool, name: str, size: int, fd: int, file_size: int | None) -> None:
    """Create ``name``, copy, flush; on any failure destroy the half-made volume."""
    pool.create_volume(name, size)
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
    with open_pool(args) as pool:
        dev = pool.open_device(args.name)
        try:
            progress = Progress(dev.size, f"export {args.name}")
            with _open_output(args.file) as out, progress:
                rawcopy.export_device(dev, out.fileno(), progress)
        finally:
            dev.close()
    return 0


def _open_output(path: str):
    """The output file, created or truncated; ``-`` is stdout (left open afterwards)."""
    if path == "-":
        return os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT, 0o666), "wb", buffering=0)
