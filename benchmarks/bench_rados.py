#!/usr/bin/env python3
"""thinstore on RADOS against RBD (served by qemu-nbd) on the same single-node Ceph cluster.

Both store their images in one RADOS pool of one cluster (by default started here with
tools/ceph_cluster.py: one monitor, one bluestore OSD on a sparse file), so the ratios
compare the two block layers, not two clusters:

1. fio through NBD (unix socket, fio's nbd engine): 4 KiB random read and write QD16,
   1 MiB sequential read and write QD4; thinstore serve vs qemu-nbd over librbd
   (qemu-nbd's default cache, librbd's default cache; neither is durable before FLUSH);
2. a snapshot of an image with --size written (thinstore snapshot / rbd snap create);
3. rollback of that image to the snapshot after rewriting 10 % of it
   (thinstore rollback swaps a map; rbd snap rollback rewrites the image);
4. the changes since a snapshot when 1 % of a --diff-size image changed
   (thinstore diff / rbd diff --from-snap);
5. 4 KiB random reads QD16 through a clone of a clone ... depth 8, as a ratio to the
   same reads at depth 0 (RBD reads walk the parent chain: ceph-csi flattens at 8).

Every timing is the median of --rounds runs of the command as a user types it (CLI,
process start included for both sides).

    python benchmarks/bench_rados.py [--size 1G] [--diff-size 4G] [--runtime 10] [--rounds 3]
                                     [--conf ceph.conf --pool RADOSPOOL]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.fio_compare import run_fio, size_bytes, wait_for_socket  # noqa: E402

WORKLOADS = {
    "4K randread QD16": dict(rw="randread", bs="4k", iodepth=16, unit="IOPS"),
    "4K randwrite QD16": dict(rw="randwrite", bs="4k", iodepth=16, unit="IOPS"),
    "1M read QD4": dict(rw="read", bs="1m", iodepth=4, unit="MiB/s"),
    "1M write QD4": dict(rw="write", bs="1m", iodepth=4, unit="MiB/s"),
}
CHAIN = 8


class Bench:
    def __init__(self, args, conf: str, pool: str, work: str):
        self.args, self.conf, self.pool, self.work = args, conf, pool, work
        self.tag = f"b{os.getpid()}"
        self.lines: list[str] = []
        self.procs: list[subprocess.Popen] = []

    # ------------------------------------------------------------ helpers
    def loc(self, name: str) -> str:
        return f"rados://{self.pool}/{self.tag}-{name}?conf={self.conf}"

    def ts(self, loc: str, *args: str) -> str:
        env = dict(os.environ, PYTHONPATH=ROOT)
        return subprocess.run([sys.executable, "-m", "thinstore", "--pool", loc, *args],
                              check=True, capture_output=True, text=True, env=env).stdout

    def rbd(self, *args: str) -> str:
        return subprocess.run(["rbd", "-c", self.conf, "-p", self.pool, *args], check=True,
                              capture_output=True, text=True).stdout

    def timed(self, fn, *args) -> float:
        t = time.perf_counter()
        fn(*args)
        return time.perf_counter() - t

    def say(self, line: str) -> None:
        print(line, flush=True)
        self.lines.append(line)

    def ratio(self, what: str, ours: float, theirs: float, unit: str, lower_better: bool):
        r = ours / theirs if theirs else float("inf")
        better = (r < 1) if lower_better else (r > 1)
        self.say(f"{what:<44} thinstore {ours:10.3f} {unit:<6} rbd {theirs:10.3f} {unit:<6} "
                 f"ratio {r:6.2f} ({'better' if better else 'worse'})")

    def serve(self, loc: str, sock: str) -> str:
        env = dict(os.environ, PYTHONPATH=ROOT)
        p = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", loc, "serve",
                              "--socket", sock], stdout=subprocess.DEVNULL, env=env)
        self.procs.append(p)
        wait_for_socket(sock)
        return sock

    def qemu_nbd(self, image: str, sock: str) -> str:
        p = subprocess.Popen(["qemu-nbd", "-t", "-k", sock, "-f", "raw", "-x", "bench",
                              f"rbd:{self.pool}/{image}:conf={self.conf}"])
        self.procs.append(p)
        wait_for_socket(sock)
        return sock

    def stop_all(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(timeout=60)
        self.procs.clear()

    def data_file(self, size: int) -> str:
        path = os.path.join(self.work, f"data-{size}")
        if not os.path.exists(path):
            with open(path, "wb") as f:
                for _ in range(size >> 20):
                    f.write(os.urandom(1 << 20))
        return path

    # ------------------------------------------------------------ 1. fio
    def fio(self) -> None:
        size = size_bytes(self.args.size)
        data = self.data_file(size)
        self.ts(self.loc("fio"), "init", "--capacity", str(4 * size))
        self.ts(self.loc("fio"), "import", "bench", data)
        self.rbd("import", data, f"{self.tag}-fio")
        ours = self.serve(self.loc("fio"), os.path.join(self.work, "ts.sock"))
        theirs = self.qemu_nbd(f"{self.tag}-fio", os.path.join(self.work, "rbd.sock"))
        res = {k: {"ts": [], "rbd": []} for k in WORKLOADS}
        for rnd in range(self.args.rounds):
            for name, wl in WORKLOADS.items():
                order = [("ts", ours), ("rbd", theirs)][::1 if rnd % 2 == 0 else -1]
                for who, sock in order:
                    res[name][who].append(run_fio(f"nbd+unix:///bench?socket={sock}", wl,
                                                  size, self.args.runtime))
        self.stop_all()
        for name, wl in WORKLOADS.items():
            self.ratio(f"fio {name} ({wl['unit']}, median)", statistics.median(res[name]["ts"]),
                       statistics.median(res[name]["rbd"]), wl["unit"], lower_better=False)

    # ------------------------------------------------------------ 2, 3. snapshot, rollback
    def snapshot_and_rollback(self) -> None:
        size = size_bytes(self.args.size)
        data = self.data_file(size)
        loc, img = self.loc("snap"), f"{self.tag}-snap"
        self.ts(loc, "init", "--capacity", str(4 * size))
        self.ts(loc, "import", "vol", data)
        self.rbd("import", data, img)
        snap_ts, snap_rbd, rb_ts, rb_rbd = [], [], [], []
        tenth = os.path.join(self.work, "tenth")
        with open(tenth, "wb") as f:
            f.write(os.urandom(size // 10))
        for rnd in range(self.args.rounds):
            snap_ts.append(self.timed(self.ts, loc, "snapshot", f"vol@s{rnd}"))
            snap_rbd.append(self.timed(self.rbd, "snap", "create", f"{img}@s{rnd}"))
            self._rewrite_tenth(loc, img, tenth)
            rb_ts.append(self.timed(self.ts, loc, "rollback", f"vol@s{rnd}"))
            rb_rbd.append(self.timed(self.rbd, "snap", "rollback", "--no-progress",
                                     f"{img}@s{rnd}"))
        self.ratio(f"snapshot of a {self.args.size} image (s, median)",
                   statistics.median(snap_ts), statistics.median(snap_rbd), "s", True)
        self.ratio(f"rollback of a {self.args.size} image (s, median)",
                   statistics.median(rb_ts), statistics.median(rb_rbd), "s", True)
        floor_ts = statistics.median(self.timed(self.ts, loc, "status") for _ in range(3))
        floor_rbd = statistics.median(self.timed(self.rbd, "info", img) for _ in range(3))
        self.ratio("  floor: a read-only command (status / info)", floor_ts, floor_rbd, "s",
                   True)
        self._in_process(loc)

    def _in_process(self, loc: str) -> None:
        """The operations' own cost, without process start and cluster connection."""
        from thinstore import Pool
        with Pool.open(loc, commit_interval=0) as pool:
            snap = self.timed(pool.snapshot, "vol@inproc")
            back = self.timed(pool.rollback, "vol@inproc")
        self.say(f"  thinstore API in an open pool: snapshot {snap * 1000:.1f} ms, "
                 f"rollback {back * 1000:.1f} ms")

    def _rewrite_tenth(self, loc: str, img: str, tenth: str) -> None:
        """10 % of each image rewritten between snapshot and rollback, through NBD."""
        ours = self.serve(loc, os.path.join(self.work, "ts.sock"))
        theirs = self.qemu_nbd(img, os.path.join(self.work, "rbd.sock"))
        for uri in (f"nbd+unix:///vol?socket={ours}", f"nbd+unix:///bench?socket={theirs}"):
            subprocess.run(["nbdcopy", tenth, uri], check=True)
        self.stop_all()

    # ------------------------------------------------------------ 4. diff
    def diff(self) -> None:
        size = size_bytes(self.args.diff_size)
        data = self.data_file(size)
        loc, img = self.loc("diff"), f"{self.tag}-diff"
        self.ts(loc, "init", "--capacity", str(2 * size))
        self.ts(loc, "import", "vol", data)
        self.ts(loc, "snapshot", "vol@base")
        self.rbd("import", data, img)
        self.rbd("snap", "create", f"{img}@base")
        ours = self.serve(loc, os.path.join(self.work, "ts.sock"))
        theirs = self.qemu_nbd(img, os.path.join(self.work, "rbd.sock"))
        for sock, export in ((ours, "vol"), (theirs, "bench")):
            subprocess.run(["fio", "--name=change", "--ioengine=nbd",
                            f"--uri=nbd+unix:///{export}?socket={sock}", "--rw=randwrite",
                            "--bs=64k", "--iodepth=16", f"--size={size}",
                            f"--io_size={size // 100}", "--randrepeat=1", "--norandommap"],
                           check=True, capture_output=True)
        self.stop_all()
        t_ts = [self.timed(self.ts, loc, "diff", "vol@base", "vol") for _ in range(self.args.rounds)]
        t_rbd = [self.timed(self.rbd, "diff", "--from-snap", "base", img)
                 for _ in range(self.args.rounds)]
        self.ratio(f"diff, 1% changed of {self.args.diff_size} (s, median)",
                   statistics.median(t_ts), statistics.median(t_rbd), "s", True)

    # ------------------------------------------------------------ 5. clone chain
    def chain(self) -> None:
        size = size_bytes(self.args.size)
        data = self.data_file(size)
        loc, base = self.loc("chain"), f"{self.tag}-c0"
        self.ts(loc, "init", "--capacity", str(4 * size))
        self.ts(loc, "import", "c0", data)
        self.rbd("import", "--image-format", "2", data, base)
        for d in range(1, CHAIN + 1):
            self.ts(loc, "snapshot", f"c{d - 1}@s")
            self.ts(loc, "clone", f"c{d - 1}@s", f"c{d}")
            self.rbd("snap", "create", f"{self.tag}-c{d - 1}@s")
            self.rbd("snap", "protect", f"{self.tag}-c{d - 1}@s")
            self.rbd("clone", f"{self.pool}/{self.tag}-c{d - 1}@s",
                     f"{self.pool}/{self.tag}-c{d}")
        wl = WORKLOADS["4K randread QD16"]
        out = {}
        for depth in (0, CHAIN):
            ours = self.serve(loc, os.path.join(self.work, "ts.sock"))
            theirs = self.qemu_nbd(f"{self.tag}-c{depth}", os.path.join(self.work, "rbd.sock"))
            out[depth] = (statistics.median(run_fio(f"nbd+unix:///c{depth}?socket={ours}", wl, size,
                                                    self.args.runtime)
                                            for _ in range(self.args.rounds)),
                          statistics.median(run_fio(f"nbd+unix:///bench?socket={theirs}", wl,
                                                    size, self.args.runtime)
                                            for _ in range(self.args.rounds)))
            self.stop_all()
        self.ratio(f"4K randread QD16 at clone depth {CHAIN} (IOPS)", out[CHAIN][0],
                   out[CHAIN][1], "IOPS", False)
        self.say(f"{'depth ' + str(CHAIN) + ' / depth 0, each on itself':<44} thinstore "
                 f"{out[CHAIN][0] / out[0][0]:10.3f}        rbd {out[CHAIN][1] / out[0][1]:10.3f}")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G", help="image size for fio, snapshot, rollback, chain")
    p.add_argument("--diff-size", default="4G", help="image size for the diff (default 4G)")
    p.add_argument("--runtime", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="repetitions, median kept (default 3)")
    p.add_argument("--conf", help="an existing cluster's ceph.conf (default: start one)")
    p.add_argument("--pool", default="thinstore", help="RADOS pool (default thinstore)")
    p.add_argument("--only", help="comma-separated: fio,snapshot,diff,chain")
    p.add_argument("--port", type=int, default=17400, help="monitor port of a started cluster")
    return p.parse_args()


