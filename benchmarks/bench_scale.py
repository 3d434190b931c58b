"""Scale (issue 12): each cost beside its peer in one run, reported as ratios.

    python -m pytest benchmarks/bench_scale.py -s -p no:cacheprovider

- commit after one 4 KiB write and snapshot creation: 16 TiB pool (or the largest
  this file system can hold) vs 64 GiB, the same data mapped (target <= 2);
- snapshot creation, commit after one 4 KiB write, destroy of one snapshot: with
  10,000 snapshots vs 10 (target <= 2 each);
- CLI `thinstore list` of 10,000 devices (target < 1 s), and the RSS of a process
  holding that pool open after list() (target < 256 MiB);
- snapshot of a 100 TiB sparse volume (one 4 KiB write) vs a 1 GiB volume: time ratio
  (target <= 2) and RSS growth per snapshot (target < 64 KiB);
- the longest stall of a client's 4 KiB reads while a device holding
  THINSTORE_BENCH_DESTROY_GIB (default 8) GiB of its own chunks is destroyed, against
  their median latency: hole punch inside the commit (as before) vs background reclaim.

Snapshots are taken through Pool.batch() (one commit for many), then reopened, so
each measured operation pays what it would in a long-lived pool.
"""

from __future__ import annotations

import os
import resource
import statistics
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import ROOT, make_big_pool, report
from thinstore import Pool

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BUF = np.random.default_rng(7).integers(1, 255, 4096, dtype=np.uint8).tobytes()


class Cost(tuple):
    """(median wall seconds, median CPU seconds of this process): on a shared machine
    the CPU time is the steadier of the two; fsync waits show only in the wall time."""

    def __truediv__(self, other):
        return f"{self[0] / other[0]:.1f} wall, {self[1] / other[1]:.1f} CPU"

    def __str__(self):
        return f"{self[0] * 1e3:.1f} ms ({self[1] * 1e3:.1f} ms CPU)"


def _median(fn, rounds: int) -> Cost:
    walls, cpus = [], []
    for _ in range(rounds):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return Cost((statistics.median(walls), statistics.median(cpus)))


