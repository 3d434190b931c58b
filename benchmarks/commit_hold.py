#!/usr/bin/env python3
"""How long the commits hold the pool lock under fio, and on what.

Serves the same clone fio_compare.py measures (benchmarks/fio_targets.py: a 4 TiB
pool, a clone of a snapshot of random data), runs fio's 4K random writes once per
WORKLOAD given (extra fio options without their dashes, e.g. ``"iodepth=16
fsync=16"``), each over
12 s (two background commits), and prints fio's tail latency with the pool's commit
counters over that run, read over the control socket (docs/integrity.md "Commit
lock hold time"): the commits, their mean and longest lock hold, the mean of each
part, the requests waiting as a commit let go, and the FLUSHes that were commits.

    python benchmarks/commit_hold.py [--size 256M] "iodepth=1 fsync=1" "iodepth=16"

Run it under the machine's benchmark lock; compare two trees by running it with
PYTHONPATH set to each, one after the other in the same locked run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from fio_compare import make_base, size_bytes  # noqa: E402
from fio_targets import Thinstore  # noqa: E402

PARTS = ("tree", "data_sync", "meta_sync", "superblock", "release")


def percentile(lat: dict, key: str = "99.900000") -> float:
    return lat.get("percentile", {}).get(key, 0) / 1e6


def run(ts: Thinstore, size: int, extra: str, runtime: int) -> None:
    from thinstore.control import RemotePool
    args = ["fio", "--output-format=json", "--name=hold", "--ioengine=nbd", f"--uri={ts.main}",
            "--rw=randwrite", "--bs=4k", f"--size={size}", "--time_based",
            f"--runtime={runtime}", "--randrepeat=0", "--norandommap",
            *("--" + opt.lstrip("-") for opt in extra.split())]
    remote = RemotePool.connect(ts.pool_dir)
    try:
        before = remote.iostat()["pool"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        after = remote.iostat()["pool"]
    finally:
        remote.close()
    job = json.loads(out[out.index("{"):])["jobs"][0]
    d = {k: v if k.endswith("_max") else v - before.get(k, 0) for k, v in after.items()}
    n = max(d["commits"], 1)
    write, sync = job["write"]["clat_ns"], job.get("sync", {}).get("lat_ns", {})
    print(f"== {extra}: {job['write']['iops']:.0f} IOPS; write p99.9 {percentile(write):.1f} "
          f"max {write['max'] / 1e6:.1f} ms; FLUSH p99.9 {percentile(sync):.1f} "
          f"max {sync.get('max', 0) / 1e6:.1f} ms")
    parts = " ".join(f"{p} {d[f'commit_{p}_us'] / n / 1000:.1f}" for p in PARTS)
    print(f"   commits {d['commits']}, hold mean {d['commit_hold_us'] / n / 1000:.1f} ms "
          f"(longest since start {d['commit_hold_us_max'] / 1000:.1f}) | {parts} | waiting "
          f"{d['commit_waiters'] / n:.1f} (most {d['commit_waiters_max']}) | FLUSHes that "
          f"were commits {d.get('flush_commits', 0)}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workloads", nargs="+", metavar="WORKLOAD", help="extra fio options, without their dashes")
    p.add_argument("--size", default="256M", help="data size (default 256M)")
    p.add_argument("--capacity", default="4T", help="pool capacity (default 4T)")
    p.add_argument("--runtime", type=int, default=12, help="seconds per workload (default 12)")
    args = p.parse_args()
    size = size_bytes(args.size)
    work = tempfile.mkdtemp(prefix="tshold", dir="/var/tmp")
    ts = None
    try:
        base = os.path.join(work, "base.raw")
        make_base(base, size)
        ts = Thinstore(work, base, size, size_bytes(args.capacity), 4)
        for extra in args.workloads:
            run(ts, size, extra, args.runtime)
    finally:
        if ts is not None:
            ts.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
