#!/usr/bin/env python3
"""fio against thinstore, qemu-nbd and nbdkit-file, interleaved in one run.

The same 1 GiB of random data is served three ways:

- thinstore: ``thinstore serve``, exporting a clone of a snapshot of a volume
  holding the data (so writes copy on write, as on a VM cloned from a template);
- qemu-nbd: a qcow2 overlay whose backing file is the raw data (the same COW role);
- nbdkit's file plugin: a raw copy of the data (no COW: the speed of plain I/O).

Workloads: 4K randread QD16, 4K randwrite QD16, 1M read, 1M write, over unix
sockets with fio's nbd engine.  Each round runs every workload on every server
back to back (the order rotating between rounds, so none always runs first, right
after the previous workload's writeback), so all three see the same history; the
table shows the median of the rounds and thinstore's ratio to each peer.

    python benchmarks/fio_compare.py [--size 1G] [--runtime 10] [--rounds 3]
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
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORKLOADS = {
    "4K randread QD16": dict(rw="randread", bs="4k", iodepth=16, unit="IOPS"),
    "4K randwrite QD16": dict(rw="randwrite", bs="4k", iodepth=16, unit="IOPS"),
    "1M read QD4": dict(rw="read", bs="1m", iodepth=4, unit="MiB/s"),
    "1M write QD4": dict(rw="write", bs="1m", iodepth=4, unit="MiB/s"),
}
SERVERS = ("thinstore", "qemu-nbd", "nbdkit-file")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G", help="data size (default 1G)")
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--workdir", help="where images and pool go (default: a temp dir)")
    p.add_argument("--workers", type=int, default=4, help="thinstore serve --workers")
    p.add_argument("--json", action="store_true", help="print the raw results as JSON too")
    p.add_argument("--only", metavar="TEXT", help="run only workloads whose name contains TEXT")
    return p.parse_args()


def size_bytes(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].upper() in units else int(text)


def make_base(path: str, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (8 << 20)):
            f.write(os.urandom(8 << 20))


def setup_thinstore(work: str, base: str, size: int, workers: int):
    from thinstore import Pool
    pool_dir = os.path.join(work, "pool")
    with Pool.create(pool_dir, 2 * size + (256 << 20)) as pool:
        pool.create_volume("base", size)
        with pool.open_device("base") as dev, open(base, "rb") as f:
            for offset in range(0, size, 8 << 20):
                dev.pwrite(f.read(8 << 20), offset)
        pool.snapshot("base@golden")
        pool.clone("base@golden", "bench")
    sock = os.path.join(work, "thinstore.sock")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", pool_dir, "serve",
                             "--socket", sock, "--workers", str(workers)],
                            stdout=subprocess.PIPE, env=env, text=True)
    proc.stdout.readline()
    return proc, f"nbd+unix:///bench?socket={sock}"


def setup_qemu_nbd(work: str, base: str):
    overlay = os.path.join(work, "overlay.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay],
                   check=True)
    sock = os.path.join(work, "qemu.sock")
    proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--socket", sock, "-x", "bench",
                             "--persistent", "--shared=8", "--cache=writeback", overlay])
    wait_for_socket(sock)
    return proc, f"nbd+unix:///bench?socket={sock}"


def setup_nbdkit(work: str, base: str):
    raw = os.path.join(work, "nbdkit.raw")
    subprocess.run(["cp", "--reflink=auto", "--sparse=never", base, raw], check=True)
    sock = os.path.join(work, "nbdkit.sock")
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", raw])
    wait_for_socket(sock)
    return proc, f"nbd+unix:///?socket={sock}"


def wait_for_socket(path: str) -> None:
    for _ in range(200):
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise SystemExit(f"server socket {path} did not appear")


def run_fio(uri: str, workload: dict, size: int, runtime: int) -> float:
    args = ["fio", "--output-format=json", "--name=bench", "--ioengine=nbd", f"--uri={uri}",
            f"--rw={workload['rw']}", f"--bs={workload['bs']}",
            f"--iodepth={workload['iodepth']}", f"--size={size}", "--time_based",
            f"--runtime={runtime}", "--ramp_time=1", "--randrepeat=0", "--norandommap"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    side = job["read"] if "read" in workload["rw"] else job["write"]
    return side["iops"] if workload["unit"] == "IOPS" else side["bw"] / 1024


def main() -> int:
    args = parse_args()
    size = size_bytes(args.size)
    work = args.workdir or tempfile.mkdtemp(prefix="tsbench", dir="/var/tmp")
    os.makedirs(work, exist_ok=True)
    base = os.path.join(work, "base.raw")
    print(f"preparing {size >> 20} MiB of random data in {work}", flush=True)
    make_base(base, size)
    procs, uris = [], {}
    try:
        for name, setup in (("thinstore", lambda: setup_thinstore(work, base, size, args.workers)),
                            ("qemu-nbd", lambda: setup_qemu_nbd(work, base)),
                            ("nbdkit-file", lambda: setup_nbdkit(work, base))):
            proc, uris[name] = setup()
            procs.append(proc)
        chosen = {w: v for w, v in WORKLOADS.items() if not args.only or args.only in w}
        results = {w: {s: [] for s in SERVERS} for w in chosen}
        for round_no in range(args.rounds):
            for wname, workload in chosen.items():
                order = SERVERS[round_no % 3:] + SERVERS[:round_no % 3]   # no one always first
                for server in order:
                    value = run_fio(uris[server], workload, size, args.runtime)
                    results[wname][server].append(value)
                    print(f"round {round_no + 1} {wname:18} {server:12} {value:10.0f} "
                          f"{workload['unit']}", flush=True)
        report(results)
        if args.json:
            print(json.dumps(results, indent=1))
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(30)
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def report(results: dict) -> None:
    print()
    print(f"{'workload':18} {'thinstore':>10} {'qemu-nbd':>10} {'nbdkit':>10} "
          f"{'vs qemu-nbd':>12} {'vs nbdkit':>10}")
    for wname, per in results.items():
        med = {s: statistics.median(v) for s, v in per.items()}
        unit = WORKLOADS[wname]["unit"]
        print(f"{wname:18} {med['thinstore']:10.0f} {med['qemu-nbd']:10.0f} "
              f"{med['nbdkit-file']:10.0f} {med['thinstore'] / med['qemu-nbd']:11.2f}x "
              f"{med['thinstore'] / med['nbdkit-file']:9.2f}x  ({unit})")
    print("targets: >= 1.5x qemu-nbd and >= 0.9x nbdkit-file on every workload")


if __name__ == "__main__":
    sys.exit(main())