def _scattered(pool, name: str, n: int, size: int) -> None:
    """n 4 KiB writes at chunk starts spread over `size` bytes, then one commit."""
    rng = np.random.default_rng(1)
    with pool.open_device(name) as dev:
        for c in rng.choice(size // (64 * KiB), n, replace=False):
            dev.pwrite(BUF, int(c) * 64 * KiB)
    pool.commit()


def _commit_after_write(pool, name: str, rounds: int = 15) -> float:
    rng = np.random.default_rng(2)
    with pool.open_device(name) as dev:
        size = dev.size

        def one():
            dev.pwrite(BUF, int(rng.integers(0, size // 4096)) * 4096)
            pool.commit()
        return _median(one, rounds)


def _snapshot_cost(pool, base: str, rounds: int = 15) -> float:
    names = iter(range(len(pool.md.devices), 10**9))
    return _median(lambda: pool.snapshot(f"{base}@bench{next(names)}"), rounds)


def test_capacity_independence(tmp_path):
    out = {}
    for label, cap in (("64G", 64 * GiB), ("16T", 16 * TiB)):
        pool, got = make_big_pool(str(tmp_path / label), cap)
        pool.create_volume("vol", 10 * GiB)
        _scattered(pool, "vol", 1024, 10 * GiB)          # 64 MiB mapped in both
        out[label] = (_commit_after_write(pool, "vol"), _snapshot_cost(pool, "vol"), got)
        pool.close()
    small, big = out["64G"], out["16T"]
    report(f"capacity {big[2] / TiB:.2f} TiB vs 64 GiB (64 MiB mapped): commit after 4 KiB "
           f"write {big[0]} / {small[0]} = {big[0] / small[0]} (target <= 2); snapshot "
           f"{big[1]} / {small[1]} = {big[1] / small[1]} (target <= 2)")


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def test_virtual_size_independence(tmp_path):
    pool = Pool.create(str(tmp_path / "p"), 64 * GiB, 64 * KiB, commit_interval=0)
    out = {}
    for label, size in (("1G", GiB), ("100T", 100 * TiB)):
        pool.create_volume(label, size)
        with pool.open_device(label) as dev:
            dev.pwrite(BUF, size // 2)
        pool.commit()
        _snapshot_cost(pool, label, 5)                 # warm
        rss = _rss_kib()
        cost = _snapshot_cost(pool, label, 40)
        out[label] = (cost, (_rss_kib() - rss) / 40)
    pool.close()
    (small, srss), (big, brss) = out["1G"], out["100T"]
    report(f"snapshot of a 100 TiB sparse volume vs 1 GiB: {big} / {small} = {big / small} "
           f"(target <= 2); RSS growth per snapshot {brss:.1f} KiB vs {srss:.1f} KiB "
           "(target < 64 KiB)")


def _snapshots(path: str, n: int) -> None:
    pool = Pool.create(path, 64 * GiB, 64 * KiB, commit_interval=0)
    pool.create_volume("vol", 10 * GiB)
    _scattered(pool, "vol", 1024, 10 * GiB)
    rng = np.random.default_rng(3)
    with pool.open_device("vol") as dev, pool.batch():
        for i in range(n):
            pool.snapshot(f"vol@s{i:05d}")
            if i % 50 == 0:       # a few writes between snapshots: pages diverge
                dev.pwrite(BUF, int(rng.integers(0, 10 * GiB // 4096)) * 4096)
    pool.close()


def _device_costs(path: str) -> tuple[float, float, float]:
    with Pool.open(path, commit_interval=0) as pool:
        snap = _snapshot_cost(pool, "vol")
        commit = _commit_after_write(pool, "vol")
        victims = iter(sorted(i.name for i in pool.list() if i.name.startswith("vol@s"))[::-1])
        destroy = _median(lambda: pool.destroy(next(victims)), 9)
    return snap, commit, destroy


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    base = tmp_path_factory.mktemp("scale")
    t = time.perf_counter()
    _snapshots(str(base / "n10"), 10)
    _snapshots(str(base / "n10000"), 10_000)
    report(f"setup: 10,000 snapshots through one batch, {time.perf_counter() - t:.1f} s")
    return base


def test_device_count_independence(many):
    few = _device_costs(str(many / "n10"))
    lots = _device_costs(str(many / "n10000"))
    for what, a, b in zip(("snapshot creation", "commit after 4 KiB write",
                           "destroy of one snapshot"), lots, few):
        report(f"{what}: 10,000 snapshots {a} / 10 snapshots {b} = {a / b} (target <= 2)")


# The peak is VmHWM, this process image's own: getrusage's ru_maxrss survives exec on
# Linux, so a child forked from a big parent (the pytest process that just built a
# 1 TiB pool) reports the parent's size.
_RSS = """
import sys, time
from thinstore import Pool
t = time.perf_counter(); c = time.process_time()
pool = Pool.open(sys.argv[1], commit_interval=0)
n = len(pool.list())
with open("/proc/self/status") as f:
    hwm = int(f.read().split("VmHWM:")[1].split()[0])
print(n, hwm, time.perf_counter() - t, time.process_time() - c)
pool.close()
"""


def test_list_and_rss_at_ten_thousand(many):
    path = str(many / "n10000")
    env = dict(os.environ, PYTHONPATH=ROOT)
    walls, cpus = [], []
    for _ in range(3):
        t = time.perf_counter()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run([sys.executable, "-m", "thinstore", "--pool", path, "list"],
                              capture_output=True, env=env, check=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        walls.append(time.perf_counter() - t)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
        assert done.stdout.count(b"\n") >= 10_000
    report(f"CLI list of 10,001 devices: {min(walls):.2f} s wall (best of 3), "
           f"{min(cpus):.2f} s CPU (target < 1 s); load average {os.getloadavg()[0]:.1f}")
    out = subprocess.run([sys.executable, "-c", _RSS, path], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    report(f"open pool at 10,000 snapshots, after list(): RSS {int(out[1]) / 1024:.0f} MiB "
           f"(target < 256 MiB); open+list in-process {float(out[2]):.2f} s wall, "
           f"{float(out[3]):.2f} s CPU")


def _mapped(path: str, nbytes: int) -> None:
    """A pool whose one volume maps `nbytes` (64 KiB chunks, every chunk of it), made by
    filling the map pages in memory and committing: writing a block into each of 16M
    chunks would take hours and 64 GiB of disk; the data file stays sparse (checksums
    off, so the unwritten chunks read as zeros without complaint)."""
    from thinstore.format import FANOUT
    pool = Pool.create(path, nbytes + GiB, 64 * KiB, data_checksums=False, commit_interval=0)
    pool.create_volume("big", nbytes)
    md = pool.md
    maps, refs, dm = md.maps, md.space.refs, md.devices.named("big")[0]
    n = nbytes // (64 * KiB)
    npages = -(-n // FANOUT)
    with pool.lock:
        while maps.capacity <= npages:
            maps._grow()
        pids = np.arange(1, npages + 1)
        chunks = np.zeros(npages * FANOUT, dtype=np.uint64)
        chunks[:n] = np.arange(1, n + 1, dtype=np.uint64)
        maps.pages[1:npages + 1] = chunks.reshape(npages, FANOUT)
        maps.ref[pids] = 1
        maps.loaded[pids] = True
        maps.dirty[pids] = 1
        dm.directory.arr[:npages] = pids
        dm.directory.mark_range(0, npages)
        refs.arr[1:n + 1] = 1
        refs.mark_range(1, n + 1)
        md.space.recount()              # set directly, not through the kernels
        md.space.cursor = n + 1
    pool.commit()
    pool.close()


def test_rss_at_one_tebibyte_mapped(tmp_path):
    path = str(tmp_path / "tib")
    t = time.perf_counter()
    _mapped(path, TiB)
    made = time.perf_counter() - t
    env = dict(os.environ, PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _RSS, path], capture_output=True, text=True,
                         env=env, check=True).stdout.split()
    report(f"open pool with 1 TiB mapped (16M chunks, made in {made:.0f} s), after list(): "
           f"RSS {int(out[1]) / 1024:.0f} MiB (target < 256 MiB); open+list "
           f"{float(out[2]):.2f} s wall")


def _fill_exclusive(pool, name: str, nbytes: int) -> None:
    block = np.random.default_rng(4).integers(1, 255, 8 * MiB, dtype=np.uint8).tobytes()
    with pool.open_device(name) as dev:
        for off in range(0, nbytes, len(block)):
            dev.pwrite(block, off)
    pool.commit()


def _stall(tmp_path, nbytes: int, background: bool) -> tuple[float, float, float, float]:
    """(median read latency, longest read latency, destroy call time, longest read in
    the quiet second before: this machine's noise) while a device of `nbytes`
    exclusive chunks is destroyed and its space given back."""
    pool = Pool.create(str(tmp_path / f"stall{int(background)}"), nbytes + 2 * GiB, 64 * KiB,
                       commit_interval=0)
    pool.create_volume("hot", 256 * MiB)
    pool.create_volume("big", nbytes)
    _fill_exclusive(pool, "hot", 256 * MiB)
    _fill_exclusive(pool, "big", nbytes)
    if not background:
        pool.md.reclaim = None           # the old way: punch inside destroy's commit
    lat, stop = [], threading.Event()

    def reader():
        rng = np.random.default_rng(5)
        with pool.open_device("hot") as dev:
            buf = bytearray(4096)
            while not stop.is_set():
                off = int(rng.integers(0, 256 * MiB // 4096)) * 4096
                t = time.perf_counter()
                dev.readinto(buf, off)
                lat.append(time.perf_counter() - t)
    th = threading.Thread(target=reader)
    th.start()
    time.sleep(1.0)
    quiet = max(lat) if lat else 0.0
    lat.clear()
    t = time.perf_counter()
    pool.destroy("big")
    took = time.perf_counter() - t
    pool.wait_freed()
    time.sleep(0.5)
    stop.set()
    th.join()
    pool.close()
    return statistics.median(lat), max(lat), took, quiet


def test_destroy_stall(tmp_path):
    nbytes = int(os.environ.get("THINSTORE_BENCH_DESTROY_GIB", "8")) * GiB
    inline = _stall(tmp_path, nbytes, background=False)
    bg = _stall(tmp_path, nbytes, background=True)
    for label, (med, worst, took, quiet) in (("punch in commit", inline), ("background", bg)):
        report(f"destroy {nbytes // GiB} GiB exclusive, {label}: destroy call {took:.2f} s; "
               f"4 KiB reads median {med * 1e6:.0f} us, longest {worst * 1e3:.1f} ms, "
               f"ratio {worst / med:.0f} (longest in a quiet second before: "
               f"{quiet * 1e3:.1f} ms)")
