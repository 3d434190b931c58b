"""Pool-wide commands: ``init`` creates a pool, ``grow`` enlarges it, ``status`` reports it."""

from __future__ import annotations

import contextlib
import errno
import os

from thinstore.cli import holds
from thinstore.cli.context import _opening, open_pool, pool_path
from thinstore.cli.output import print_json, size_cell
from thinstore.errors import UsageError
from thinstore.units import format_size, parse_size

DEFAULT_CAPACITY = "16G"
DEFAULT_CHUNK_SIZE = "64K"
MIN_CHUNK, MAX_CHUNK = 4 << 10, 1 << 20


def register(subparsers) -> None:
    init = subparsers.add_parser("init", help="create a pool in DIR",
                                 description="Create a new pool in the --pool directory.")
    init.add_argument("--capacity", type=parse_size, default=None, metavar="SIZE",
                      help=f"data capacity (default {DEFAULT_CAPACITY}, or the whole "
                      "--data-device); volumes may exceed it in sum")
    init.add_argument("--chunk-size", type=chunk_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                      help=f"allocation unit, a power of two 4K..1M (default {DEFAULT_CHUNK_SIZE})")
    init.add_argument("--no-data-checksums", dest="data_checksums", action="store_false",
                      help="keep no per-chunk checksums (reads are then not verified; "
                      "scrub finds nothing); fixed for the pool's life")
    init.add_argument("--data-device", metavar="DEV",
                      help="keep the data on this raw block device instead of a file in DIR "
                      "(capacity defaults to the whole device); for pools larger than a "
                      "file system's largest file (16T on ext4)")
    init.add_argument("--force", action="store_true",
                      help="with --data-device: use a device that holds a file system, a "
                      "partition table or another signature blkid knows (it is overwritten)")
    init.set_defaults(func=cmd_init)

    grow = subparsers.add_parser("grow", help="enlarge the pool's capacity",
                                 description="Set the pool's capacity to SIZE, or add to it "
                                 "with +SIZE. A pool never shrinks.")
    grow.add_argument("size", metavar="[+]SIZE", help="new capacity, or +SIZE to add")
    grow.set_defaults(func=cmd_grow)

    upgrade = subparsers.add_parser(
        "upgrade", help="rewrite an older pool's metadata in this version's format",
        description="Rewrite the metadata tree of a pool made by an older thinstore in the "
        "current on-disk format (the data is not moved). It is one commit: a crash leaves "
        "the pool in the old format or the new, never between. Older thinstore versions "
        "cannot open the pool afterwards.")
    upgrade.set_defaults(func=cmd_upgrade)

    status = subparsers.add_parser("status", help="show capacity, usage and state of the pool")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument("-p", "--parsable", action="store_true", help="exact byte counts")
    status.set_defaults(func=cmd_status)


def chunk_size(text: str) -> int:
    """A chunk size: a power of two from 4K to 1M (the range the block maps are built for)."""
    size = parse_size(text)
    if not MIN_CHUNK <= size <= MAX_CHUNK or size & (size - 1):
        raise UsageError(f"invalid chunk size {text!r}: use a power of two from 4K to 1M, e.g. 64K")
    return size


def cmd_init(args) -> int:
    from thinstore import Pool

    path = pool_path(args)
    if args.data_device and not args.force:
        _refuse_a_device_in_use(args.data_device)
    with _undone_on_failure(path):
        capacity = args.capacity
        if capacity is None and not args.data_device:
            capacity = parse_size(DEFAULT_CAPACITY)
        with Pool.create(path, capacity=capacity, chunk_size=args.chunk_size,
                         data_checksums=args.data_checksums,
                         data_device=args.data_device) as pool:
            made = pool.capacity
    if capacity is not None:
        _note_rounded(capacity, made, args.chunk_size)
    return 0


def _refuse_a_device_in_use(device: str) -> None:
    """A device with a file system, a partition table or a RAID/LVM member signature on
    it is someone's data: init would overwrite it (its label at the start, then data),
    so refuse unless --force, as mkfs, pvcreate and zpool create do."""
    import shutil
    import subprocess
    from thinstore.storage import DATA_LABEL, DATA_LABEL_MAGIC
    try:
        with open(device, "rb") as f:
            head = f.read(DATA_LABEL.size)
    except OSError:
        return                          # Pool.create says what is wrong with the path
    if head.startswith(DATA_LABEL_MAGIC):
        owner = DATA_LABEL.unpack(head.ljust(DATA_LABEL.size, b"\0"))[4].hex()
        raise UsageError(f"{device} holds the data of thinstore pool {owner}: init would "
                         "overwrite it; if that pool is not needed, pass --force")
    if shutil.which("blkid") is None:
        return
    found = subprocess.run(["blkid", "-p", "-o", "export", device], capture_output=True,
                           text=True, timeout=60)
    if found.returncode != 0:           # 2: nothing recognised
        return
    fields = dict(line.split("=", 1) for line in found.stdout.splitlines() if "=" in line)
    what = (f"a signature of type {fields['TYPE']}" if "TYPE" in fields else
            f"a {fields['PTTYPE']} partition table" if "PTTYPE" in fields else "a signature")
    raise UsageError(f"{device} holds {what} (blkid): init would overwrite it; if its data "
                     f"is not needed, pass --force (or clear it first: wipefs -a {device})")


def _note_rounded(asked: int, made: int, chunk: int) -> None:
    """The pool holds whole chunks: say when the capacity asked for was rounded up to
    them (as lvcreate says 'Rounding up size to full physical extent')."""
    if made != asked:
        from thinstore.cli.device_cmds import note
        note(f"capacity {_exact(asked)} rounded up to {_exact(made)}, a whole number of "
             f"{format_size(chunk)} chunks")


