#!/usr/bin/env python3
"""The NBD project's reference test client against thinstore, qemu-nbd and nbdkit-file,
interleaved in one run.

nbd-tester-client (NetworkBlockDevice/nbd, tests/run; tools/build_nbd_tester.sh DIR builds
it) has throughput modes that send 1 KiB requests over the whole export, as many in flight
as the socket takes, and prints the time they took:

- ``read``: reads (no flags), on the main target (a COW child of random data);
- ``write``: writes (``-w``), on a new COW child of the data (every first write to a
  chunk copies it) and on a fresh empty device (every first write to a chunk allocates);
- ``write+flush``: the same with a FUA write and a FLUSH in every 16 requests (``-w -f``),
  the client's durable mode, on a new COW child and on a fresh device;
- ``integrity`` and ``integrity huge``: its recorded traces (``-i -t``; reads, writes up to
  127 KiB or, in the huge one, up to 47.5 MiB, FUA writes and FLUSHes, many in flight) on
  a fresh 50 MiB device; the figure is bytes moved over the time taken.

The targets are benchmarks/fio_targets.py's, as fio_compare.py uses them: thinstore serves
a pool of 4 TiB capacity (a sparse file) exporting a clone of a snapshot of a volume holding
the data; qemu-nbd a qcow2 overlay on the raw data; nbdkit's file plugin a raw copy (no
COW: the speed of plain I/O). Fresh devices and COW children are made for each run and
removed after it. Each round runs every workload on every server back to back, the order
rotating between rounds; the table shows the median MiB/s of the rounds and thinstore's
ratio to each peer (above 1: thinstore faster).

    python benchmarks/nbd_tester.py [--client PATH] [--size 64M] [--rounds 3] [--only TEXT]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from fio_compare import make_base, size_bytes  # noqa: E402
from fio_targets import NbdkitFile, QemuNbd, Thinstore, stop_all  # noqa: E402

TRACE_SIZE = 50 << 20       # the export size of the NBD project's own integrity tests
WORKLOADS = {
    "read": dict(target="main", flags=[]),
    "write COW child": dict(target="child", flags=["-w"]),
    "write fresh": dict(target="fresh", flags=["-w"]),
    "write+flush COW child": dict(target="child", flags=["-w", "-f"]),
    "write+flush fresh": dict(target="fresh", flags=["-w", "-f"]),
    "integrity": dict(target="trace", flags=["-i", "-t"], trace="integrity-test.tr"),
    "integrity huge": dict(target="trace", flags=["-i", "-t"], trace="integrityhuge-test.tr"),
}
SERVERS = ("thinstore", "qemu-nbd", "nbdkit-file")
RESULT = re.compile(r"Took ([0-9.]+) seconds to complete, ([0-9.]+)([KMG]?)ib/s")
UNIT = {"": 1 / (1 << 20), "K": 1 / 1024, "M": 1, "G": 1024}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--client", default=os.environ.get("THINSTORE_NBD_TESTER")
                   or shutil.which("nbd-tester-client"),
                   help="nbd-tester-client (default $THINSTORE_NBD_TESTER, else on PATH); "
                        "its integrity traces beside it")
    p.add_argument("--size", default="64M", help="data and device size (default 64M)")
    p.add_argument("--capacity", default="4T", help="thinstore pool capacity (default 4T)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--workdir", help="where images and pool go (default: a temp dir)")
    p.add_argument("--workers", type=int, default=4, help="thinstore serve --workers")
    p.add_argument("--only", metavar="TEXT", action="append",
                   help="run only workloads whose name contains TEXT (repeatable)")
    return p.parse_args()


def run_client(client: str, uri: str, args: list) -> float | str:
    """One run of the client on the export at `uri`: the MiB/s it reports, or, where it
    fails, its last message (a peer may refuse a request: qemu-nbd errors requests over
    32 MiB, which the huge trace sends)."""
    parts = urllib.parse.urlparse(uri)
    sock = urllib.parse.parse_qs(parts.query)["socket"][0]
    # the client cannot send an empty export name (it takes a 0-byte write for a failed
    # one); nbdkit's export, unnamed in fio_targets' URIs, answers to any name
    export = parts.path.lstrip("/") or "default"
    proc = subprocess.run([client, "-u", sock, "-N", export, *args],
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NBD_TEST_SILENT="1"))
    found = RESULT.search(proc.stdout + proc.stderr)
    if proc.returncode or not found:
        lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
        return f"failed ({proc.returncode}): {lines[-1] if lines else 'no output'}"
    return float(found.group(2)) * UNIT[found.group(3)]


def run_workload(server, w: dict, client: str, size: int, tag: str) -> float | str:
    flags = list(w["flags"])
    if w.get("trace"):
        flags.append(os.path.join(os.path.dirname(client), w["trace"]))
    if w["target"] == "main":
        return run_client(client, server.main, flags)
    uri, cleanup = (server.child(tag) if w["target"] == "child" else
                    server.fresh(tag, TRACE_SIZE if w["target"] == "trace" else size))
    try:
        return run_client(client, uri, flags)
    finally:
        cleanup()


def main() -> int:
    args = parse_args()
    if not args.client or not os.access(args.client, os.X_OK):
        raise SystemExit("nbd-tester-client not found: --client PATH, or build it with "
                         "tools/build_nbd_tester.sh DIR")
    size = size_bytes(args.size)
    chosen = {n: w for n, w in WORKLOADS.items() if not args.only or any(o in n for o in args.only)}
    work = args.workdir or tempfile.mkdtemp(prefix="tsbench", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    base = os.path.join(work, "base.raw")
    print(f"preparing {size >> 20} MiB of random data in {work}", flush=True)
    make_base(base, size)
    servers = {}
    try:
        servers["thinstore"] = Thinstore(work, base, size, size_bytes(args.capacity),
                                         args.workers)
        servers["qemu-nbd"] = QemuNbd(work, base)
        servers["nbdkit-file"] = NbdkitFile(work, base)
        results = {n: {s: [] for s in SERVERS} for n in chosen}
        for round_no in range(args.rounds):
            for name, w in chosen.items():
                order = SERVERS[round_no % 3:] + SERVERS[:round_no % 3]   # no one always first
                for server in order:
                    value = run_workload(servers[server], w, args.client, size,
                                         f"t{round_no}-{len(results[name][server])}")
                    results[name][server].append(value)
                    shown = f"{value:9.1f} MiB/s" if isinstance(value, float) else value
                    print(f"round {round_no + 1} {name:24} {server:12} {shown}", flush=True)
        report(results, size)
    finally:
        stop_all(servers, work, keep=bool(args.workdir))
    return 0


def report(results: dict, size: int) -> None:
    """Medians and ratios; a server with any failed run shows 'fails' and no ratio."""
    print()
    print(f"nbd-tester-client, MiB/s, median of the rounds ({size >> 20} MiB devices, "
          f"traces on {TRACE_SIZE >> 20} MiB)")
    print(f"{'workload':24} {'thinstore':>10} {'qemu-nbd':>10} {'nbdkit':>10} "
          f"{'vs qemu-nbd':>12} {'vs nbdkit':>10}")
    for name, per in results.items():
        med = {s: statistics.median(v) if all(isinstance(x, float) for x in v) else None
               for s, v in per.items()}
        cells = " ".join(f"{med[s]:10.1f}" if med[s] else f"{'fails':>10}" for s in SERVERS)
        ratios = [f"{med['thinstore'] / med[s]:{w}.2f}x" if med[s] and med["thinstore"]
                  else f"{'-':>{w + 1}}" for s, w in (("qemu-nbd", 11), ("nbdkit-file", 9))]
        print(f"{name:24} {cells} {' '.join(ratios)}")


if __name__ == "__main__":
    sys.exit(main())
