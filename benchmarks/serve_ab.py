#!/usr/bin/env python3
"""Two source trees of thinstore serving over NBD, measured against each other by fio.

For a change on the NBD hot path (the per-export counters of ``thinstore iostat``,
say): each tree runs ``thinstore serve`` on a pool of its own; every round sends
the same fixed number of 4K requests (fio, nbd engine, QD16) to both, the order
alternating, and records IOPS and the server's CPU time per request (utime+stime
from /proc/PID/stat). CPU per request is the steadier figure on a shared machine:
a neighbour's load changes the IOPS much more than the work each request takes.

    python benchmarks/serve_ab.py --before OLD_TREE --after NEW_TREE [--rounds 9]
        [--requests 100000]

A tree is a directory holding the ``thinstore`` package (built: ``python setup.py
build_ext --inplace``); ``git archive REV | tar -x -C DIR`` makes one of an old commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

TICK = os.sysconf("SC_CLK_TCK")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", required=True, help="source tree of the baseline")
    p.add_argument("--after", required=True, help="source tree of the change")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--requests", type=int, default=100000, help="per fio run")
    return p.parse_args()


def start(tree: str, work: str, name: str):
    pool, sock = os.path.join(work, name), os.path.join(work, f"{name}.sock")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree))
    cli = [sys.executable, "-m", "thinstore", "--pool", pool]
    subprocess.run(cli + ["init", "--capacity", "2G"], env=env, check=True)
    subprocess.run(cli + ["create", "v", "--size", "256M"], env=env, check=True)
    proc = subprocess.Popen(cli + ["serve", "--socket", sock], env=env, stdout=subprocess.PIPE)
    proc.stdout.readline()
    return proc, f"nbd+unix:///v?socket={sock}"


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def fio(proc, uri: str, rw: str, requests: int) -> tuple[float, float]:
    """(IOPS, server CPU microseconds per request) of one run."""
    c0 = cpu_seconds(proc.pid)
    out = subprocess.run(["fio", "--output-format=json", "--name=ab", "--ioengine=nbd",
                          f"--uri={uri}", f"--rw={rw}", "--bs=4k", "--iodepth=16",
                          "--size=256M", f"--io_size={requests * 4096}", "--randrepeat=0",
                          "--norandommap"], capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    iops = job["read" if "read" in rw else "write"]["iops"]
    return iops, (cpu_seconds(proc.pid) - c0) / requests * 1e6


def main() -> int:
    args = parse_args()
    work = tempfile.mkdtemp(prefix="tsab", dir="/tmp")
    servers = {}
    try:
        for name in ("before", "after"):
            servers[name] = start(getattr(args, name), work, name)
        for rw in ("randwrite", "randread"):
            runs = {name: [] for name in servers}
            for name, (proc, uri) in servers.items():      # warm-up: allocate, fill caches
                fio(proc, uri, rw, args.requests)
            for r in range(args.rounds):
                for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                    runs[name].append(fio(*servers[name], rw, args.requests))
            show(rw, runs)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def show(rw: str, runs: dict) -> None:
    med = {n: (statistics.median(i for i, _ in r), statistics.median(c for _, c in r))
           for n, r in runs.items()}
    (bi, bc), (ai, ac) = med["before"], med["after"]
    print(f"{rw}: IOPS before {bi:.0f} after {ai:.0f} (after/before {ai / bi:.3f}); "
          f"server CPU per request before {bc:.2f} us after {ac:.2f} us "
          f"(after/before {ac / bc:.3f}); medians of {len(runs['before'])} rounds")


if __name__ == "__main__":
    sys.exit(main())
