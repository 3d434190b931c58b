#!/usr/bin/env python3
"""containerd snapshotters side by side: thinstore against native and overlayfs.

One containerd (its own, started with .ci/services/containerd.sh unless
THINSTORE_TEST_CONTAINERD_ADDRESS names one), thinstore's snapshotter over a fresh pool, and
one image: busybox, /etc, and a layer of ``--size`` (1 GiB) of non-zero bytes, ingested
into the content store once and then unpacked once per snapshotter (import s: that unpack,
with ctr's re-read of the tarball).  Then, per snapshotter:

- start: ``ctr run --rm IMAGE ID true``, repeated ``--rounds`` times, the snapshotters
  interleaved round by round; the median wall time.  That is Prepare (native copies the
  parent's whole tree, overlayfs stacks directories, thinstore clones a block map and
  attaches a device), the mount, runc's start and exit, and the removal.
- space: ``--containers`` (20) containers run once each (``ctr run`` without --rm, so each
  keeps its snapshot, ``true`` as the command); the growth of the bytes on disk: thinstore's
  pool (its ``used`` and the data file's allocated bytes), native's and overlayfs' snapshot
  directories (du).

    python benchmarks/bench_containerd.py [--size 1G] [--rounds 5] [--containers 20]

Needs root, containerd, runc, nbdfuse; prints a table and thinstore's ratio to each peer.
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
sys.path.insert(0, os.path.join(ROOT, "tests"))

from containerd_helpers import Containerd, Snapshotter, wait_for  # noqa: E402
from oci_image import make_image  # noqa: E402

SNAPSHOTTERS = ("thinstore", "native", "overlayfs")
REF = "thinstore.bench/busybox:big"
NS = "bench"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="1G", help="the image's big layer (default 1G)")
    p.add_argument("--rounds", type=int, default=5, help="starts per snapshotter (default 5)")
    p.add_argument("--containers", type=int, default=20, help="for the space test (20)")
    p.add_argument("--workdir", help="where pool and image go (default: a temp dir)")
    return p.parse_args()


def size_bytes(text: str) -> int:
    units = {"K": 10, "M": 20, "G": 30}
    return int(text[:-1]) << units[text[-1].upper()] if text[-1].upper() in units else int(text)


def du(path: str) -> int:
    """Allocated bytes under path (0 when it does not exist)."""
    if not os.path.exists(path):
        return 0
    out = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True,
                         text=True).stdout
    return int(out.split()[0]) if out else 0


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.workdir or tempfile.mkdtemp(prefix="ts-bctd-")
        self.ctd = Containerd()
        pool = os.path.join(self.work, "pool")
        size = size_bytes(args.size)
        base = max(2 << 30, 2 * size)
        capacity = base + (args.containers + 8) * (size + (256 << 20))
        subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, "init",
                        "--capacity", str(capacity)], check=True, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=ROOT))
        self.snap = Snapshotter(pool, self.ctd.snapshotter_socket, base_size=str(base))
        self.snap.start()
        assert self.ctd.reaches_snapshotter(), "containerd does not reach the snapshotter"
        self.image = os.path.join(self.work, "image.tar")

    def ctr(self, *args, timeout=1800):
        return self.ctd.ctr(NS, *args, timeout=timeout)

    def root_of(self, name: str) -> str:
        """Where containerd keeps snapshotter ``name``'s snapshots: ROOT/io.containerd.
        snapshotter.v1.NAME, ROOT beside the socket (.ci/services/containerd.sh's layout)."""
        return os.path.join(os.path.dirname(self.ctd.address), "root",
                            f"io.containerd.snapshotter.v1.{name}")

    def bytes_of(self, name: str) -> dict:
        if name == "thinstore":
            return {"used": self.snap.used(),
                    "disk": du(os.path.join(self.snap.pool, "data"))}
        return {"used": du(self.root_of(name)), "disk": du(self.root_of(name))}

    def run(self):
        t0 = time.perf_counter()
        make_image(self.image, REF, extra=[{"data/big": size_bytes(self.args.size)}])
        print(f"image: {self.args.size} layer + busybox, {time.perf_counter() - t0:.1f}s to write")
        result = {n: {} for n in SNAPSHOTTERS}
        t0 = time.perf_counter()        # the blobs into the content store, for all alike
        self.ctr("images", "import", "--no-unpack", self.image)
        print(f"content store ingest: {time.perf_counter() - t0:.1f}s")
        for name in SNAPSHOTTERS:
            t0 = time.perf_counter()
            self.ctr("images", "import", "--snapshotter", name, self.image)
            result[name]["import_s"] = time.perf_counter() - t0
        starts = {n: [] for n in SNAPSHOTTERS}
        for r in range(self.args.rounds):
            order = SNAPSHOTTERS[r % 3:] + SNAPSHOTTERS[:r % 3]
            for name in order:
                t0 = time.perf_counter()
                self.ctr("run", "--rm", "--snapshotter", name, REF, f"start-{name}-{r}", "true")
                starts[name].append(time.perf_counter() - t0)
        for name in SNAPSHOTTERS:
            result[name]["start_s"] = statistics.median(starts[name])
        for name in SNAPSHOTTERS:
            self.settle()
            before = self.bytes_of(name)
            for i in range(self.args.containers):
                self.ctr("run", "--snapshotter", name, REF, f"keep-{name}-{i}", "true")
            after = self.bytes_of(name)
            result[name]["containers_used"] = after["used"] - before["used"]
            result[name]["containers_disk"] = after["disk"] - before["disk"]
            for i in range(self.args.containers):
                self.ctr("containers", "rm", f"keep-{name}-{i}")
        return result

    def settle(self):
        """Let containerd's garbage collection finish removing the last snapshots."""
        wait_for(lambda: not [n for n in self.snap.devices() if n.startswith("ctd-")
                              and "@" not in n], tries=200)

    def close(self):
        for ref in self.ctd.ctr(NS, "images", "ls", "-q", check=False).stdout.split():
            self.ctd.ctr(NS, "images", "rm", "--sync", ref, check=False)
        self.snap.stop()
        self.ctd.close()
        if not self.args.workdir:
            shutil.rmtree(self.work, ignore_errors=True)


def report(result: dict, args) -> None:
    mib = 1 << 20
    print(f"\n{'snapshotter':<12}{'import s':>10}{'start s':>10}"
          f"{f'{args.containers} ctrs used MiB':>22}{'disk MiB':>12}")
    for name, r in result.items():
        print(f"{name:<12}{r['import_s']:>10.2f}{r['start_s']:>10.3f}"
              f"{r['containers_used'] / mib:>22.1f}{r['containers_disk'] / mib:>12.1f}")
    t = result["thinstore"]
    for peer in ("native", "overlayfs"):
        p = result[peer]
        print(f"thinstore/{peer}: start time x{t['start_s'] / p['start_s']:.2f}, "
              f"space for {args.containers} containers x"
              f"{t['containers_used'] / max(p['containers_used'], 1):.4f}")
    print(json.dumps(result))


def main() -> int:
    args = parse_args()
    bench = Bench(args)
    try:
        report(bench.run(), args)
    finally:
        bench.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