def main() -> int:
    args = parse_args()
    for tool in ("fio", "qemu-nbd", "rbd", "nbdcopy"):
        if not shutil.which(tool):
            sys.exit(f"bench_rados: {tool} is not installed")
    work = tempfile.mkdtemp(prefix="tsbench", dir="/tmp")
    cluster = None
    conf = args.conf
    try:
        if conf is None:
            cluster = os.path.join(work, "ceph")
            out = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ceph_cluster.py"),
                                  "start", cluster, "--store", "bluestore", "--size", "40G",
                                  "--port", str(args.port), "--pool", args.pool],
                                 check=True, capture_output=True, text=True).stdout
            conf = dict(line.split("=", 1) for line in out.split())["THINSTORE_TEST_CEPH_CONF"]
        b = Bench(args, conf, args.pool, work)
        only = set((args.only or "fio,snapshot,diff,chain").split(","))
        try:
            for name, fn in (("fio", b.fio), ("snapshot", b.snapshot_and_rollback),
                             ("diff", b.diff), ("chain", b.chain)):
                if name in only:
                    fn()
        finally:
            b.stop_all()
        print("\n".join(["", "summary (thinstore on RADOS vs RBD + qemu-nbd, same cluster):",
                         *b.lines]))
    finally:
        if cluster is not None:
            subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ceph_cluster.py"),
                            "stop", cluster], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
