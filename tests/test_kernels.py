"""The native kernels do exactly what their pure-Python twins do.

Each kernel has one hypothesis test that runs the twin and the C version on the
same random map, space map and file and demands identical results: returned
values, every array, the data file's bytes, the counters.  Ranges include
unaligned starts and ends, zero length and the device's last partial chunk; refcount
batches repeat ids and include zeros.  A second group of plain cases runs against
each backend (parametrized) so a pure-Python CI run still exercises them.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings, strategies as st

from thinstore import native
from thinstore.errors import CorruptMetadata, ThinstoreError

from thinstore import kernels as TWIN
from thinstore.storage import FileIO

F = 508
PINNED = 2
NAT = native.NATIVE
needs_native = pytest.mark.skipif(NAT is None, reason=f"native kernels unavailable: {native.WHY_NOT_NATIVE}")
BACKENDS = [pytest.param(TWIN, id="python"),
            pytest.param(NAT, id="native", marks=needs_native)]
SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


class Pool:
    """A random device map and space map: the arrays the kernels work on."""

    def __init__(self, seed: int, n_dir: int, n_chunks: int, shift: int, density: float):
        rng = np.random.default_rng(seed)
        self.shift, self.n_chunks = shift, n_chunks
        cap = n_dir + 2
        self.pages = np.zeros((cap, F), np.uint64)
        self.dirarr = np.zeros(n_dir, np.uint64)
        for d in range(n_dir):
            if rng.random() < 0.85:  # some directory slots have no page
                self.dirarr[d] = d + 1
                self.pages[d + 1] = _entries(rng, n_chunks, density)
        self.page_dirty = np.zeros(cap, np.uint8)
        self.page_ref = rng.integers(1, 3, cap).astype(np.uint32)
        self.chunk_ref = np.zeros(n_chunks, np.uint32)
        np.add.at(self.chunk_ref, self.pages[self.dirarr[self.dirarr > 0]].ravel(), 1)
        self.chunk_ref[0] = 0
        self.chunk_ref += (rng.random(n_chunks) < 0.2).astype(np.uint32) * (self.chunk_ref > 0)
        self.chunk_state = (rng.random(n_chunks) < 0.1).astype(np.uint8) * PINNED
        self.chunk_state[self.chunk_ref == 0] = 0
        self.chunk_summary = np.zeros(TWIN.summary_len(n_chunks), np.uint8)
        self.chunk_summary[np.flatnonzero(self.chunk_state) >> TWIN.SUMMARY_SHIFT] = 1
        self.page_loaded = np.ones(cap, bool)

    @property
    def size(self) -> int:
        return len(self.dirarr) * F << self.shift

    def arrays(self):
        return [self.dirarr, self.pages, self.page_dirty, self.chunk_ref, self.chunk_state,
                self.chunk_summary]

    def space(self):
        return self.chunk_ref, self.chunk_state, self.chunk_summary

    def state(self, fio=None, counters=None, ex=None, loaded=None, verified=None):
        """(kernels.PoolState, kernels.Dev) over these arrays; `ex`: FastExtras."""
        sums = ex.sums if ex is not None else np.zeros(0, np.uint32)
        ps = TWIN.PoolState(
            fio=NOFILE if fio is None else fio, chunk_shift=self.shift,
            intent_shift=ex.ishift if ex is not None else 0, pages=self.pages,
            page_ref=self.page_ref, page_dirty=self.page_dirty,
            page_loaded=self.page_loaded if loaded is None else loaded,
            chunk_ref=self.chunk_ref, chunk_state=self.chunk_state,
            chunk_summary=self.chunk_summary, chunk_sums=sums,
            chunk_verified=np.zeros(len(sums), bool) if verified is None else verified,
            intent_bits=ex.bits if ex is not None else np.zeros(0, bool),
            intent_hot=ex.hot if ex is not None else np.zeros(0, bool),
            cursor=ex.cursor if ex is not None else np.array([1, -1, -1], np.int64),
            counters=np.zeros(4, np.int64) if counters is None else counters)
        return ps, TWIN.Dev(self.dirarr, self.size, True)

    def copy(self) -> "Pool":
        other = object.__new__(Pool)
        other.__dict__ = {k: (v.copy() if isinstance(v, np.ndarray) else v)
                          for k, v in self.__dict__.items()}
        return other

    def free_chunks(self, k: int) -> np.ndarray:
        free = np.flatnonzero(self.chunk_ref == 0)
        return free[free > 0][:k].astype(np.int64)


# the kernels that do no I/O still take a pool state with a descriptor (else the
# native wrapper hands the call to the twin)
NOFILE = types.SimpleNamespace(fd=os.open(os.devnull, os.O_RDONLY))


def _entries(rng, n_chunks, density):
    """One map page: runs of consecutive chunk ids (to coalesce) among holes."""
    out = np.zeros(F, np.uint64)
    i = 0
    while i < F:
        run = int(rng.integers(1, 40))
        if rng.random() < density:
            start = int(rng.integers(1, n_chunks - 1))
            ids = np.arange(start, start + run) % (n_chunks - 1) + 1
            out[i:i + run] = ids[:F - i]
        i += run
    return out


pools = st.builds(Pool, seed=st.integers(0, 2**32 - 1), n_dir=st.integers(1, 3),
                  n_chunks=st.integers(64, 1200), shift=st.sampled_from([9, 12, 16]),
                  density=st.floats(0, 1))


# pools whose space map spans several summary windows (4096 chunks each), with
# 512-byte chunks so that the data file stays small
wide_pools = st.builds(Pool, seed=st.integers(0, 2**32 - 1), n_dir=st.integers(1, 3),
                       n_chunks=st.integers(4097, 13000), shift=st.just(9),
                       density=st.floats(0, 1))


@st.composite
def pool_and_range(draw, max_chunks=None, source=None):
    """A pool and a byte range inside its device: unaligned, empty, or at the end."""
    pool = draw(pools if source is None else source)
    size, cs = pool.size, 1 << pool.shift
    kind = draw(st.sampled_from(["any", "empty", "tail", "aligned"]))
    limit = size if max_chunks is None else min(size, max_chunks * cs)
    if kind == "empty":
        return pool, draw(st.integers(0, size)), 0
    length = draw(st.integers(1, limit))
    if kind == "tail":
        return pool, size - length, length
    off = draw(st.integers(0, size - length))
    if kind == "aligned":
        off -= off % cs
    return pool, off, length


def _rows(k, pool, off, length):
    out = np.full(((length >> pool.shift) + 2, 3), -7, np.int64)
    n = k.translate(pool.dirarr, pool.pages, pool.shift, off, length, out)
    return out[:n].tolist()


class DataFile:
    """A pool data file with random bytes in every chunk, opened with FileIO."""

    def __init__(self, path, pool, seed):
        data = np.random.default_rng(seed).integers(0, 256, pool.n_chunks << pool.shift, np.uint8)
        data.tofile(path)
        self.path = str(path)
        self.fio = _open(self.path)

    def twin(self, suffix):
        shutil.copyfile(self.path, self.path + suffix)
        return _open(self.path + suffix)


def _open(path):
    return FileIO(path)


def _read_all(fio):
    return os.pread(fio.fd, 1 << 30, 0)


# ---- native and twin agree ------------------------------------------------

@needs_native
@SETTINGS
@given(pool_and_range())
def test_translate_agrees(args):
    pool, off, length = args
    rows = _rows(TWIN, pool, off, length)
    assert _rows(NAT, pool, off, length) == rows
    assert sum(r[1] for r in rows) == length


@needs_native
@SETTINGS
@given(pools, st.data())
def test_shadow_page_agrees(pool, data):
    src = data.draw(st.integers(0, len(pool.pages) - 1))
    dst = data.draw(st.integers(1, len(pool.pages) - 1).filter(lambda d: d != src))
    a, b = pool, pool.copy()
    TWIN.shadow_page(a.pages, src, dst, *a.space())
    NAT.shadow_page(b.pages, src, dst, *b.space())
    _same_arrays(a, b)


@needs_native
@SETTINGS
@given(pools, st.data(), st.sampled_from([1, -1]))
def test_ref_batch_agrees(pool, data, delta):
    mapped = np.flatnonzero(pool.chunk_ref).tolist() or [0]
    ids = data.draw(st.lists(st.one_of(st.sampled_from(mapped), st.just(0)), max_size=200))
    ids = np.array(ids, np.uint64)
    a, b = pool, pool.copy()
    errs = [_outcome(k.ref_batch, *p.space(), ids, delta)
            for k, p in ((TWIN, a), (NAT, b))]
    assert errs[0] == errs[1]
    if errs[0] is None:  # after an underflow the twin's partial state is unspecified
        _same_arrays(a, b)


@needs_native
@SETTINGS
@given(pool_and_range())
def test_count_write_allocs_agrees(args):
    pool, off, length = args
    _give_every_slot_a_page(pool)
    got = [k.count_write_allocs(*pool.state(), off, length) for k in (TWIN, NAT)]
    assert got[0] == got[1]


@needs_native
@SETTINGS
@given(pool_and_range(max_chunks=24), st.integers(0, 2**32 - 1))
def test_write_given_agrees(tmp_path, args, seed):
    pool, off, length = args
    _give_every_slot_a_page(pool)
    f = DataFile(tmp_path / "data", pool, seed)
    buf = np.random.default_rng(seed + 1).integers(0, 256, length, np.uint8).tobytes()
    k = TWIN.count_write_allocs(*pool.state(), off, length)
    new = pool.free_chunks(k)
    if len(new) < k:
        event("pool full")  # the caller raises PoolFull before calling the kernel
        return
    results = []
    for kern, p, fio in ((TWIN, pool, f.twin(".twin")), (NAT, pool.copy(), f.fio)):
        counters = np.zeros(4, np.int64)
        rc = kern.write(*p.state(fio, counters), buf, off, length, TWIN.REQ_GIVEN, new)
        assert rc == 0
        results.append((p, counters.tolist(), _read_all(fio)))
    (a, ca, da), (b, cb, db) = results
    _same_arrays(a, b)
    assert ca == cb
    assert da == db
    back = bytearray(length)
    NAT.read_range(b.dirarr, b.pages, b.shift, f.fio, back, off, length)
    assert back == buf


@needs_native
@SETTINGS
@given(pools, st.data())
def test_unmap_range_agrees(pool, data):
    total = len(pool.dirarr) * F
    first = data.draw(st.integers(0, total))
    count = data.draw(st.integers(0, total - first))
    a, b = pool, pool.copy()
    got = [k.unmap_range(*p.state(), first, count)
           for k, p in ((TWIN, a), (NAT, b))]
    assert got[0] == got[1]
    _same_arrays(a, b)


@needs_native
@SETTINGS
@given(pool_and_range(max_chunks=64), st.integers(0, 2**32 - 1))
def test_read_locked_agrees(tmp_path, args, seed):
    """The read entry under the lock (REQ_LOCKED), and read_range beneath it."""
    pool, off, length = args
    f = DataFile(tmp_path / "data", pool, seed)
    bufs = [bytearray(length), np.full(length, 0xAA, np.uint8), bytearray(b"\xa5" * length),
            bytearray(b"\x5a" * length)]
    TWIN.read_range(pool.dirarr, pool.pages, pool.shift, f.fio, bufs[0], off, length)
    NAT.read_range(pool.dirarr, pool.pages, pool.shift, f.fio, bufs[1], off, length)
    assert TWIN.read(*pool.state(f.fio), bufs[2], off, length, TWIN.REQ_LOCKED) == 0
    assert NAT.read(*pool.state(f.fio), bufs[3], off, length, TWIN.REQ_LOCKED) == 0
    assert bytes(bufs[0]) == bufs[1].tobytes() == bytes(bufs[2]) == bytes(bufs[3])


@needs_native
@SETTINGS
@given(st.integers(1, 3 << 16), st.integers(0, 2**32 - 1), st.data())
def test_cow_copy_agrees(tmp_path, size, seed, data):
    length = data.draw(st.integers(0, size))
    src = data.draw(st.integers(0, size - length))
    dst = data.draw(st.integers(0, size + 4096))  # may run past the end of the file
    if src < dst + length and dst < src + length:
        dst = src + length  # the kernels require disjoint ranges
    path = tmp_path / "f"
    path.write_bytes(np.random.default_rng(seed).integers(0, 256, size, np.uint8).tobytes())
    files = [_open(str(path)), _open(_dup(path, ".twin"))]
    TWIN.cow_copy(files[1], src, dst, length)
    NAT.cow_copy(files[0], src, dst, length)
    assert _read_all(files[0]) == _read_all(files[1])


@needs_native
@SETTINGS
@given(st.integers(0, 70000), st.data())
def test_is_zero_agrees(n, data):
    buf = bytearray(n)
    if n and data.draw(st.booleans()):
        buf[data.draw(st.integers(0, n - 1))] = data.draw(st.integers(1, 255))
    start = data.draw(st.integers(0, min(n, 9)))  # unaligned views too
    view = memoryview(buf)[start:]
    assert NAT.is_zero(view) == TWIN.is_zero(view) == (not any(view))


@needs_native
@SETTINGS
@given(pools)
def test_count_mapped_agrees(pool):
    got = [k.count_mapped(pool.dirarr, pool.pages, pool.chunk_ref, pool.page_ref)
           for k in (TWIN, NAT)]
    assert tuple(got[0]) == tuple(got[1])


# ---- plain cases, run against each backend --------------------------------

@pytest.mark.parametrize("k", BACKENDS)
class TestBothBackends:
    def _pool(self):
        pool = Pool(0, 1, 64, 12, 0.0)
        pool.dirarr[0] = 1
        pool.pages[1, :6] = [5, 6, 0, 0, 9, 11]
        pool.chunk_ref[[5, 6, 9, 11]] = 1
        return pool

    def test_translate_coalesces_runs_and_holes(self, k):
        pool = self._pool()
        assert _rows(k, pool, 100, 6 * 4096 - 200) == [
            [100, 8092, 5 * 4096 + 100], [8192, 8192, -1],
            [16384, 4096, 9 * 4096], [20480, 4096 - 100, 11 * 4096]]
        assert _rows(k, pool, 5, 0) == []

    def test_ref_batch_repeats_and_flags(self, k):
        pool = self._pool()
        pool.chunk_ref[5] = 3
        k.ref_batch(*pool.space(), np.array([5, 0, 5, 6], np.uint64), -1)
        assert pool.chunk_ref[[5, 6]].tolist() == [1, 0]
        assert pool.chunk_state[5] & 8 and pool.chunk_state[5] & PINNED
        assert pool.chunk_state[6] & 1  # pending free

    def test_ref_batch_underflow_raises(self, k):
        pool = self._pool()
        with pytest.raises((ThinstoreError, ValueError)):
            k.ref_batch(*pool.space(), np.array([5, 5], np.uint64), -1)

    def test_write_then_read_through_a_shared_chunk(self, k, tmp_path):
        pool = self._pool()
        pool.chunk_ref[6] = 2  # shared with a snapshot: must be copied, not overwritten
        f = DataFile(tmp_path / "data", pool, 1)
        before = f.fio.pread(4096, 6 * 4096)
        new = np.array([20], np.int64)
        counters = np.zeros(4, np.int64)
        k.write(*pool.state(f.fio, counters), b"x" * 100, 4096 + 10, 100, TWIN.REQ_GIVEN, new)
        assert pool.pages[1, 1] == 20 and pool.chunk_ref[6] == 1 and pool.page_dirty[1] == 1
        assert counters.tolist() == [1, 1, 4096 - 100, 100]  # a COW allocates too
        assert f.fio.pread(4096, 6 * 4096) == before
        back = bytearray(4096)
        k.read_range(pool.dirarr, pool.pages, 12, f.fio, back, 4096, 4096)
        assert back == before[:10] + b"x" * 100 + before[110:]

    def test_is_zero(self, k):
        assert k.is_zero(bytes(4096)) and not k.is_zero(b"\0" * 4095 + b"\1")
        assert k.is_zero(b"")


def test_backend_is_reported():
    assert native.BACKEND in ("native", "python")
    if os.environ.get(native.ENV) == "1":
        assert native.BACKEND == "python"
    if os.environ.get(native.ENV) == "0":
        assert native.BACKEND == "native"


def _import_backend(mode: str | None, hide_native: bool = False):
    """Import thinstore in a fresh interpreter; (returncode, stdout+stderr)."""
    env = {k: v for k, v in os.environ.items() if k != native.ENV}
    if mode is not None:
        env[native.ENV] = mode
    env["PYTHONPATH"] = os.getcwd()
    hide = "import sys; sys.modules['thinstore._thinstore_native'] = None; " if hide_native else ""
    res = subprocess.run([sys.executable, "-c", hide + "import thinstore; print(thinstore.BACKEND)"],
                         env=env, capture_output=True, text=True)
    return res.returncode, res.stdout + res.stderr


def test_pure_python_switch_forces_the_twins():
    assert _import_backend("1") == (0, "python\n")


def test_native_demanded_but_absent_fails_loudly():
    rc, out = _import_backend("0", hide_native=True)
    assert rc != 0 and "NativeUnavailable" in out and "THINSTORE_PURE_PYTHON=0" in out


def test_unset_falls_back_to_the_twins_without_a_build():
    assert _import_backend(None, hide_native=True) == (0, "python\n")


@needs_native
def test_unset_uses_native_when_built():
    assert _import_backend(None) == (0, "native\n")


@needs_native
def test_stale_build_is_refused_with_a_clear_message():
    built, why = native._load(api=native.API_VERSION + 1)
    assert built is None and "stale" in why and "rebuild" in why


@pytest.mark.parametrize("k", BACKENDS)
def test_io_error_raises_oserror(k, tmp_path):
    """A failed pwrite reaches the caller as OSError (the native code's -errno)."""
    pool = Pool(0, 1, 64, 12, 0.0)
    pool.dirarr[0] = 1
    DataFile(tmp_path / "data", pool, 1)
    ro = FileIO(str(tmp_path / "data"), readonly=True)
    with pytest.raises(OSError) as err:
        k.write(*pool.state(ro), b"x" * 4096, 0, 4096, TWIN.REQ_GIVEN, np.array([3], np.int64))
    assert err.value.errno == errno.EBADF


@needs_native
def test_native_reports_corrupt_ids_instead_of_crashing():
    pool = Pool(0, 1, 64, 12, 0.0)
    pool.dirarr[0] = 10**9
    with pytest.raises(CorruptMetadata):
        _rows(NAT, pool, 0, 4096)


# ---- helpers ----------------------------------------------------------------

def _give_every_slot_a_page(pool):
    """write/count preconditions: every page in range exists (and is exclusive)."""
    for d in range(len(pool.dirarr)):
        pool.dirarr[d] = d + 1


def _same_arrays(a, b):
    for x, y, name in zip(a.arrays(), b.arrays(), ["dirarr", "pages", "page_dirty",
                                                   "chunk_ref", "chunk_state", "chunk_summary"]):
        assert np.array_equal(x, y), name
    # every flag set is in the summary (SpaceMap.flagged() reads only flagged windows)
    for p in (a, b):
        assert p.chunk_summary[np.flatnonzero(p.chunk_state) >> TWIN.SUMMARY_SHIFT].all()


def _outcome(fn, *args):
    try:
        fn(*args)
    except (ThinstoreError, ValueError):
        return "error"
    return None


def _dup(path, suffix):
    shutil.copyfile(path, str(path) + suffix)
    return str(path) + suffix


# ---- the checked write (REQ_LOCKED) -----------------------------------------

class FastExtras:
    """What a checked write (REQ_LOCKED, REQ_LANE) uses beyond REQ_GIVEN: checksums,
    intent bitmap, cursor."""

    def __init__(self, pool, rng, checksums: bool):
        n = pool.n_chunks
        self.sums = (rng.integers(0, 3, n) * rng.integers(1, 2**32, n)).astype(np.uint32) \
            if checksums else np.zeros(0, np.uint32)
        self.ishift = int(rng.integers(0, 5))
        nbits = (n >> self.ishift) + int(rng.integers(0, 2))   # sometimes short (pool grew)
        self.bits = rng.random(nbits) < 0.8
        self.hot = np.zeros(nbits, dtype=bool)
        lo = int(rng.integers(-1, n + 2))      # [cursor, preallocated range)
        self.cursor = np.array([rng.integers(0, n + 2), lo, lo + int(rng.integers(0, 40))],
                               np.int64)

    def copy(self):
        other = object.__new__(FastExtras)
        other.__dict__ = {k: (v.copy() if isinstance(v, np.ndarray) else v)
                          for k, v in self.__dict__.items()}
        return other


@needs_native
@SETTINGS
@given(pool_and_range(max_chunks=70), st.integers(0, 2**32 - 1), st.booleans(), st.booleans())
def test_write_locked_agrees(tmp_path, args, seed, checksums, zeros):
    """Same answer (allocated count or SLOW), arrays, cursor, intent marks and file bytes."""
    pool, off, length = args
    rng = np.random.default_rng(seed)
    pool.chunk_state |= (rng.random(pool.n_chunks) < 0.3).astype(np.uint8) * TWIN.ST_WRITTEN
    pool.chunk_summary[np.flatnonzero(pool.chunk_state) >> TWIN.SUMMARY_SHIFT] = 1
    if rng.random() < 0.7:     # mostly the common case: every chunk in range mapped
        _map_everything(pool, rng)
    ex = FastExtras(pool, rng, checksums)
    f = DataFile(tmp_path / "data", pool, seed)
    buf = bytes(length) if zeros else rng.integers(0, 256, length, np.uint8).tobytes()
    results = []
    for kern, p, e, fio in ((TWIN, pool, ex, f.twin(".twin")), (NAT, pool.copy(), ex.copy(), f.fio)):
        counters = np.zeros(4, np.int64)
        rc = kern.write(*p.state(fio, counters, e), buf, off, length, TWIN.REQ_LOCKED)
        results.append((rc, p, e, counters.tolist(), _read_all(fio)))
    (ra, a, ea, ca, da), (rb, b, eb, cb, db) = results
    event("slow" if ra == TWIN.SLOW else "fast")
    assert ra == rb
    _same_arrays(a, b)
    assert (ca, ea.cursor.tolist(), ea.hot.tolist()) == (cb, eb.cursor.tolist(), eb.hot.tolist())
    assert da == db
    if ra != TWIN.SLOW:
        back = bytearray(length)
        NAT.read_range(b.dirarr, b.pages, b.shift, f.fio, back, off, length)
        assert back == buf


def _map_everything(pool, rng, spare: float = 0.0):
    """Every slot a page, every page exclusive, every entry a chunk (some shared);
    `spare`: the part of the chunk ids (the top) no entry names."""
    _give_every_slot_a_page(pool)
    pool.page_ref[:] = 1
    rows = pool.pages[1:len(pool.dirarr) + 1]
    top = max(2, int(pool.n_chunks * (1 - spare)))
    holes = (rows == 0) | (rows >= top)
    rows[holes] = rng.integers(1, top, int(holes.sum()))
    pool.chunk_ref[:] = 0
    np.add.at(pool.chunk_ref, rows.ravel().astype(np.int64), 1)
    pool.chunk_state[pool.chunk_ref == 0] = 0


@needs_native
@SETTINGS
@given(st.integers(12, 20), st.lists(st.integers(-2, 300), max_size=12),
       st.integers(-1, 300), st.integers(0, 300))
def test_prealloc_agrees(tmp_path, shift, ids, lo, width):
    """Same fallocate calls and final range; no byte and not the size changes;
    the blocks are set aside where the file system can."""
    n_chunks = 256
    path = tmp_path / "data"
    with open(path, "wb") as f:
        f.truncate(n_chunks << shift)
        f.seek(5 << shift)
        f.write(b"keep me")
    out = []
    for k, fio in ((TWIN, FileIO(str(path))), (NAT, FileIO(str(path)))):
        cursor = np.array([7, lo, lo + width], np.int64)
        calls = k.prealloc(fio, shift, n_chunks, cursor, np.array(ids, np.int64))
        out.append((calls, cursor.tolist()))
        fio.close()
    assert out[0] == out[1]
    st_ = os.stat(path)
    assert st_.st_size == n_chunks << shift
    with open(path, "rb") as f:
        data = f.read()
    assert data[5 << shift:(5 << shift) + 7] == b"keep me"
    assert data.count(0) == len(data) - 7
    if out[0][0]:                        # the last range made is set aside
        _, lo2, hi2 = out[0][1]
        assert st_.st_blocks * 512 >= (hi2 - lo2) << shift


LANE_STATES = ["open"] * 5 + ["closed", "no-writes", "read-only", "short", "busy-writer",
                             "busy-shared", "busy-exclusive", "busy-readers", "closing",
                             "closing-exclusive"]


def _lane(kern_twin, p, e, fio, counters, lane_state, budget, rng_seed):
    """A kernels.PoolState and Dev over test arrays, the lane in the state named."""
    rng = np.random.default_rng(rng_seed)
    loaded = rng.random(len(p.pages)) < 0.9
    verified = (rng.random(p.n_chunks) < 0.7) if len(e.sums) else np.zeros(0, bool)
    lane, _ = p.state(fio, counters, e, loaded, verified)
    lane.open, lane.writes, lane.budget = int(lane_state != "closed"), \
        int(lane_state != "no-writes"), budget
    lane.gate = {"busy-writer": TWIN.GATE_WRITER, "busy-shared": 2 * TWIN.GATE_SHARED,
                 "busy-exclusive": TWIN.GATE_EXCLUSIVE,
                 "busy-readers": 3 * TWIN.GATE_READER}.get(lane_state, 0)
    lane.closers = int(lane_state.startswith("closing"))
    lane.excl_closers = int(lane_state == "closing-exclusive")
    size = p.size - (1 << p.shift) * (lane_state == "short")
    return lane, kern_twin.Dev(p.dirarr, size, lane_state != "read-only")


@needs_native
@SETTINGS
@given(pool_and_range(max_chunks=70), st.integers(0, 2**32 - 1), st.booleans(),
       st.sampled_from(LANE_STATES), st.one_of(st.just(1 << 20), st.integers(-1, 3)))
def test_write_lane_agrees(tmp_path, args, seed, checksums, lane_state, budget):
    """The lane's write (REQ_LANE): REQ_LOCKED's result when the lane is open for writes and
    empty, the device writable and the range inside it and the allocation within
    budget; SLOW with nothing changed otherwise. Same budget and `wrote` left behind."""
    pool, off, length = args
    rng = np.random.default_rng(seed)
    if rng.random() < 0.8:
        _map_everything(pool, rng, spare=0.5)     # half the chunks left free to allocate
    ex = FastExtras(pool, rng, checksums)
    ex.bits[:] = True                     # REQ_LOCKED's own refusals: test_write_locked_agrees
    f = DataFile(tmp_path / "data", pool, seed)
    buf = rng.integers(0, 256, length, np.uint8).tobytes()
    before = _read_all(f.fio)
    results = []
    for kern, p, e, fio in ((TWIN, pool, ex, f.twin(".twin")), (NAT, pool.copy(), ex.copy(), f.fio)):
        counters = np.zeros(4, np.int64)
        lane, dev = _lane(TWIN, p, e, fio, counters, lane_state, budget, seed)
        rc = kern.write(lane, dev, buf, off, length, TWIN.REQ_LANE)
        results.append((rc, p, e, counters.tolist(), lane.budget, lane.wrote, _read_all(fio)))
    (ra, a, ea, ca, ba, wa, da), (rb, b, eb, cb, bb, wb, db) = results
    event("slow" if ra == TWIN.SLOW else "fast")
    assert (ra, ba, wa) == (rb, bb, wb)
    _same_arrays(a, b)
    assert (ca, ea.cursor.tolist(), ea.hot.tolist()) == (cb, eb.cursor.tolist(), eb.hot.tolist())
    assert da == db
    if ra == TWIN.SLOW:
        assert (wa, ba, ca) == (0, budget, [0, 0, 0, 0]) and da == before
    else:
        assert lane_state in ("open", "short") and 0 <= ra <= max(budget, 0) and ba == budget - ra
        assert off + length <= pool.size - (1 << pool.shift) * (lane_state == "short")


@needs_native
@SETTINGS
@given(pool_and_range(max_chunks=70), st.integers(0, 2**32 - 1), st.booleans(),
       st.sampled_from(LANE_STATES))
def test_read_lane_agrees(tmp_path, args, seed, checksums, lane_state):
    """The lane's read: read_range's bytes when the lane is open with no writer or
    lock holder inside, the pages loaded and no chunk awaiting its checksum check;
    SLOW with the buffer untouched otherwise. Other lane readers do not matter."""
    pool, off, length = args
    rng = np.random.default_rng(seed)
    ex = FastExtras(pool, rng, checksums)
    f = DataFile(tmp_path / "data", pool, seed)
    results = []
    for kern in (TWIN, NAT):
        lane, dev = _lane(TWIN, pool, ex, f.fio, np.zeros(4, np.int64), lane_state, 0, seed)
        buf = bytearray(b"\xa5" * length)
        rc = kern.read(lane, dev, buf, off, length, TWIN.REQ_LANE)
        results.append((rc, bytes(buf)))
    (ra, da), (rb, db) = results
    event("slow" if ra == TWIN.SLOW else "fast")
    assert ra == rb and da == db
    if ra == TWIN.SLOW:
        assert da == b"\xa5" * length
    else:
        assert lane_state in ("open", "short", "no-writes", "read-only", "busy-readers",
                              "busy-shared", "closing")
        want = bytearray(length)
        TWIN.read_range(pool.dirarr, pool.pages, pool.shift, f.fio, want, off, length)
        assert da == want


@pytest.mark.parametrize("k", BACKENDS)
def test_write_locked_slow_leaves_everything(k, tmp_path):
    """A shared map page in range (it must be shadowed first): SLOW, and not one
    array or byte changed."""
    pool = Pool(5, 1, 200, 12, 0.5)
    pool.page_ref[:] = 1
    pool.page_ref[int(pool.dirarr[0])] = 2
    before = [a.copy() for a in pool.arrays()]
    f = DataFile(tmp_path / "data", pool, 1)
    data = _read_all(f.fio)
    ps, dev = pool.state(f.fio)
    ps.intent_bits, ps.intent_hot = np.zeros(1, bool), np.zeros(1, bool)
    rc = k.write(ps, dev, b"x" * 8192, 2 << 12, 8192, TWIN.REQ_LOCKED)
    assert rc == TWIN.SLOW
    cursor = ps.cursor
    assert all(np.array_equal(x, y) for x, y in zip(before, pool.arrays()))
    assert _read_all(f.fio) == data and cursor[0] == 1


@needs_native
@settings(SETTINGS, max_examples=30)
@given(pool_and_range(max_chunks=70, source=wide_pools), st.integers(0, 2**32 - 1),
       st.sampled_from([0, 4096, 8192, 12000]))
def test_write_locked_agrees_across_summary_windows(tmp_path, args, seed, cursor):
    """Chunks found and flagged in every window of a wider space map: the same
    summary bytes as the twin's (SpaceMap.flagged() finds flags through them)."""
    pool, off, length = args
    rng = np.random.default_rng(seed)
    _map_everything(pool, rng, spare=0.5)
    ex = FastExtras(pool, rng, False)
    ex.cursor[0] = min(cursor, pool.n_chunks - 1)
    f = DataFile(tmp_path / "data", pool, seed)
    buf = rng.integers(1, 256, max(length, 1), np.uint8).tobytes()[:length]
    results = []
    for kern, p, e, fio in ((TWIN, pool, ex, f.twin(".twin")), (NAT, pool.copy(), ex.copy(), f.fio)):
        rc = kern.write(*p.state(fio, None, e), buf, off, length, TWIN.REQ_LOCKED)
        results.append((rc, p, e.cursor.tolist(), _read_all(fio)))
    (ra, a, ca, da), (rb, b, cb, db) = results
    event("slow" if ra == TWIN.SLOW else "fast")
    assert (ra, ca) == (rb, cb) and da == db
    _same_arrays(a, b)


@pytest.mark.parametrize("k", BACKENDS)
def test_writeback_moves_no_bytes_and_refuses_bad_ranges(tmp_path, k):
    """The presync's writeback (paced in C, one datasync in the twin) changes nothing
    a reader sees; a negative range is refused with an error, not written back."""
    fio = FileIO(str(tmp_path / "data"), create=True)
    data = os.urandom(3 << 20)
    fio.pwrite(data, 1 << 20)
    k.writeback(fio, [(1 << 20, 1 << 20), (3 << 20, 1 << 20), (8 << 20, 4096)], 256 << 10)
    assert fio.pread(3 << 20, 1 << 20) == data
    if k is NAT:
        with pytest.raises(ThinstoreError):
            k.writeback(fio, [(-4096, 4096)], 256 << 10)
        with pytest.raises(ThinstoreError):
            k.writeback(fio, [(0, 4096)], 0)
    fio.close()
