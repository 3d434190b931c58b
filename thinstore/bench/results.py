"""A benchmark run's figures: recorded per request, summarised into one dict.

Every engine (in-process threads, the built-in NBD client, fio) ends in the
same result dict, so the text output, ``--json``, the comparison and the
report read one shape::

    {"engine": str, "elapsed_s": float,
     "read" | "write" | "total": {"ops": int, "bytes": int, "iops": float,
         "bytes_per_s": float, "latency_us": {"mean", "p50", "p99", "p99.9", "max"}},
     "flushes": {"ops": int, "latency_us": {...}},
     "histogram": {"edges_us": [float], "read": [int], "write": [int]},
     "timeline": {"interval_s": float, "t_s": [float], "iops": [float],
                  "bytes_per_s": [float]}}

``iops`` is ``ops / elapsed_s`` and ``bytes_per_s`` is ``bytes / elapsed_s``,
so ``bytes == iops * io_size * elapsed_s`` for fixed-size requests.  Latency
is per request, from issue to completion as the engine sees it (for fio:
its completion latency, ``clat``); the histogram's bins are log-spaced, 20
per decade from 1 us to 10 s.  The timeline's points are the ends of
``interval_s`` steps (fio's own sample times with fio) and the IOPS over each.
"""

from __future__ import annotations

from array import array

import numpy as np

EDGES_US = np.logspace(0, 7, 141)
PERCENTILES = (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9))
KINDS = ("read", "write")


class Recorder:
    """What one worker thread saw: latency and completion time of each request (ns).

    Appending to an ``array('q')`` costs about what a list append does and keeps
    8 bytes per number, so a million requests take 16 MB, not 60.
    """

    __slots__ = ("lat", "end", "flush_lat", "ops")

    def __init__(self):
        self.lat = (array("q"), array("q"))       # [read, write]
        self.end = (array("q"), array("q"))
        self.flush_lat = array("q")
        self.ops = 0          # read by the progress line while the run goes on


def summarise(recorders: list[Recorder], elapsed: float, io_size: int, engine: str) -> dict:
    """The result dict of a run from its threads' recorders."""
    elapsed = max(elapsed, 1e-9)
    result = {"engine": engine, "elapsed_s": elapsed, "io_size": io_size}
    lats, ends = [], []
    for kind in (0, 1):
        lat = _concat([r.lat[kind] for r in recorders])
        end = _concat([r.end[kind] for r in recorders])
        lats.append(lat)
        ends.append(end)
        result[KINDS[kind]] = side(len(lat), len(lat) * io_size, elapsed, lat / 1000.0)
    both = np.concatenate(lats)
    result["total"] = side(len(both), len(both) * io_size, elapsed, both / 1000.0)
    flush = _concat([r.flush_lat for r in recorders])
    result["flushes"] = {"ops": len(flush), "latency_us": latency(flush / 1000.0)}
    result["histogram"] = {"edges_us": EDGES_US.tolist(),
                           "read": histogram(lats[0] / 1000.0),
                           "write": histogram(lats[1] / 1000.0)}
    result["timeline"] = timeline(np.concatenate(ends) / 1e9, elapsed, io_size)
    return result


def side(ops: int, nbytes: int, elapsed: float, lat_us) -> dict:
    """One direction's figures; ``lat_us`` an array of latencies in microseconds."""
    return {"ops": int(ops), "bytes": int(nbytes), "iops": ops / elapsed,
            "bytes_per_s": nbytes / elapsed, "latency_us": latency(lat_us)}


def latency(lat_us) -> dict:
    """mean, p50, p99, p99.9 and max in microseconds; all None without samples."""
    if not len(lat_us):
        return {"mean": None, **{name: None for name, _ in PERCENTILES}, "max": None}
    values = np.percentile(lat_us, [q for _, q in PERCENTILES])
    return {"mean": float(np.mean(lat_us)),
            **{name: float(v) for (name, _), v in zip(PERCENTILES, values)},
            "max": float(np.max(lat_us))}


def histogram(lat_us, weights=None) -> list[int]:
    """Counts per bin of :data:`EDGES_US` (samples beyond the edges go to the end bins)."""
    clipped = np.clip(np.asarray(lat_us, dtype=float), EDGES_US[0], EDGES_US[-1])
    counts, _ = np.histogram(clipped, bins=EDGES_US, weights=weights)
    return [int(c) for c in counts]


def timeline_interval(elapsed: float) -> float:
    """Bin width for throughput over time: 0.1 s steps, at most ~120 points."""
    return max(0.1, round(elapsed / 120, 1))


def timeline(end_s, elapsed: float, io_size: int) -> dict:
    """IOPS and bytes/s per interval from completion times (seconds from the start)."""
    interval = timeline_interval(elapsed)
    bins = max(1, int(np.ceil(elapsed / interval)))
    counts, _ = np.histogram(end_s, bins=bins, range=(0, bins * interval))
    iops = (counts / interval).tolist()
    return {"interval_s": interval, "t_s": [round((i + 1) * interval, 6) for i in range(bins)],
            "iops": iops, "bytes_per_s": [v * io_size for v in iops]}


def _concat(arrays) -> np.ndarray:
    parts = [np.frombuffer(a, dtype=np.int64) for a in arrays if len(a)]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def counters_delta(before: dict, after: dict) -> dict:
    """``after - before`` for every numeric counter either has (whatever keys the
    pool reports: chunks allocated, copied, commits, log writes, ...), but the
    maxima since the pool opened (``*_max``), which have no difference to give."""
    keys = list(dict.fromkeys([*before, *after]))
    return {k: after.get(k, 0) - before.get(k, 0) for k in keys
            if not k.endswith("_max") and isinstance(after.get(k, 0), (int, float))
            and isinstance(before.get(k, 0), (int, float))}
