#!/usr/bin/env python3
"""fio against thinstore, qemu-nbd and nbdkit-file, interleaved: four workloads in one go.

A developer's wrapper around what users run as ``thinstore bench --compare``
(thinstore/bench/): the same random data is served three ways,

- thinstore: the pool's own server, exporting a fresh clone of a snapshot of a
  volume holding the data (so writes copy on write, as on a VM cloned from a template);
- qemu-nbd: a qcow2 overlay whose backing file is a raw copy (the same COW role);
- nbdkit's file plugin: a raw copy (no COW: the speed of plain I/O),

and each workload (4K randread QD16, 4K randwrite QD16, 1M read QD4, 1M write QD4)
runs ``--rounds`` interleaved rounds on the three, the order rotating between rounds.
The table shows the median of the rounds and thinstore's ratio to each peer.

    python benchmarks/fio_compare.py [--size 1G] [--runtime 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from thinstore import Pool  # noqa: E402
from thinstore.bench.session import Options, run_bench  # noqa: E402
from thinstore.bench.workload import Workload  # noqa: E402
from thinstore.units import parse_size  # noqa: E402

WORKLOADS = {
    "4K randread QD16": dict(io_type="read", io_size=4096, io_pattern="rand", io_depth=16),
    "4K randwrite QD16": dict(io_type="write", io_size=4096, io_pattern="rand", io_depth=16),
    "1M read QD4": dict(io_type="read", io_size=1 << 20, io_pattern="seq", io_depth=4),
    "1M write QD4": dict(io_type="write", io_size=1 << 20, io_pattern="seq", io_depth=4),
}
PEERS = ("qemu-nbd", "nbdkit")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G", help="data size (default 1G)")
    p.add_argument("--runtime", type=float, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--ramp", type=float, default=1, help="unmeasured seconds first (default 1)")
    p.add_argument("--workdir", help="where the pool goes (default: a temp dir)")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    p.add_argument("--only", metavar="TEXT", help="run only workloads whose name contains TEXT")
    return p.parse_args()


def make_pool(pool_dir: str, size: int) -> None:
    """Volume ``base`` full of random data (bench clones it for writes)."""
    with Pool.create(pool_dir, 3 * size + (256 << 20)) as pool:
        pool.create_volume("base", size)
        with pool.open_device("base") as dev:
            for offset in range(0, size, 8 << 20):
                dev.pwrite(os.urandom(min(8 << 20, size - offset)), offset)


def main() -> int:
    args = parse_args()
    size = parse_size(args.size)
    work = args.workdir or tempfile.mkdtemp(prefix="tsbench", dir="/var/tmp")
    pool_dir = os.path.join(work, "pool")
    print(f"preparing {size >> 20} MiB of random data in {pool_dir}", flush=True)
    make_pool(pool_dir, size)
    results = {}
    try:
        for name, spec in WORKLOADS.items():
            if args.only and args.only not in name:
                continue
            workload = Workload(**spec, seconds=args.runtime, ramp=args.ramp)
            opts = Options("base", workload, via="nbd", client="fio", compare=PEERS,
                           rounds=args.rounds, progress=sys.stderr.isatty())
            results[name] = run_bench(pool_dir, opts)["compare"]
            print(f"{name:18} " + "  ".join(
                f"{s} {v:.0f}" for s, v in results[name]["median_iops"].items()), flush=True)
        report(results)
        if args.json:
            print(json.dumps({n: {"median_iops": r["median_iops"], "ratios": r["ratios"]}
                              for n, r in results.items()}, indent=1))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict) -> None:
    print()
    print(f"{'workload':18} {'thinstore':>10} {'qemu-nbd':>10} {'nbdkit':>10} "
          f"{'vs qemu-nbd':>12} {'vs nbdkit':>10}")
    for name, cmp in results.items():
        med, unit = cmp["median_iops"], "IOPS"
        if WORKLOADS[name]["io_size"] >= 1 << 20:
            med = {k: v * WORKLOADS[name]["io_size"] / 2**20 for k, v in med.items()}
            unit = "MiB/s"
        print(f"{name:18} {med['thinstore']:10.0f} {med['qemu-nbd']:10.0f} "
              f"{med['nbdkit']:10.0f} {cmp['ratios']['qemu-nbd']:11.2f}x "
              f"{cmp['ratios']['nbdkit']:9.2f}x  ({unit})")
    print("targets: >= 1.5x qemu-nbd and >= 0.9x nbdkit-file on every workload")


if __name__ == "__main__":
    sys.exit(main())
