#!/usr/bin/env python3
"""fio against thinstore, qemu-nbd and nbdkit-file, interleaved in one run.

The same random data is served three ways (benchmarks/fio_targets.py):

- thinstore: ``thinstore serve`` on a pool of 4 TiB capacity (a sparse file: the
  FLUSH path must not cost anything that grows with capacity), exporting a clone of
  a snapshot of a volume holding the data (writes copy on write, as on a VM cloned
  from a template);
- qemu-nbd: a qcow2 overlay whose backing file is the raw data (the same COW role);
- nbdkit's file plugin: a raw copy of the data (no COW: the speed of plain I/O).

Workloads, over unix sockets with fio's nbd engine unless said otherwise:

- durability: 4K random writes with a FLUSH after every write at QD1 (``--fsync=1``),
  with a FLUSH every 16 at QD16, and with FUA on every write at QD1 and QD16
  (benchmarks/nbd_fua.py through libnbd: fio cannot send FUA);
- latency under commits: the worst write or FLUSH completion latency of the QD1
  FLUSH-after-every-write run, at least 12 s so that it spans two background commits
  (a stall while a commit holds the pool lock shows here; the ratio is the peer's
  worst over thinstore's, so above 1 is better here too);
- allocation: sequential 1M writes through a fresh empty device (every write allocates);
- the earlier targets: 4K random read and write at QD16, 1M sequential read and write;
- depth 100: 4K random reads at QD16 on the top of a snapshot/clone chain 100 levels
  deep and on its root (fio_targets.py ``chain``), each server against itself: the
  depth-100 read ratio (top / root, target at least 0.95) says what the depth costs.
  thinstore's clones share block maps, so a read translates through one map at any
  depth; qemu's qcow2 backing chain looks each cluster up level by level. nbdkit's
  file plugin has no snapshots and shows "-";
- ext4 on a fresh COW child (nbdfuse + a loop device, made with mkfs.ext4 each round):
  fio's 4K random writes into a file with ``--fsync=1``, a database's pattern; and
  sqlite inserts of 100-byte rows, each its own transaction (WAL, synchronous=FULL:
  one fsync of the WAL per commit), counted per second;
- the floor of the two QD1 durable rows, measured in the same rounds: no server can
  answer a FUA write (or the FLUSH after a write) before one durable write of the disk
  has completed after the write arrived, so a QD1 cycle is at least the client's and
  the socket's own round trip for the write (the same writes against nbdkit's null
  plugin, which stores nothing; without the FLUSHes, whose trip may overlap the durable
  write) plus one durable 4 KiB write of the disk under the work directory (fio,
  O_DIRECT|O_DSYNC, QD1). The report prints that bound beside the 1.5x qemu-nbd
  target: where the target is well above the bound, no server can meet it on this
  machine (the bound is measured beside the servers, so it carries their noise).

Each round runs every workload on every server back to back, the order rotating
between rounds so none always runs first; the table shows the median of the rounds
and thinstore's ratio to each peer.

    python benchmarks/fio_compare.py [--size 1G] [--runtime 10] [--rounds 3] [--only TEXT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]

from fio_targets import NbdkitFile, NbdkitNull, QemuNbd, Thinstore, stop_all  # noqa: E402

WORKLOADS = {
    "4K randwrite QD1 flush/1": dict(rw="randwrite", bs="4k", iodepth=1, fsync=1, unit="IOPS"),
    # the worst write or FLUSH latency over a run spanning two background commits
    "4K randwrite QD1 flush/1 worst": dict(rw="randwrite", bs="4k", iodepth=1, fsync=1,
                                           unit="ms worst", min_runtime=12),
    "4K randwrite QD1 flush/1 p99.9": dict(rw="randwrite", bs="4k", iodepth=1, fsync=1,
                                           unit="ms p99.9", min_runtime=12),
    "4K randwrite QD16 flush/16": dict(rw="randwrite", bs="4k", iodepth=16, fsync=16,
                                       unit="IOPS"),
    # tail latency at QD16 over two background commits; the rows of one workload share
    # one fio run per server and round (same arguments: run_workload's cache)
    "4K randwrite QD16 flush/16 p99": dict(rw="randwrite", bs="4k", iodepth=16, fsync=16,
                                           unit="ms p99", min_runtime=12),
    "4K randwrite QD16 flush/16 p99.9": dict(rw="randwrite", bs="4k", iodepth=16, fsync=16,
                                             unit="ms p99.9", min_runtime=12),
    "4K randwrite QD16 flush/16 worst": dict(rw="randwrite", bs="4k", iodepth=16, fsync=16,
                                             unit="ms worst", min_runtime=12),
    "4K randwrite QD16 p99": dict(rw="randwrite", bs="4k", iodepth=16, unit="ms p99",
                                  min_runtime=12),
    "4K randwrite QD16 p99.9": dict(rw="randwrite", bs="4k", iodepth=16, unit="ms p99.9",
                                    min_runtime=12),
    "4K randwrite QD16 worst": dict(rw="randwrite", bs="4k", iodepth=16, unit="ms worst",
                                    min_runtime=12),
    "4K randwrite QD1 FUA": dict(kind="fua", iodepth=1, unit="IOPS"),
    "4K randwrite QD16 FUA": dict(kind="fua", iodepth=16, unit="IOPS"),
    "1M write fresh QD4": dict(kind="fresh", rw="write", bs="1m", iodepth=4, unit="MiB/s"),
    "4K randread QD16": dict(rw="randread", bs="4k", iodepth=16, unit="IOPS"),
    "4K randwrite QD16": dict(rw="randwrite", bs="4k", iodepth=16, unit="IOPS"),
    "1M read QD4": dict(rw="read", bs="1m", iodepth=4, unit="MiB/s"),
    "1M write QD4": dict(rw="write", bs="1m", iodepth=4, unit="MiB/s"),
    "ext4 4K randwrite fsync=1": dict(kind="ext4", unit="IOPS"),
    "ext4 sqlite insert/txn": dict(kind="ext4", job="sqlite", unit="inserts/s"),
    "4K randread QD16 depth 0": dict(kind="chain", level=0, rw="randread", bs="4k",
                                     iodepth=16, unit="IOPS"),
    "4K randread QD16 depth 100": dict(kind="chain", level=1, rw="randread", bs="4k",
                                       iodepth=16, unit="IOPS"),
}
LOWER_BETTER = "ms "        # latency units ("ms p99", "ms p99.9", "ms worst"): their ratios
                            # are peer / thinstore (> 1: thinstore better)
PERCENTILES = {"ms p99": "99.000000", "ms p99.9": "99.900000"}   # fio's percentile keys
DEPTH_TARGET = 0.95         # depth-100 read ratio: top of the chain / its root
SERVERS = ("thinstore", "qemu-nbd", "nbdkit-file")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G", help="data size (default 1G)")
    p.add_argument("--capacity", default="4T", help="thinstore pool capacity (default 4T)")
    p.add_argument("--fresh-size", default="1G", help="fresh device for '1M write fresh'")
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--workdir", help="where images and pool go (default: a temp dir)")
    p.add_argument("--workers", type=int, default=4, help="thinstore serve --workers")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    p.add_argument("--only", metavar="TEXT", action="append",
                   help="run only workloads whose name contains TEXT (repeatable)")
    return p.parse_args()


def size_bytes(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30, "T": 40}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make_base(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (8 << 20)):
            f.write(os.urandom(8 << 20))


def fio_args(uri: str, w: dict, size: int, runtime: int) -> list:
    runtime = max(runtime, w.get("min_runtime", 0))
    timed = ["--time_based", f"--runtime={runtime}", "--ramp_time=1"] \
        if w.get("kind") != "fresh" else []
    return ["fio", "--output-format=json", "--name=bench", "--ioengine=nbd", f"--uri={uri}",
            f"--rw={w['rw']}", f"--bs={w['bs']}", f"--iodepth={w['iodepth']}",
            f"--size={size}", *timed, "--randrepeat=0", "--norandommap",
            *([f"--fsync={w['fsync']}"] if w.get("fsync") else [])]


def fio_job(args: list) -> dict:
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return json.loads(out[out.index("{"):])["jobs"][0]


def fio_result(args: list, rw: str, unit: str, job: dict | None = None) -> float:
    """The figure `unit` asks of one fio run (`job`: its parsed result, if already run).
    Latency units take the worse of the writes' completion latency and the FLUSHes'."""
    job = job if job is not None else fio_job(args)
    side = job["read"] if "read" in rw else job["write"]
    if unit.startswith(LOWER_BETTER):
        flushes = job.get("sync", {}).get("lat_ns", {})
        if unit in PERCENTILES:
            key = PERCENTILES[unit]
            return max(side["clat_ns"].get("percentile", {}).get(key, 0),
                       flushes.get("percentile", {}).get(key, 0)) / 1e6
        return max(side["clat_ns"]["max"], flushes.get("max", 0)) / 1e6
    return side["iops"] if unit == "IOPS" else side["bw"] / 1024


def run_fua(uri: str, w: dict, size: int, runtime: int) -> float:
    tool = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nbd_fua.py")
    out = subprocess.run(["/usr/bin/python3", tool, uri, str(w["iodepth"]), str(runtime),
                          str(size)], capture_output=True, text=True, check=True).stdout
    return json.loads(out)["iops"]


def floored(w: dict) -> bool:
    """A QD1 durable workload: one with a floor (module docstring)."""
    return w.get("iodepth") == 1 and (w.get("kind") == "fua" or w.get("fsync") == 1) \
        and w["unit"] == "IOPS"


def disk_sync_us(work: str, runtime: int) -> float:
    """Mean latency, in microseconds, of one durable 4 KiB write of the disk under `work`:
    fio's psync engine, O_DIRECT|O_DSYNC, random offsets in a 64 MiB file, QD1."""
    path = os.path.join(work, "disk-sync.img")
    out = subprocess.run(["fio", "--output-format=json", "--name=disk", f"--filename={path}",
                          "--size=64M", "--rw=randwrite", "--bs=4k", "--ioengine=psync",
                          "--direct=1", "--sync=1", "--time_based", f"--runtime={runtime}",
                          "--ramp_time=1"], capture_output=True, text=True, check=True).stdout
    os.unlink(path)
    return json.loads(out[out.index("{"):])["jobs"][0]["write"]["lat_ns"]["mean"] / 1000


