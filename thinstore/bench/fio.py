"""fio as an engine: the same workload through fio's ``nbd`` ioengine (libnbd).

fio is the reference load generator for block storage; when it is installed,
``bench --via nbd`` and ``--compare`` use it, so thinstore and its peers are
measured by a client none of them wrote.  Its ``json+`` output carries every
completion-latency bin, which becomes the result's histogram, and an IOPS log
averaged over :func:`thinstore.bench.results.timeline_interval` gives the
throughput over time.  FUA on each write is not something fio's nbd engine
can ask for, so ``--sync fua`` runs with the built-in client instead.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np

from thinstore.bench.results import EDGES_US, histogram, latency, timeline_interval
from thinstore.errors import ThinstoreError

RW = {("read", "rand"): "randread", ("read", "seq"): "read",
      ("write", "rand"): "randwrite", ("write", "seq"): "write",
      ("readwrite", "rand"): "randrw", ("readwrite", "seq"): "rw"}


def available() -> bool:
    return shutil.which("fio") is not None


def can_run(workload) -> bool:
    """fio is installed and can express the workload (no per-write FUA)."""
    return available() and not workload.fua


def fio_args(uri: str, workload, size: int, log_prefix: str) -> list[str]:
    """The fio command line for ``workload`` against the NBD ``uri`` of ``size`` bytes."""
    w = workload
    args = ["fio", "--output-format=json+", "--name=bench", "--ioengine=nbd", f"--uri={uri}",
            f"--rw={RW[w.io_type, w.io_pattern]}", f"--bs={w.io_size}",
            f"--iodepth={w.io_depth}", f"--size={size - size % w.io_size}",
            "--randrepeat=0", "--norandommap", "--percentile_list=50:99:99.9",
            f"--write_iops_log={log_prefix}", "--log_avg_msec="
            f"{int(timeline_interval(w.seconds or 10) * 1000)}"]
    if w.io_type == "readwrite":
        args.append("--rwmixread=50")
    if w.seconds:
        args += ["--time_based", f"--runtime={max(1, round(w.seconds * 1000))}ms"]
    else:
        args.append(f"--io_size={w.io_total}")
    if w.ramp:
        args.append(f"--ramp_time={max(1, round(w.ramp * 1000))}ms")
    if w.flush_every:
        args.append(f"--fsync={w.flush_every}")
    return args


def run(uri: str, workload, size: int) -> dict:
    """Run fio once; the result dict of :mod:`thinstore.bench.results`."""
    work = tempfile.mkdtemp(prefix="tsfio")
    try:
        prefix = os.path.join(work, "bench")
        proc = subprocess.run(fio_args(uri, workload, size, prefix),
                              capture_output=True, text=True)
        if proc.returncode:
            raise ThinstoreError(f"fio failed (exit {proc.returncode}): "
                                 f"{(proc.stderr or proc.stdout).strip()[-400:]}")
        return parse(proc.stdout, workload.io_size, _read_log(prefix))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def parse(output: str, io_size: int, iops_log: list[tuple[int, float, int]]) -> dict:
    """fio's json+ text (anything before the first ``{`` is fio chatter) -> result dict."""
    job = json.loads(output[output.index("{"):])["jobs"][0]
    elapsed = max(job["job_runtime"], 1) / 1000.0
    result = {"engine": "fio", "elapsed_s": elapsed, "io_size": io_size}
    hist = {}
    for kind in ("read", "write"):
        data = job[kind]
        # requests are io_size each; fio's total_ios leaves out the ones in flight when
        # its ramp ended while io_bytes counts them, so ops come from the bytes
        nbytes = int(data["io_bytes"])
        ops = nbytes // io_size
        clat = data.get("clat_ns", {})
        result[kind] = {"ops": ops, "bytes": nbytes, "iops": ops / elapsed,
                        "bytes_per_s": nbytes / elapsed, "latency_us": _fio_latency(clat)}
        bins = clat.get("bins") or {}
        hist[kind] = histogram([int(k) / 1000 for k in bins], [bins[k] for k in bins]) \
            if bins else [0] * (len(EDGES_US) - 1)
    result["total"] = _total(result, elapsed, hist)
    sync = job.get("sync", {})
    result["flushes"] = {"ops": int(sync.get("total_ios", 0)),
                         "latency_us": _fio_latency(sync.get("lat_ns", {}))}
    result["histogram"] = {"edges_us": EDGES_US.tolist(), **hist}
    result["timeline"] = _timeline(iops_log, elapsed, io_size)
    return result


