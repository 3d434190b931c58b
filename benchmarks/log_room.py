#!/usr/bin/env python3
"""What a FLUSH costs once the intent log is off on a tight host file system.

    python benchmarks/log_room.py [--dir DIR] [--rounds 3] [--flushes 300]

A FLUSH normally appends one intent-log record (synclog.py); where the host file
system is too tight for a log (logroom.py: an eighth of its free space under 8 MiB)
every FLUSH is a full commit instead. This times the same workload both ways on the
same file system, interleaved round by round: 4 KiB random writes to a 64 MiB volume,
each followed by a FLUSH (QD1, Pool API). The log is turned off by telling the
free-space probe the file system has 16 MiB free. Prints FLUSHes per second of each
and their ratio (log off / log on), the peer being the log in the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from thinstore import Pool, logroom  # noqa: E402

MiB = 1 << 20


def one(path: str, flushes: int, off: bool, seed: int) -> float:
    """FLUSHes per second of `flushes` 4 KiB write + FLUSH pairs on a fresh pool."""
    real = logroom.host_free
    if off:
        logroom.host_free = lambda fio: 16 * MiB
    try:
        shutil.rmtree(path, ignore_errors=True)
        Pool.create(path, 256 * MiB, commit_interval=0).close()
        rng = random.Random(seed)
        buf = os.urandom(4096)
        with Pool.open(path, commit_interval=5) as pool:
            pool.create_volume("v", 64 * MiB)
            with pool.open_device("v") as dev:
                for _ in range(20):             # warm up: the first chunks, the writer
                    dev.pwrite(buf, rng.randrange(16384) * 4096)
                    dev.flush()
                t0 = time.perf_counter()
                for _ in range(flushes):
                    dev.pwrite(buf, rng.randrange(16384) * 4096)
                    dev.flush()
                elapsed = time.perf_counter() - t0
            counts = pool.log_counters
            assert (counts["commits_instead"] > 0) == off, counts
        return flushes / elapsed
    finally:
        logroom.host_free = real


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", help="where the pools go (default: a temporary directory)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--flushes", type=int, default=300)
    args = ap.parse_args()
    top = tempfile.mkdtemp(prefix="logroom", dir=args.dir)
    try:
        on, off = [], []
        for r in range(args.rounds):
            on.append(one(os.path.join(top, "p"), args.flushes, False, r))
            off.append(one(os.path.join(top, "p"), args.flushes, True, r))
            print(f"round {r + 1}: log on {on[-1]:.0f} flush/s, log off {off[-1]:.0f} "
                  f"flush/s, ratio {off[-1] / on[-1]:.2f}")
        on.sort()
        off.sort()
        mid_on, mid_off = on[len(on) // 2], off[len(off) // 2]
        print(f"median: log on {mid_on:.0f} flush/s, log off {mid_off:.0f} flush/s, "
              f"off/on {mid_off / mid_on:.2f}")
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
