"""Per-export I/O counters kept by the NBD server, read by ``thinstore iostat``.

Each connection counts into plain lists of integers; nothing on the request
path takes a lock for them.  Requests run in the connection's reader thread
count into ``inline`` (only that thread writes it); requests run by the
connection's workers (FLUSH, FUA, TRIM, large I/O: already the slow path)
count into ``pooled`` under a per-connection lock.  A reader of the counters
(the control socket's ``iostat`` op, another thread) sums the lists on demand:
reading an int under the GIL sees either the old or the new value, never a
torn one, so a sample may miss the request in flight and nothing else.

When a connection ends its counts are folded into its export's retired
totals, so an export's figures only grow while the server runs.

Fields (all cumulative since the server started):

==================  ===========================================================
``read_ops``        READ requests completed successfully
``read_bytes``      bytes those READs returned
``read_ns``         summed service time of the READs timed, nanoseconds
``read_timed``      how many READs were timed (``read_ns / read_timed`` = mean)
``write_ops``       WRITE requests completed successfully (with or without FUA)
``write_bytes``     bytes those WRITEs carried
``write_ns``        summed service time of the WRITEs timed, nanoseconds
``write_timed``     how many WRITEs were timed
``flush_ops``       FLUSH requests completed successfully
``flush_ns``        summed service time of those FLUSHes, nanoseconds
``other_ops``       TRIM, WRITE_ZEROES, CACHE and BLOCK_STATUS completed
``errors``          requests answered with an error
==================  ===========================================================

Service time runs from the request header being parsed (after a WRITE's
payload is in) to its reply being queued: the server's own work, not the
network's nor the client's queueing.  Reading the clock costs about as much as
the rest of the counting together (0.1 us a call on a VM, next to the 5-10 us
a cached 4 KiB request takes), so the hot path (small READ/WRITE without
flags) times one request in eight of each direction and every other request
is timed; the native request loop (nbd/burst.py), whose clock costs far less,
times every request it serves. The mean is over the requests timed.
"""

from __future__ import annotations

import threading

FIELDS = ("read_ops", "read_bytes", "read_ns", "read_timed",
          "write_ops", "write_bytes", "write_ns", "write_timed",
          "flush_ops", "flush_ns", "other_ops", "errors")
READ, WRITE = 0, 4          # a direction's fields are at +0 ops, +1 bytes, +2 ns, +3 timed
FLUSH_OPS, FLUSH_NS, OTHER_OPS, ERRORS = 8, 9, 10, 11
SAMPLE_MASK = 7             # the hot path times one request in 8 (see the module doc)


def zeros() -> list[int]:
    return [0] * len(FIELDS)


class ConnectionStats:
    """The counters of one connection: ``inline`` (reader thread only) and
    ``pooled`` (workers, under ``lock``)."""

    __slots__ = ("inline", "pooled", "lock")

    def __init__(self):
        self.inline = zeros()
        self.pooled = zeros()
        self.lock = threading.Lock()

    def total(self) -> list[int]:
        return [a + b for a, b in zip(self.inline, self.pooled)]


class ExportStats:
    """Counters of every export: retired totals plus the live connections' counts."""

    def __init__(self):
        self._lock = threading.Lock()
        self._retired: dict[str, list[int]] = {}

    def retire(self, name: str, conn: ConnectionStats) -> None:
        """Fold a finished connection's counts into ``name``'s totals."""
        counts = conn.total()
        with self._lock:
            into = self._retired.setdefault(name, zeros())
            for i, value in enumerate(counts):
                into[i] += value

    def snapshot(self, live: list[tuple[str, ConnectionStats]]) -> dict[str, dict[str, int]]:
        """``{export: {field: value}}`` for every export that has counted anything,
        summing the retired totals and ``live`` (name, connection) pairs."""
        with self._lock:
            sums = {name: list(values) for name, values in self._retired.items()}
        for name, conn in live:
            into = sums.setdefault(name, zeros())
            for i, value in enumerate(conn.total()):
                into[i] += value
        return {name: dict(zip(FIELDS, values)) for name, values in sums.items()}