def floor_iops(null_iops: float, sync_us: float) -> float:
    """The most QD1 cycles per second any server can give: the null server's cycle for
    the write alone (client and socket) plus one durable write of the disk. With a FLUSH
    after each write, the durable write may start when the write arrives and the FLUSH
    travels meanwhile, so the write's round trip, not the FLUSH's, is the part added to
    it; the null run leaves the FLUSH out (fio without --fsync)."""
    return 1e6 / (1e6 / null_iops + sync_us)


SQLITE = """
import os, sqlite3, sys, time
db = sqlite3.connect(os.path.join(sys.argv[1], "bench.db"), isolation_level=None)
db.execute("pragma journal_mode=wal")
db.execute("pragma synchronous=full")
db.execute("create table t (k integer primary key, v blob)")
for _ in range(100):                            # warm-up, as fio's ramp_time
    db.execute("insert into t (v) values (randomblob(100))")
n, start = 0, time.monotonic()
while time.monotonic() - start < float(sys.argv[2]):
    db.execute("insert into t (v) values (randomblob(100))")
    n += 1
print(n / (time.monotonic() - start))
"""


def run_sqlite(fs: str, runtime: int) -> float:
    """Inserts per second into a sqlite table on `fs`, each its own transaction."""
    out = subprocess.run([sys.executable, "-c", SQLITE, fs, str(runtime)],
                         capture_output=True, text=True, check=True).stdout
    return float(out)


