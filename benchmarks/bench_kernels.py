"""Native kernels against their pure-Python twins, in one run.

    python -m pytest benchmarks/bench_kernels.py --benchmark-only -p no:cacheprovider

Each scenario runs once per backend (the volume API is switched by rebinding the
one name the core calls kernels through, ``K``); a summary at the end prints the
ratios the native hot path is held to:

- translating a 1M-entry map range:                      native >= 20x the twin
- 4 KiB random writes via Device.pwrite, shared (COW) and exclusive chunks: >= 5x
  (beside them, the same writes' unavoidable system calls in a bare loop: the floor
  both backends stand on, which is what bounds the ratio where it falls short)
- COW copy of 64 KiB chunks on a page-cached file, as a fraction of a numpy copy
  of the same bytes in memory:                           target >= 0.5
- and, beside them, 4 KiB random reads via Device.readinto (no target set)
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest

import thinstore.datapath
import thinstore.pool
from conftest import report
from thinstore import Pool, kernels as TWIN, native
from thinstore.format import FANOUT
from thinstore.storage import FileIO

NAT = native.NATIVE
pytestmark = pytest.mark.skipif(NAT is None, reason=f"no native build: {native.WHY_NOT_NATIVE}")
BACKENDS = [pytest.param(TWIN, id="python"), pytest.param(NAT, id="native")]
RESULTS: dict[tuple[str, str], float] = {}  # (scenario, backend) -> best round, seconds
SHIFT = 16
CHUNK = 1 << SHIFT


def _name(k) -> str:
    return "python" if k is TWIN else "native"


def _record(benchmark, scenario: str, who: str) -> None:
    RESULTS[(scenario, who)] = benchmark.stats.stats.min


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
ROUNDS = 10


def _use(k) -> None:
    """Route the core through kernels k (the core reads K from these modules)."""
    thinstore.pool.K = k
    thinstore.datapath.K = k
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
    saved = (thinstore.pool.K, thinstore.datapath.K, native.K)
    vol = Volume()
    vol.pool, vol.dev, vol.where, vol.path = pool, dev, where, str(tmp_path / "pool")
    yield vol
    thinstore.pool.K, thinstore.datapath.K, native.K = saved
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
    _use(k)         # the pool picks its write path (the native lane or not) at open
    volume.dev.close()
    volume.pool.close()
    pool = volume.pool = Pool.open(volume.path, commit_interval=0)
    if shared:  # every chunk now shared with the snapshot: each first write copies
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
        benchmark.stats.stats.min / WRITES_PER_ROUND


@pytest.mark.parametrize("k", BACKENDS)
def test_random_4k_reads(benchmark, k, volume):
    """4 KiB reads at random spots through Device.readinto, checksums verified
    (each chunk once, on a first warm-up pass, as in steady use)."""
    _use(k)
    volume.dev.close()
    volume.pool.close()
    pool = volume.pool = Pool.open(volume.path, commit_interval=0)
    dev = volume.dev = pool.open_device("v")
    n = dev.size >> SHIFT
    buf = bytearray(4096)
    for c in range(n):                         # load the map, verify every chunk once
        dev.readinto(buf, c << SHIFT)
    offs = [(int(c) << SHIFT) + (int(x) << 12) for c, x in
            zip(np.random.default_rng(5).integers(0, n, WRITES_PER_ROUND),
                np.random.default_rng(6).integers(0, 16, WRITES_PER_ROUND))]
    def run():
        for off in offs:
            dev.readinto(buf, off)
    benchmark.pedantic(run, rounds=ROUNDS * 2, iterations=1)
    RESULTS[(f"4 KiB reads, {volume.where}", _name(k))] = \
        benchmark.stats.stats.min / WRITES_PER_ROUND


@pytest.mark.parametrize("shared", [False, True], ids=["exclusive", "shared-cow"])
def test_random_4k_writes_kernel_floor(benchmark, shared, volume):
    """No thinstore at all: the system calls one such write cannot avoid, on the
    same file system, in a bare Python loop -- a 4 KiB pwrite into a page-cached
    chunk, or (copy on write) a 64 KiB read of the old chunk and a 64 KiB write
    into a chunk never written before. What is left of native's time above this
    row is thinstore's own."""
    path = os.path.join(os.path.dirname(volume.path), "floor")
    n = volume.dev.size >> SHIFT
    block = np.random.default_rng(1).integers(1, 256, n << SHIFT, np.uint8)
    block.tofile(path)
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 2 * (n << SHIFT))      # the second half: chunks never written
        order = np.random.default_rng(2).permutation(n).tolist()
        data, buf = os.urandom(4096), bytearray(CHUNK)
        rounds = iter(range(ROUNDS))
        def run():
            r = next(rounds)
            for i, c in enumerate(order[r * WRITES_PER_ROUND:(r + 1) * WRITES_PER_ROUND]):
                if shared:
                    os.preadv(fd, [buf], c << SHIFT)
                    os.pwrite(fd, buf, (n + r * WRITES_PER_ROUND + i) << SHIFT)
                else:
                    os.pwrite(fd, data, (c << SHIFT) + ((c & 15) << 12))
        benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    finally:
        os.close(fd)
        os.unlink(path)
    kind = "shared (COW)" if shared else "exclusive"
    RESULTS[(f"4 KiB writes, {kind}, {volume.where}", "kernel")] = \
        benchmark.stats.stats.min / WRITES_PER_ROUND


