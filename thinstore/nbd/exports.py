"""The export catalog: which devices a client may name, and how they look on the wire.

Every device of the pool is an export named by its device name (``vol``,
``vol@snap``); the catalog asks the pool each time, so a device created while
the server runs is exportable at once.  Snapshots, read-only devices and a
``--read-only`` server export with NBD_FLAG_READ_ONLY and without the write
command flags.
"""

from __future__ import annotations

from typing import NamedTuple

from thinstore.diff import FANOUT, DeviceMap, DiffCounters, diff_maps
from thinstore.errors import NoSuchDevice, ThinstoreError
from thinstore.nbd import protocol as P

_BASE_FLAGS = P.TF_HAS_FLAGS | P.TF_SEND_FLUSH | P.TF_CAN_MULTI_CONN | P.TF_SEND_CACHE
_WRITE_FLAGS = (P.TF_SEND_FUA | P.TF_SEND_TRIM | P.TF_SEND_WRITE_ZEROES
                | P.TF_SEND_FAST_ZERO)


class ExportInfo(NamedTuple):
    """What the handshake needs of a device (pool.info would also count its usage)."""

    name: str
    kind: str
    size: int
    read_only: bool


class Catalog:
    """Maps export names to pool devices for one server."""

    def __init__(self, pool, read_only: bool = False):
        self.pool, self.read_only = pool, read_only
        self.diff_counters = DiffCounters()   # what thinstore:diff: queries cost

    def list(self):
        return self.pool.list()

    def describe(self, name: str) -> ExportInfo:
        """An export's name, kind, size and mode; NoSuchDevice/InvalidName if there is none.

        Opens a handle rather than calling ``pool.info``, whose usage count walks the
        whole block map: a client's INFO must not cost that per device.
        """
        with self.open(name) as dev:
            return ExportInfo(dev.name, dev.kind, dev.size, dev.read_only)

    def open(self, name: str):
        if not name:
            raise NoSuchDevice("no default export: name a device (see NBD_OPT_LIST)")
        return self.pool.open_device(name)

    def transmission_flags(self, target, structured: bool) -> int:
        """Flags for a DeviceInfo or an open Device (both have ``read_only``)."""
        flags = _BASE_FLAGS | (P.TF_SEND_DF if structured else 0)
        if self.read_only or target.read_only:
            return flags | P.TF_READ_ONLY
        return flags | _WRITE_FLAGS

    def description(self, info) -> str:
        mode = "read-only " if self.read_only or info.read_only else ""
        return f"thinstore {mode}{info.kind} of {info.size} bytes"

    def preferred_block(self) -> int:
        return max(4096, min(int(self.pool.chunk_size), P.MAX_PAYLOAD))

    # -- thinstore:diff:BASE (docs/nbd.md) ---------------------------------------
    def diff_bases(self, export: str) -> list[str]:
        """The bases listed for `export`: the other snapshots of its volume."""
        volume = export.split("@", 1)[0]
        return [i.name for i in self.pool.list()
                if i.kind == "snapshot" and i.name.startswith(volume + "@") and i.name != export]

    def is_diff_base(self, name: str) -> bool:
        """Any snapshot of the pool may be asked for by name."""
        try:
            with self.pool.open_device(name) as dev:     # info() would count usage
                return dev.kind == "snapshot"
        except ThinstoreError:
            return False

    def changed_extents(self, device, base: str, offset: int, length: int):
        """[(length, changed)] covering [offset, offset+length) of `device`: changed where
        its block map differs from snapshot `base`'s (chunk granularity, diff.py).

        Only the directory slots the range covers are looked at, and only pages whose
        ids differ are read: the cost is the pages that differ (diff_counters), not
        the device size.
        """
        pool = self.pool
        span = FANOUT * pool.chunk_size
        first, end = offset // span, -(-(offset + length) // span)
        with pool.lock:
            mine = DeviceMap(*pool.map_view(device.name, first, end - first))
            theirs = DeviceMap(*pool.map_view(base, first, end - first))
            ranges = diff_maps(mine, theirs, self.diff_counters)
        return _cover(ranges, first * span, offset, length)


def _cover(ranges, shift: int, offset: int, length: int) -> list[tuple[int, bool]]:
    """Changed ranges (relative to `shift`) clipped to the request, gaps filled."""
    out, pos, end = [], offset, offset + length
    for r in ranges:
        lo, hi = max(pos, r.offset + shift), min(end, r.offset + shift + r.length)
        if hi <= lo:
            continue
        if lo > pos:
            out.append((lo - pos, False))
        out.append((hi - lo, True))
        pos = hi
    if pos < end:
        out.append((end - pos, False))
    return out