def _exact(nbytes: int) -> str:
    """'128K' where that is exact, else '1000000 bytes' (format_size rounds to 3 digits)."""
    text = format_size(nbytes)
    try:
        return text if parse_size(text) == nbytes else f"{nbytes} bytes"
    except UsageError:         # '1.08M' is no whole number of bytes
        return f"{nbytes} bytes"


@contextlib.contextmanager
def _undone_on_failure(path: str):
    """A failed init removes what it made (files, and the directory if it made that), so
    ``init`` can simply be run again; a file that was there before is never touched.

    Without this, a capacity larger than the file system's largest file (EFBIG: 100T on
    ext4) left ``data`` and ``lock`` behind, and the next init said 'File exists'.
    """
    from thinstore.storage import is_rados
    if is_rados(path):
        yield
        return
    existed = os.path.isdir(path)
    before = set(os.listdir(path)) if existed else set()
    try:
        yield
    except BaseException as err:
        made = set(os.listdir(path)) - before if os.path.isdir(path) else set()
        for name in made:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(path, name))
        if not existed:
            with contextlib.suppress(OSError):
                os.rmdir(path)
        if isinstance(err, OSError) and err.errno == errno.EFBIG:
            raise OSError(err.errno, f"{err.strerror}: the file system cannot hold a data file "
                          "that large (ext4's limit is 16T with 4K blocks); keep the data on "
                          "a raw block device (--data-device DEV), or use a smaller "
                          "--capacity (grow it later), or put the pool on a file system "
                          "with larger files (XFS, btrfs)",
                          err.filename or os.path.join(path, "data")) from err
        raise


def cmd_grow(args) -> int:
    relative = args.size.startswith("+")
    size = parse_size(args.size[1:] if relative else args.size)
    with open_pool(args) as pool:
        asked = pool.capacity + size if relative else size
        try:
            pool.grow(asked)
        except OSError as err:
            if err.errno != errno.EFBIG:
                raise
            raise OSError(err.errno, f"{err.strerror}: the file system cannot hold a data "
                          "file that large (ext4: 16T); the pool keeps its capacity. Keep "
                          "the pool's data on XFS or btrfs, or on a raw block device "
                          "('init --data-device'), to grow it further",
                          err.filename or os.path.join(pool.path, "data")) from err
        made, chunk = pool.capacity, pool.chunk_size
    _note_rounded(asked, made, chunk)
    return 0


def cmd_upgrade(args) -> int:
    from thinstore import Pool
    from thinstore.format import VERSION

    path = pool_path(args)
    from thinstore.cli.context import connect
    remote = connect(path)
    if remote is not None:           # a server opened it: it is in this format already
        remote.close()
        print(f"pool {path} is in format {VERSION} already (it is being served)")
        return 0
    with _opening(path), Pool.open(path, upgrade=True) as pool:
        before = pool.md.loaded_version
    if before == VERSION:
        print(f"pool {path} is in format {VERSION} already")
    else:
        print(f"pool {path}: upgraded from format {before} to {VERSION}")
    return 0


def cmd_status(args) -> int:
    with open_pool(args) as pool:
        status = dict(pool.status())
        held = holds.holds_of(pool)
    if held:        # only then: a pool no frontend uses shows what it always did
        status["holds"] = [h.to_dict() for h in held]
    if args.json:
        print_json(status)
    else:
        print_status(status, args.parsable)
    return 0


STATUS_SIZES = {"capacity", "used", "free", "freeing", "chunk_size", "metadata_bytes"}
STATUS_ORDER = ("path", "capacity", "used", "free", "freeing", "chunk_size", "devices",
                "holds", "pending_receives", "low_water", "backend", "data_checksums", "metadata_bytes",
                "generation", "uuid")


def print_status(status: dict, parsable: bool) -> None:
    """``key: value`` lines in a fixed order, sizes human unless parsable.

    Keys the core adds later are printed after the known ones, so nothing is hidden.
    """
    lines = {key: _status_value(status, key, parsable) for key in STATUS_ORDER
             if key in status and (key != "pending_receives" or status[key])}
    lines.update((key, _plain(value)) for key, value in status.items()
                 if key not in lines and key not in ("low_water_crossed", "pending_receives"))
    width = max(len(key) for key in lines) + 2
    for key, value in lines.items():
        print(f"{(key.replace('_', ' ') + ':').ljust(width)}{value}")


def _status_value(status: dict, key: str, parsable: bool) -> str:
    value = status[key]
    if key in STATUS_SIZES:
        text = size_cell(value, parsable)
        if key == "used" and status.get("capacity"):
            text += f" ({100 * value / status['capacity']:.1f}%)"
        return text
    if key == "low_water":
        return _low_water(value, status.get("low_water_crossed"))
    if key == "pending_receives":
        return pending_text(value, parsable) or "none"
    if key == "holds":
        from thinstore.cli.holds import summary
        from thinstore.frontends.holds import Hold
        return summary([Hold.from_dict(h) for h in value])
    return _plain(value)


def pending_text(pending: dict, parsable: bool = False) -> str:
    """``vol (9M held)``: interrupted receives, which list leaves out but which hold space
    until 'receive --resume' finishes them or 'receive --abort' drops them."""
    return ", ".join(f"{name} ({size_cell(held, parsable)} held)"
                     for name, held in sorted((pending or {}).items()))


def _low_water(mark, crossed) -> str:
    """The mark is the used fraction of capacity that triggers the warning."""
    text = f"{mark:.0%} used" if isinstance(mark, float) else _plain(mark)
    return text + (" (CROSSED: grow the pool or free space)" if crossed else " (not reached)")


def _plain(value) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    return "-" if value is None else str(value)
