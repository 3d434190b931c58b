"""Native kernels against their pure-Python twins, in one run.

    python -m pytest benchmarks/bench_kernels.py --benchmark-only -p no:cacheprovider

Each scenario runs once per backend (the volume API is switched by rebinding the
one name the core calls kernels through, ``K``); a summary at the end prints the
ratios the native hot path is held to:

- translating a 1M-entry map range:                      native >= 20x the twin
- 4 KiB random writes via Device.pwrite, shared (COW) and exclusive chunks: >= 5x
- COW copy of 64 KiB chunks on a page-cached file, as a fraction of a numpy copy
  of the same bytes in memory:                           target >= 0.5
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

import thinstore.pool
from thinstore import Pool, kernels as TWIN, native
from thinstore.format import FANOUT
from thinstore.storage import FileIO

NAT = native.NATIVE
pytestmark = pytest.mark.skipif(NAT is None, reason=f"no native build: {native.WHY_NOT_NATIVE}")
BACKENDS = [pytest.param(TWIN, id="python"), pytest.param(NAT, id="native")]
RESULTS: dict[tuple[str, str], float] = {}  # (scenario, backend) -> median seconds
SHIFT = 16
CHUNK = 1 << SHIFT


def _name(k) -> str:
    return "python" if k is TWIN else "native"


def _record(benchmark, scenario: str, who: str) -> None:
    RESULTS[(scenario, who)] = benchmark.stats.stats.median


# ---- 1. translation --------------------------------------------------------

@pytest.fixture(scope="module")
def big_map():
    """1M virtual chunks, mostly mapped in runs of 1..64 consecutive chunks."""
    n = 1 << 20
    rng = np.random.default_rng(7)
    n_dir = -(-n // FANOUT)
    pages = np.zeros((n_dir + 1, FANOUT), np.uint64)
    flat = pages[1:].reshape(-1)
    i = 0
    while i < n:
        run = int(rng.integers(1, 65))
        if rng.random() < 0.8:
            start = int(rng.integers(1, 1 << 30))
            flat[i:i + run] = np.arange(start, start + run)[:len(flat) - i]
        i += run
    dirarr = np.arange(1, n_dir + 1, dtype=np.uint64)
    out = np.empty((n + 2, 3), np.int64)
    return dirarr, pages, out, n << SHIFT


@pytest.mark.parametrize("k", BACKENDS)
def test_translate_1m(benchmark, k, big_map):
    dirarr, pages, out, size = big_map
    off, length = 12345, size - 2 * 12345  # unaligned both ends
    rows = benchmark.pedantic(k.translate, (dirarr, pages, SHIFT, off, length, out),
                              rounds=3 if k is TWIN else 30, iterations=1)
    assert rows > 0
    _record(benchmark, "translate 1M entries", _name(k))


# ---- 2. 4 KiB random writes through the volume API -------------------------

WRITES_PER_ROUND = 200
ROUNDS = 5


def _use(k) -> None:
    """Route the core through kernels k (the core reads K from these modules)."""
    thinstore.pool.K = k
    native.K = k


class Volume:
    pool: Pool
    dev: object


TMPFS = "/dev/shm"


@pytest.fixture(params=["disk", "tmpfs"])
def volume(request, tmp_path):
    """A 256 MiB volume written in full (every chunk mapped and exclusive), in the
    test's temporary directory ("disk") or on tmpfs, where a 4 KiB pwrite costs
    little and the difference between the backends shows undiluted."""
    where = request.param
    if where == "tmpfs":
        if not os.path.isdir(TMPFS):
            pytest.skip(f"no tmpfs at {TMPFS}")
        tmp_path = Path(tempfile.mkdtemp(dir=TMPFS))
        request.addfinalizer(lambda: shutil.rmtree(tmp_path, ignore_errors=True))
    pool = Pool.create(str(tmp_path / "pool"), capacity=1 << 30, chunk_size=CHUNK,
                       commit_interval=0)
    pool.create_volume("v", 256 << 20)
    dev = pool.open_device("v")
    block = np.random.default_rng(1).integers(1, 256, 8 << 20, np.uint8).tobytes()
    for off in range(0, 256 << 20, len(block)):
        dev.pwrite(block, off)
    pool.commit()
    saved = (thinstore.pool.K, native.K)
    vol = Volume()
    vol.pool, vol.dev, vol.where = pool, dev, where
    yield vol
    thinstore.pool.K, native.K = saved
    vol.dev.close()
    pool.close()


def _random_writes(dev, chunks, data):
    """One round: a 4 KiB write at a random 4 KiB-aligned spot of each chunk."""
    rng = np.random.default_rng(len(chunks))
    offs = [(c << SHIFT) + (int(x) << 12) for c, x in zip(chunks, rng.integers(0, 16, len(chunks)))]
    def run():
        for off in offs:
            dev.pwrite(data, off)
    return run


@pytest.mark.parametrize("shared", [False, True], ids=["exclusive", "shared-cow"])
@pytest.mark.parametrize("k", BACKENDS)
def test_random_4k_writes(benchmark, k, shared, volume):
    pool = volume.pool
    _use(k)
    if shared:  # every chunk now shared with the snapshot: each first write copies
        volume.dev.close()
        pool.snapshot("v@s")
        volume.dev = pool.open_device("v")
    dev = volume.dev
    order = np.random.default_rng(2).permutation(dev.size >> SHIFT)
    rounds = iter(order[i * WRITES_PER_ROUND:(i + 1) * WRITES_PER_ROUND] for i in range(ROUNDS))
    data = os.urandom(4096)
    benchmark.pedantic(lambda: _random_writes(dev, next(rounds), data)(), rounds=ROUNDS,
                       iterations=1)
    assert (pool.counters["chunks_copied"] >= WRITES_PER_ROUND * ROUNDS) == shared
    kind = "shared (COW)" if shared else "exclusive"
    RESULTS[(f"4 KiB writes, {kind}, {volume.where}", _name(k))] = \
        benchmark.stats.stats.median / WRITES_PER_ROUND


# ---- 3. COW copy throughput --------------------------------------------------

N_COPY = 256  # 64 KiB chunks per round: 16 MiB


@pytest.fixture(scope="module")
def cached_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cow") / "data"
    data = np.random.default_rng(3).integers(0, 256, 2 * N_COPY * CHUNK, np.uint8)
    data.tofile(path)
    fio = FileIO(str(path))
    os.pread(fio.fd, 2 * N_COPY * CHUNK, 0)  # page-cache it
    yield fio
    fio.close()


@pytest.mark.parametrize("k", BACKENDS)
def test_cow_copy_64k(benchmark, k, cached_file):
    fio = cached_file
    def run():
        for i in range(N_COPY):
            k.cow_copy(fio, i * CHUNK, (N_COPY + i) * CHUNK, CHUNK)
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=1)
    assert os.pread(fio.fd, CHUNK, 0) == os.pread(fio.fd, CHUNK, N_COPY * CHUNK)
    _record(benchmark, "cow_copy 64 KiB x 256", _name(k))


def test_numpy_copy_same_bytes(benchmark):
    src = np.random.default_rng(4).integers(0, 256, N_COPY * CHUNK, np.uint8)
    dst = np.empty_like(src)
    benchmark.pedantic(np.copyto, (dst, src), rounds=20, iterations=1, warmup_rounds=1)
    _record(benchmark, "cow_copy 64 KiB x 256", "numpy")


# ---- summary ----------------------------------------------------------------

def test_zz_summary(capsys):
    """Print the ratios (run last: pytest keeps file order)."""
    lines = ["", "native vs twin (median times):"]
    for scenario in sorted({s for s, _ in RESULTS}):
        t = {who: RESULTS.get((scenario, who)) for who in ("python", "native", "numpy")}
        if t["python"] and t["native"]:
            lines.append(f"  {scenario:34s} python {t['python'] * 1e6:10.1f} us  native "
                         f"{t['native'] * 1e6:9.1f} us  speedup {t['python'] / t['native']:6.1f}x")
        if t["numpy"] and t["native"]:
            lines.append(f"  {'':34s} numpy memcpy {t['numpy'] * 1e6:8.1f} us  native/numpy "
                         f"throughput {t['numpy'] / t['native']:.2f}")
    with capsys.disabled():
        print("\n".join(lines))