def _fio_latency(lat: dict) -> dict:
    if not lat or not lat.get("N", lat.get("mean")):
        return latency([])
    pct = lat.get("percentile", {})
    pick = {name: pct.get(key) for name, key in (("p50", "50.000000"), ("p99", "99.000000"),
                                                 ("p99.9", "99.900000"))}
    top = lat["max"] / 1000          # fio reports a bin's value, which may pass the max
    return {"mean": lat["mean"] / 1000, **{k: min(v / 1000, top) if v is not None else None
                                           for k, v in pick.items()}, "max": top}


def _total(result: dict, elapsed: float, hist: dict) -> dict:
    """Both directions together; percentiles from the merged histogram (bin upper edges)."""
    ops = result["read"]["ops"] + result["write"]["ops"]
    nbytes = result["read"]["bytes"] + result["write"]["bytes"]
    counts = np.add(hist["read"], hist["write"])
    lat = {"mean": None, "p50": None, "p99": None, "p99.9": None, "max": None}
    sides = [k for k in ("read", "write") if result[k]["ops"]]
    if len(sides) == 1:
        lat = dict(result[sides[0]]["latency_us"])
    elif counts.sum():
        cum = np.cumsum(counts) / counts.sum()
        for name, q in (("p50", .5), ("p99", .99), ("p99.9", .999)):
            lat[name] = float(EDGES_US[1:][np.searchsorted(cum, q)])   # a bin's top edge
        means = [(result[k]["latency_us"]["mean"], result[k]["ops"]) for k in ("read", "write")
                 if result[k]["ops"]]
        lat["mean"] = sum(m * n for m, n in means) / sum(n for _, n in means)
        lat["max"] = max(result[k]["latency_us"]["max"] or 0 for k in ("read", "write"))
        for name in ("p50", "p99", "p99.9"):
            lat[name] = min(lat[name], lat["max"])
    return {"ops": ops, "bytes": nbytes, "iops": ops / elapsed, "bytes_per_s": nbytes / elapsed,
            "latency_us": lat}


def _read_log(prefix: str) -> list[tuple[int, float, int]]:
    """(time ms, IOPS, direction) rows of fio's averaged IOPS log(s)."""
    rows = []
    for name in glob.glob(prefix + "_iops*.log"):
        with open(name) as f:
            for line in f:
                parts = [p.strip() for p in line.split(",")]
                if len(parts) >= 3:
                    rows.append((int(parts[0]), float(parts[1]), int(parts[2])))
    return rows


def _timeline(rows, elapsed: float, io_size: int) -> dict:
    """fio logs one averaged sample per direction about every ``interval`` ms, drifting
    later a little each time; the i-th samples of the directions are one point in time
    (their IOPS summed), kept at fio's own timestamps rather than forced onto a grid."""
    per_direction: dict[int, list] = {}
    for msec, value, direction in sorted(rows):
        per_direction.setdefault(direction, []).append((msec, value))
    points = max((len(s) for s in per_direction.values()), default=0)
    t_s, iops = [], []
    for i in range(points):
        samples = [s[i] for s in per_direction.values() if i < len(s)]
        t_s.append(max(msec for msec, _ in samples) / 1000)
        iops.append(sum(value for _, value in samples))
    return {"interval_s": timeline_interval(elapsed), "t_s": t_s, "iops": iops,
            "bytes_per_s": [v * io_size for v in iops]}