def run_ext4(uri: str, work: str, tag: str, runtime: int, job: str = "fio") -> float:
    """mkfs.ext4 on the device through nbdfuse and a loop device, then fio's 4K random
    writes into a 64 MiB file with an fsync after each (what a database does), or
    with `job` "sqlite" run_sqlite."""
    mnt, fs = os.path.join(work, f"fuse-{tag}"), os.path.join(work, f"fs-{tag}")
    os.makedirs(mnt)
    os.makedirs(fs)
    fuse = subprocess.Popen(["nbdfuse", os.path.join(mnt, "disk"), uri])
    loop = None
    try:
        for _ in range(200):
            if os.path.exists(os.path.join(mnt, "disk")):
                break
            time.sleep(0.05)
        loop = subprocess.run(["losetup", "-f", "--show", os.path.join(mnt, "disk")],
                              capture_output=True, text=True, check=True).stdout.strip()
        subprocess.run(["mkfs.ext4", "-q", "-F", "-E",
                        "nodiscard,lazy_itable_init=0,lazy_journal_init=0", loop], check=True)
        subprocess.run(["mount", loop, fs], check=True)
        try:
            if job == "sqlite":
                return run_sqlite(fs, runtime)
            return fio_result(["fio", "--output-format=json", "--name=sync", f"--directory={fs}",
                               "--rw=randwrite", "--bs=4k", "--size=64M", "--fsync=1",
                               "--ioengine=psync", "--time_based", f"--runtime={runtime}",
                               "--ramp_time=1"], "randwrite", "IOPS")
        finally:
            subprocess.run(["umount", fs], check=True)
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        # the loop device lets go of the file a moment after losetup -d returns: until
        # then the FUSE mount is busy
        for _ in range(100):
            if subprocess.run(["fusermount3", "-u", mnt], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        fuse.wait(30)


_RUNS: dict = {}        # fio runs so far: (server, round tag, arguments) -> its result


def run_workload(server, wname: str, w: dict, size: int, args, work: str, tag: str):
    """The workload's figure on `server`, or None where the server cannot run it."""
    kind = w.get("kind", "fio")
    if kind == "chain":
        ends = server.chain()
        return None if ends is None else \
            fio_result(fio_args(ends[w["level"]], w, size, args.runtime), w["rw"], w["unit"])
    if kind == "fua":
        return run_fua(server.main, w, size, args.runtime)
    if kind == "fio":
        cmd = fio_args(server.main, w, size, args.runtime)
        key = (server.name, tag, tuple(cmd))
        if key not in _RUNS:            # rows differing only in unit share one fio run
            _RUNS[key] = fio_job(cmd)
        return fio_result(cmd, w["rw"], w["unit"], _RUNS[key])
    if kind == "fresh":
        fresh = size_bytes(args.fresh_size)
        uri, cleanup = server.fresh(f"fresh-{tag}", fresh)
        try:
            return fio_result(fio_args(uri, w, fresh, args.runtime), w["rw"], w["unit"])
        finally:
            cleanup()
    uri, cleanup = server.child(f"child-{tag}")
    try:
        job = w.get("job", "fio")
        return run_ext4(uri, work, f"{server.name}-{tag}-{job}", args.runtime, job)
    finally:
        cleanup()


def main() -> int:
    args = parse_args()
    size = size_bytes(args.size)
    work = args.workdir or tempfile.mkdtemp(prefix="tsbench", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    base = os.path.join(work, "base.raw")
    print(f"preparing {size >> 20} MiB of random data in {work}", flush=True)
    make_base(base, size)
    servers = {}
    try:
        chosen = {w: v for w, v in WORKLOADS.items()
                  if not args.only or any(o in w for o in args.only)}
        chain = any(v.get("kind") == "chain" for v in chosen.values())
        servers["thinstore"] = Thinstore(work, base, size, size_bytes(args.capacity),
                                         args.workers, chain=chain)
        servers["qemu-nbd"] = QemuNbd(work, base)
        servers["nbdkit-file"] = NbdkitFile(work, base)
        if any(floored(w) for w in chosen.values()):
            servers["nbdkit-null"] = NbdkitNull(work, size)
        for wname, w in chosen.items():
            if w.get("kind", "fio") == "fio":
                print(f"{wname}: {' '.join(fio_args('URI', w, size, args.runtime))}")
        results = {w: {s: [] for s in SERVERS} for w in chosen}
        floors = {w: [] for w in chosen}
        for round_no in range(args.rounds):
            for wname, w in chosen.items():
                order = SERVERS[round_no % 3:] + SERVERS[:round_no % 3]   # no one always first
                for server in order:
                    value = run_workload(servers[server], wname, w, size, args, work,
                                         f"r{round_no}")
                    if value is None:
                        continue
                    results[wname][server].append(value)
                    print(f"round {round_no + 1} {wname:30} {server:12} {value:10.1f} "
                          f"{w['unit']}", flush=True)
                if floored(w):
                    bare = {k: v for k, v in w.items() if k != "fsync"}   # see floor_iops
                    null = run_workload(servers["nbdkit-null"], wname, bare, size, args, work,
                                        f"r{round_no}")
                    sync = disk_sync_us(work, min(args.runtime, 5))
                    floors[wname].append(floor_iops(null, sync))
                    print(f"round {round_no + 1} {wname:30} {'floor':12} {floors[wname][-1]:10.1f}"
                          f" IOPS (nbdkit-null {null:.0f} IOPS, disk {sync:.1f} us per durable "
                          f"write)", flush=True)
        report(results, floors)
        if args.json:
            print(json.dumps(results, indent=1))
    finally:
        stop_all(servers, work, keep=bool(args.workdir))
    return 0


def report(results: dict, floors: dict) -> None:
    print()
    print(f"{'workload':30} {'thinstore':>10} {'qemu-nbd':>10} {'nbdkit':>10} "
          f"{'vs qemu-nbd':>12} {'vs nbdkit':>10}")
    medians = {}
    for wname, per in results.items():
        med = {s: statistics.median(v) if v else None for s, v in per.items()}
        medians[wname] = med
        lower = WORKLOADS[wname]["unit"].startswith(LOWER_BETTER)
        cells = [(f"{med[s]:10.1f}" if lower else f"{med[s]:10.0f}") if med[s] else f"{'-':>10}"
                 for s in SERVERS]
        ratios = [f"{(med[s] / med['thinstore'] if lower else med['thinstore'] / med[s]):{w}.2f}x"
                  if med[s] and med["thinstore"] else f"{'-':>{w + 1}}"
                  for s, w in (("qemu-nbd", 11), ("nbdkit-file", 9))]
        print(f"{wname:30} {' '.join(cells)} {' '.join(ratios)}  "
              f"({WORKLOADS[wname]['unit']})")
    print("targets: >= 1.5x qemu-nbd and >= 0.9x nbdkit-file on every workload "
          "(latency rows, 'ms ...': the ratio is the peer's over thinstore's)")
    for wname, values in floors.items():
        qemu = medians[wname]["qemu-nbd"]
        if values and qemu:
            floor = statistics.median(values)
            share = medians[wname]["thinstore"] / floor
            print(f"{wname}: floor {floor:.0f} IOPS (null round trip + one durable write, "
                  f"measured beside it); thinstore at {share:.2f} of it; 1.5x qemu-nbd = "
                  f"{1.5 * qemu:.0f} IOPS = {1.5 * qemu / floor:.2f} of the floor")
    root, top = (medians.get(f"4K randread QD16 depth {d}") for d in (0, 100))
    if root and top:
        depth = [f"{s} {top[s] / root[s]:.2f}" for s in SERVERS if root[s] and top[s]]
        print(f"depth-100 read ratio (depth 100 / depth 0, each server against itself): "
              f"{', '.join(depth)}; target >= {DEPTH_TARGET} for thinstore")


if __name__ == "__main__":
    sys.exit(main())
