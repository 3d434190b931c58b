"""The export catalog: which devices a client may name, and how they look on the wire.

Every device of the pool is an export named by its device name (``vol``,
``vol@snap``); the catalog asks the pool each time, so a device created while
the server runs is exportable at once.  Snapshots, read-only devices and a
``--read-only`` server export with NBD_FLAG_READ_ONLY and without the write
command flags.
"""

from __future__ import annotations

from typing import NamedTuple

from thinstore.errors import NoSuchDevice
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