class KernelState:
    """One map page of 508 chunks (64 KiB) over a data file on tmpfs, so that the
    write call (REQ_GIVEN: the general path's kernel) is measured without the core
    around it."""

    def __init__(self, path: str):
        self.dirarr = np.array([1], np.uint64)
        self.pages = np.zeros((2, FANOUT), np.uint64)
        self.pages[1] = np.arange(1, FANOUT + 1)
        n = 2 * FANOUT + 2
        self.ref = np.zeros(n, np.uint32)
        self.ref[1:FANOUT + 1] = 1
        self.state = np.zeros(n, np.uint8)
        self.summary = np.zeros(TWIN.summary_len(n), np.uint8)
        self.dirty = np.zeros(2, np.uint8)
        self.counters = np.zeros(4, np.int64)
        self.pristine = [a.copy() for a in (self.pages, self.ref, self.state)]
        with open(path, "wb") as f:
            f.write(os.urandom(n * CHUNK))
        self.fio = FileIO(path)

    def reset(self, shared: bool) -> None:
        for a, b in zip((self.pages, self.ref, self.state), self.pristine):
            a[:] = b
        self.summary[:] = 0
        if shared:
            self.ref[1:FANOUT + 1] = 2


@pytest.fixture(scope="module")
def kernel_state():
    if not os.path.isdir(TMPFS):
        pytest.skip(f"no tmpfs at {TMPFS}")
    d = tempfile.mkdtemp(dir=TMPFS)
    ks = KernelState(os.path.join(d, "data"))
    yield ks
    ks.fio.close()
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("shared", [False, True], ids=["exclusive", "shared-cow"])
@pytest.mark.parametrize("k", BACKENDS)
def test_write_kernel_4k(benchmark, k, shared, kernel_state):
    """Only the kernel: 200 writes of 4 KiB into distinct chunks, one call each."""
    ks = kernel_state
    chunks = np.random.default_rng(8).permutation(FANOUT)[:WRITES_PER_ROUND]
    data = os.urandom(4096)
    free = np.arange(FANOUT + 1, 2 * FANOUT + 1, dtype=np.int64)
    ps = TWIN.PoolState(fio=ks.fio, chunk_shift=SHIFT, pages=ks.pages,
                           page_ref=np.ones(2, np.uint32), page_dirty=ks.dirty,
                           page_loaded=np.ones(2, bool), chunk_ref=ks.ref, chunk_state=ks.state,
                           chunk_summary=ks.summary, chunk_sums=np.zeros(0, np.uint32),
                           chunk_verified=np.zeros(0, bool), intent_bits=np.zeros(0, bool),
                           intent_hot=np.zeros(0, bool), cursor=np.array([1, -1, -1], np.int64),
                           counters=ks.counters)
    dev = TWIN.Dev(ks.dirarr, FANOUT << SHIFT, True)

    def run():
        for i, v in enumerate(chunks.tolist()):
            new = free[i:i + 1] if shared else free[:0]
            k.write(ps, dev, data, (v << SHIFT) + 8192, 4096, TWIN.REQ_GIVEN, new)
    benchmark.pedantic(run, setup=lambda: ks.reset(shared), rounds=ROUNDS * 2, iterations=1)
    kind = "shared (COW)" if shared else "exclusive"
    RESULTS[(f"write kernel only (REQ_GIVEN), {kind}", _name(k))] = \
        benchmark.stats.stats.min / WRITES_PER_ROUND


