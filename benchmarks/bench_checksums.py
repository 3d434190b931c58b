"""What data checksums cost: 4 KiB random writes with checksums on vs off, in one run.

    python -m pytest benchmarks/bench_checksums.py --benchmark-only -s

A round is 2048 random 4 KiB writes at aligned offsets over a 256 MiB volume, then a
flush (commit), so the cost of hashing every chunk written since the last commit is
inside the measurement. Two layouts: overwrites of a filled volume (in place: write-
intent marks plus re-hashing) and first writes to an empty one (allocation). Chunk
sizes 64 KiB (the default) and 4 KiB. Target: throughput on/off >= 0.8.
"""

import os
import random

import pytest

from conftest import report
from thinstore import Pool

MiB = 1 << 20
VOL = 256 * MiB
WRITES = 2048


def _pool(tmp_path_factory, sums: bool, chunk: int, fill: bool) -> Pool:
    path = str(tmp_path_factory.mktemp(f"sums{int(sums)}c{chunk}f{int(fill)}") / "pool")
    pool = Pool.create(path, 2 * VOL, chunk, commit_interval=0, data_checksums=sums)
    pool.create_volume("v", VOL)
    if fill:
        block = os.urandom(8 * MiB)
        with pool.open_device("v") as dev:
            for off in range(0, VOL, len(block)):
                dev.pwrite(block, off)
        pool.commit()
    return pool


def _round(pool, dev, rng, data, fresh: bool):
    if fresh:                            # first writes: unmap what the last round wrote
        dev.discard(0, VOL)
        pool.commit()
    for _ in range(WRITES):
        dev.pwrite(data, rng.randrange(VOL // 4096) * 4096)
    pool.commit()


@pytest.mark.parametrize("chunk", [64 << 10, 4 << 10])
@pytest.mark.parametrize("layout", ["overwrite", "fresh"])
@pytest.mark.parametrize("sums", [False, True], ids=["off", "on"])
def test_random_4k_writes(benchmark, tmp_path_factory, results, chunk, layout, sums):
    pool = _pool(tmp_path_factory, sums, chunk, fill=layout == "overwrite")
    rng = random.Random(5)
    data = os.urandom(4096)
    with pool.open_device("v") as dev:
        benchmark.pedantic(_round, args=(pool, dev, rng, data, layout == "fresh"),
                           rounds=20, iterations=1, warmup_rounds=2)
    pool.close()
    key = f"{layout}-{chunk >> 10}K"
    _report(results, key, sums, benchmark.stats.stats,
            f"4 KiB random writes, {layout}, {chunk >> 10} KiB chunks", "; target >= 0.8")


def _read_round(pool, dev, rng, cold: bool):
    if cold and pool._sums is not None:        # forget what was verified: worst case
        pool._sums.verified[:] = False
    for _ in range(WRITES):
        dev.pread(rng.randrange(VOL // 4096) * 4096, 4096)


@pytest.mark.parametrize("chunk", [64 << 10, 4 << 10])
@pytest.mark.parametrize("sums", [False, True], ids=["off", "on"])
def test_random_4k_cold_reads(benchmark, tmp_path_factory, results, chunk, sums):
    """Reads verify every chunk they touch; a 4 KiB read of a 64 KiB chunk reads it whole."""
    pool = _pool(tmp_path_factory, sums, chunk, fill=True)
    rng = random.Random(6)
    with pool.open_device("v") as dev:
        benchmark.pedantic(_read_round, args=(pool, dev, rng, True), rounds=15,
                           iterations=1, warmup_rounds=2)
    pool.close()
    key = f"read-{chunk >> 10}K"
    _report(results, key, sums, benchmark.stats.stats,
            f"4 KiB random reads (nothing verified yet), {chunk >> 10} KiB chunks")


def _report(results, key: str, sums: bool, stats, what: str, target: str = "") -> None:
    """Throughput ratio on/off by median and by best round (fsync jitter hits medians)."""
    results[f"{key}-{sums}"] = (stats.median, stats.min)
    if f"{key}-True" in results and f"{key}-False" in results:
        (on_med, on_min), (off_med, off_min) = results[f"{key}-True"], results[f"{key}-False"]
        report(f"{what}: throughput with checksums / without = {off_med / on_med:.2f} "
               f"(median), {off_min / on_min:.2f} (best round){target}")
