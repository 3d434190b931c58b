"""Commit and status cost against the pool's capacity (issue 12), the space map's part.

    python -m pytest benchmarks/bench_capacity.py -s -p no:cacheprovider

A pool of 16 TiB (or the largest this file system holds: ext4 stops just short of
16 TiB) against one of 64 GiB, the same 64 MiB mapped in each. For the commit after
one 4 KiB write it reports, as medians of the rounds:

- the whole commit (Metadata.commit), wall and CPU; this includes what the root
  record and array roots cost, which format.py / paged.py / metadata.py own;
- the space map's share, from a cProfile of each commit: the cumulative time of
  SpaceMap.freeze, commit_prepare and commit_done (finding the flagged chunks,
  marking the refcount leaves, clearing the flags) -- the part that once scanned the
  whole per-chunk state array;
- `status` (SpaceMap.used and pending);

each as the ratio 16 TiB / 64 GiB (target <= 2), and beside it, as the named peer
in the same run, the full scan of the state array the summary replaces.
"""

from __future__ import annotations

import cProfile
import os
import pstats
import shutil
import statistics
import time

import numpy as np

from conftest import make_big_pool, report
from thinstore import Pool

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
BUF = np.random.default_rng(7).integers(1, 255, 4096, dtype=np.uint8).tobytes()
ROUNDS = 15
_OWNED = ("freeze", "commit_prepare", "commit_done")


def _spacemap_time(prof: cProfile.Profile) -> float:
    """Cumulative seconds in the space map's commit steps."""
    total = 0.0
    for (fname, _line, func), (_cc, _nc, _tt, ct, _callers) in pstats.Stats(prof).stats.items():
        if fname.endswith(os.path.join("thinstore", "spacemap.py")) and func in _OWNED:
            total += ct
    return total


def _measure(pool: Pool) -> dict:
    rng = np.random.default_rng(2)
    walls, cpus, owned, status = [], [], [], []
    with pool.open_device("vol") as dev:
        for _ in range(ROUNDS):
            dev.pwrite(BUF, int(rng.integers(0, dev.size // 4096)) * 4096)
            prof = cProfile.Profile()
            t, c = time.perf_counter(), time.process_time()
            prof.enable()
            pool.commit()
            prof.disable()
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
            owned.append(_spacemap_time(prof))
            dev.pwrite(BUF, int(rng.integers(0, dev.size // 4096)) * 4096)
            t = time.perf_counter()
            pool.status()
            status.append(time.perf_counter() - t)
        pool.commit()
    state = pool.md.space.state
    t = time.perf_counter()
    for _ in range(3):                       # the peer: one full scan of the state array
        np.flatnonzero(state[:len(state) // 8 * 8].view(np.uint64))
    scan = (time.perf_counter() - t) / 3
    med = statistics.median
    return {"commit": med(walls), "cpu": med(cpus), "owned": med(owned),
            "status": med(status), "scan": scan}


def test_commit_cost_against_capacity(tmp_path):
    out = {}
    for label, cap in (("64G", 64 * GiB), ("16T", 16 * TiB)):
        pool, got = make_big_pool(str(tmp_path / label), cap)
        pool.create_volume("vol", 10 * GiB)
        with pool.open_device("vol") as dev:            # 64 MiB mapped in both
            for c in np.random.default_rng(1).choice(10 * GiB // (64 * KiB), 1024, replace=False):
                dev.pwrite(BUF, int(c) * 64 * KiB)
        pool.commit()
        out[label] = _measure(pool) | {"capacity": got}
        pool.close()
        shutil.rmtree(tmp_path / label, ignore_errors=True)
    small, big = out["64G"], out["16T"]

    def ratio(key):
        return f"{big[key] * 1e3:.3f} ms / {small[key] * 1e3:.3f} ms = {big[key] / small[key]:.2f}"
    report(f"capacity {big['capacity'] / TiB:.2f} TiB vs 64 GiB, commit after a 4 KiB write: "
           f"whole commit {ratio('commit')} (CPU {big['cpu'] / small['cpu']:.2f}); "
           f"space map's part (cProfile) {ratio('owned')} (target <= 2); "
           f"status {ratio('status')} (target <= 2); the full state scan it replaces "
           f"costs {big['scan'] * 1e3:.1f} ms at {big['capacity'] / TiB:.2f} TiB")