# ---- 3. COW copy throughput --------------------------------------------------

N_COPY = 256  # 64 KiB chunks per round: 16 MiB


def _xfs_mount(base: Path) -> Path:
    """A reflink-capable xfs on a loop device (root only), unmounted at exit."""
    if os.geteuid() != 0 or shutil.which("mkfs.xfs") is None:
        pytest.skip("xfs loop mount needs root and xfsprogs")
    image, mnt = base / "xfs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(320 << 20)
    subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(image)], check=True)
    if subprocess.run(["mount", "-o", "loop", str(image), str(mnt)]).returncode:
        pytest.skip("cannot loop-mount here")
    atexit.register(subprocess.run, ["umount", str(mnt)])
    return mnt


@pytest.fixture(scope="module", params=["disk", "xfs-reflink"])
def cached_file(request, tmp_path_factory):
    """A page-cached data file: in the test's temporary directory, or on xfs where
    copy_file_range shares extents instead of copying bytes."""
    base = tmp_path_factory.mktemp("cow")
    where = _xfs_mount(base) if request.param == "xfs-reflink" else base
    data = np.random.default_rng(3).integers(0, 256, 2 * N_COPY * CHUNK, np.uint8)
    data.tofile(where / "data")
    fio = FileIO(str(where / "data"))
    fio.fsync()
    os.pread(fio.fd, 2 * N_COPY * CHUNK, 0)  # page-cache it
    yield request.param, fio
    fio.close()


@pytest.mark.parametrize("k", BACKENDS)
def test_cow_copy_64k(benchmark, k, cached_file):
    where, fio = cached_file
    def run():
        for i in range(N_COPY):
            k.cow_copy(fio, i * CHUNK, (N_COPY + i) * CHUNK, CHUNK)
    benchmark.pedantic(run, rounds=20, iterations=1, warmup_rounds=1)
    assert os.pread(fio.fd, CHUNK, 0) == os.pread(fio.fd, CHUNK, N_COPY * CHUNK)
    _record(benchmark, f"cow_copy 64 KiB x 256, {where}", _name(k))


def test_numpy_copy_same_bytes(benchmark):
    src = np.random.default_rng(4).integers(0, 256, N_COPY * CHUNK, np.uint8)
    dst = np.empty_like(src)
    benchmark.pedantic(np.copyto, (dst, src), rounds=20, iterations=1, warmup_rounds=1)
    for where in ("disk", "xfs-reflink"):
        _record(benchmark, f"cow_copy 64 KiB x 256, {where}", "numpy")


# ---- summary ----------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def summary():
    """After the module: hand the ratios to the terminal summary (benchmarks/conftest.py)."""
    yield
    for line in _summary_lines():
        report(line)


def _summary_lines() -> list[str]:
    lines = ["native vs twin (best round of each; the machine is shared, so min is the steady number):"]
    for scenario in sorted({s for s, _ in RESULTS}):
        t = {who: RESULTS.get((scenario, who)) for who in ("python", "native", "numpy", "kernel")}
        if t["python"] and t["native"]:
            lines.append(f"  {scenario:40s} python {t['python'] * 1e6:10.1f} us  native "
                         f"{t['native'] * 1e6:9.1f} us  speedup {t['python'] / t['native']:6.1f}x")
        if t["kernel"] and t["native"]:
            lines.append(f"  {'':40s} its system calls alone {t['kernel'] * 1e6:6.1f} us: "
                         f"thinstore adds {(t['native'] - t['kernel']) * 1e6:.1f} us native, "
                         f"{((t['python'] or 0) - t['kernel']) * 1e6:.1f} us twin")
        if t["numpy"] and t["native"]:
            lines.append(f"  {'':40s} numpy copy {t['numpy'] * 1e6:8.1f} us  native/numpy "
                         f"throughput {t['numpy'] / t['native']:.2f}")
    return lines
