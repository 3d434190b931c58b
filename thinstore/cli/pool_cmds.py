"""Pool-wide commands: ``init`` creates a pool, ``status`` reports its space and state."""

from __future__ import annotations

from thinstore.cli.context import open_pool, pool_path
from thinstore.cli.output import print_json, size_cell
from thinstore.errors import UsageError
from thinstore.units import parse_size

DEFAULT_CAPACITY = "16G"
DEFAULT_CHUNK_SIZE = "64K"
MIN_CHUNK, MAX_CHUNK = 4 << 10, 1 << 20


def register(subparsers) -> None:
    init = subparsers.add_parser("init", help="create a pool in DIR",
                                 description="Create a new pool in the --pool directory.")
    init.add_argument("--capacity", type=parse_size, default=DEFAULT_CAPACITY, metavar="SIZE",
                      help=f"data capacity (default {DEFAULT_CAPACITY}); volumes may exceed it in sum")
    init.add_argument("--chunk-size", type=chunk_size, default=DEFAULT_CHUNK_SIZE, metavar="SIZE",
                      help=f"allocation unit, a power of two 4K..1M (default {DEFAULT_CHUNK_SIZE})")
    init.set_defaults(func=cmd_init)

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

    Pool.create(pool_path(args), capacity=args.capacity, chunk_size=args.chunk_size).close()
    return 0


def cmd_status(args) -> int:
    with open_pool(args) as pool:
        status = dict(pool.status())
    status.setdefault("pool", pool_path(args))
    if args.json:
        print_json(status)
    else:
        print_status(status, args.parsable)
    return 0


STATUS_SIZES = ("capacity", "used", "free", "chunk_size")


def print_status(status: dict, parsable: bool) -> None:
    """``key: value`` lines, sizes human unless parsable; keys the core adds later show too."""
    used, capacity = status.get("used"), status.get("capacity")
    lines = {"pool": status.get("pool")}
    for key in STATUS_SIZES:
        lines[key] = size_cell(status.get(key), parsable)
    if used is not None and capacity:
        lines["used"] += f" ({100 * used / capacity:.1f}%)"
    lines["devices"] = status.get("devices")
    lines["low water"] = _low_water(status, parsable)
    for key, value in status.items():
        if key not in lines and key not in ("low_water", "low_water_crossed"):
            lines[key] = value
    width = max(len(key) for key in lines) + 1
    for key, value in lines.items():
        print(f"{(key.replace('_', ' ') + ':').ljust(width)} {_plain(value)}")


def _low_water(status: dict, parsable: bool) -> str:
    mark, crossed = status.get("low_water"), status.get("low_water_crossed")
    if isinstance(mark, int) and not isinstance(mark, bool):
        text = size_cell(mark, parsable) + " free"
    else:
        text = "-" if mark is None else str(mark)
    state = "CROSSED: grow the pool or free space" if crossed else "ok"
    return f"{text} ({state})"


def _plain(value) -> str:
    if isinstance(value, (list, tuple)):
        return str(len(value))
    return "-" if value is None else str(value)
