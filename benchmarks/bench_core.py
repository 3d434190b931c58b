"""Core metadata costs, each case measured beside its peer in one run.

    python -m pytest benchmarks/bench_core.py --benchmark-only -s

- snapshot of a volume with 8 GiB mapped vs 64 MiB mapped (target ratio <= 2);
- commit after one 4 KiB write on a 1 TiB sparse volume vs a 1 GiB volume (target <= 2);
- metadata bytes per mapped chunk (target <= 24 B).
"""

import itertools

import numpy as np
import pytest

from conftest import report
from thinstore import Pool

GiB = 1 << 30
MiB = 1 << 20


def _fill(pool, name, nbytes, block=8 * MiB):
    buf = np.random.default_rng(1).integers(1, 255, block, dtype=np.uint8).tobytes()
    with pool.open_device(name) as dev:
        for off in range(0, nbytes, block):
            dev.pwrite(buf, off)
    pool.commit()


@pytest.fixture(scope="module")
def snap_pool(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("snap") / "pool")
    pool = Pool.create(path, 9 * GiB, 64 << 10, commit_interval=0)
    pool.create_volume("small", 64 * MiB)
    pool.create_volume("big", 8 * GiB)
    _fill(pool, "small", 64 * MiB)
    _fill(pool, "big", 8 * GiB)
    yield pool
    pool.close()


@pytest.mark.parametrize("name", ["small", "big"])
def test_snapshot_cost(benchmark, snap_pool, results, name):
    counter = itertools.count()

    def take():
        snap = f"{name}@s{next(counter)}"
        snap_pool.snapshot(snap)
        return snap

    def undo(snap):
        snap_pool.destroy(snap)

    benchmark.pedantic(lambda: undo(take()), rounds=20, iterations=1)
    results[f"snapshot-{name}"] = benchmark.stats.stats.median
    if "snapshot-small" in results and "snapshot-big" in results:
        report(f"snapshot+destroy 8 GiB mapped / 64 MiB mapped: "
               f"{results['snapshot-big'] / results['snapshot-small']:.2f} (target <= 2)")


@pytest.fixture(scope="module")
def commit_pool(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("commit") / "pool")
    pool = Pool.create(path, 4 * GiB, 64 << 10, commit_interval=0)
    pool.create_volume("tib", 1 << 40)
    pool.create_volume("gib", GiB)
    yield pool
    pool.close()


@pytest.mark.parametrize("name", ["gib", "tib"])
def test_commit_after_one_write(benchmark, commit_pool, results, name):
    rng = np.random.default_rng(2)
    dev = commit_pool.open_device(name)
    buf = b"\x5a" * 4096

    def write_commit():
        off = int(rng.integers(0, dev.size // 4096)) * 4096
        dev.pwrite(buf, off)
        commit_pool.commit()

    benchmark.pedantic(write_commit, rounds=50, iterations=1)
    dev.close()
    results[f"commit-{name}"] = benchmark.stats.stats.median
    if "commit-gib" in results and "commit-tib" in results:
        report(f"4 KiB write + commit, 1 TiB sparse / 1 GiB volume: "
               f"{results['commit-tib'] / results['commit-gib']:.2f} (target <= 2)")


def test_metadata_bytes_per_mapped_chunk(benchmark, tmp_path):
    pool = Pool.create(str(tmp_path / "pool"), 4 * GiB, 64 << 10, commit_interval=0)
    pool.create_volume("v", 2 * GiB)
    benchmark.pedantic(lambda: _fill(pool, "v", 2 * GiB), rounds=1, iterations=1)
    chunks = pool.md.space.used()
    used_blocks = int(pool.md.store.used.sum())
    per_chunk = used_blocks * 4096 / chunks
    report(f"metadata bytes per mapped chunk: {per_chunk:.1f} B over {chunks} chunks "
           "(target <= 24)")
    pool.close()
