"""What a commit and `status` find does not depend on scanning the whole pool.

The space map's per-chunk state (a byte per chunk: 256 MiB at 16 TiB with 64 KiB
chunks) has a summary, a byte per 4096 chunks set by every kernel that sets a
flag; SpaceMap.flagged() (each commit) reads only the flagged windows, and used()
(`status`, the low-water warning) keeps per-window counts. These tests hold both to
a full scan of the arrays, through transactions and commits, on whichever kernels
run (THINSTORE_PURE_PYTHON selects the twins), and show a pool of 4 TiB sparse
capacity committing, freeing and reporting exactly. The cost itself is measured in
benchmarks/bench_capacity.py.
"""

from __future__ import annotations

import types

import numpy as np

from thinstore import Pool
from thinstore.check import check_path
from thinstore.kernels import ST_PENDING_FREE, ST_PINNED, ST_REF_CHANGED, ST_WRITTEN
from thinstore.paged import PagedArray
from thinstore.spacemap import SpaceMap

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CS = 64 * KiB
FLAGS = (ST_PENDING_FREE, ST_PINNED, ST_WRITTEN, ST_REF_CHANGED, 0xFF)


def _agrees_with_a_full_scan(space: SpaceMap) -> None:
    refs, state = space.refs.arr, space.state
    assert space.used() == np.count_nonzero(refs[1:])
    for flag in FLAGS:
        assert space.flagged(flag).tolist() == np.flatnonzero(state & flag).tolist()
    assert space.pending() == np.count_nonzero(state & ST_PENDING_FREE)


def test_flagged_and_used_match_a_full_scan_through_transactions_and_commits():
    n = 50_000                                   # 13 summary windows, the last one partial
    space = SpaceMap(PagedArray(np.uint32, n), PagedArray(np.uint32, n))
    rng = np.random.default_rng(11)
    pages = np.zeros((3, 508), np.uint64)
    freed = []
    fio = types.SimpleNamespace(punch_unit=0)
    for step in range(40):
        ids = rng.integers(1, n, int(rng.integers(1, 60)))
        space.ref_batch(ids, +1)
        mapped = np.flatnonzero(space.refs.arr)
        if len(mapped):
            space.ref_batch(rng.choice(mapped, min(len(mapped), 20), replace=False), -1)
        pages[1] = rng.choice(np.append(mapped, 0), 508)
        space.shadow_page(pages, 1, 2)           # a snapshot's page diverging
        space.mark(rng.integers(1, n, 3), ST_WRITTEN)
        _agrees_with_a_full_scan(space)
        if step % 8 == 7:                        # a commit: every flag and window cleared
            pending = space.flagged(ST_PENDING_FREE).tolist()
            assert space.commit_done(fio, 16, defer=freed.extend) == len(pending)
            assert not space.state.any() and not space.summary.any()
            _agrees_with_a_full_scan(space)
    assert freed                                 # the commits handed chunks back


def test_used_is_exact_after_a_resize_and_a_rebuild():
    space = SpaceMap(PagedArray(np.uint32, 9000), PagedArray(np.uint32, 9000))
    space.ref_batch(np.array([1, 4095, 4096, 8999]), +1)
    assert space.used() == 4
    space.resize(20_000)
    space.ref_batch(np.array([19_999, 12_000]), +1)
    _agrees_with_a_full_scan(space)
    space.refs.arr[[5, 6, 7]] = 3                # repair sets refcounts whole
    space.recount([5, 6, 7])
    assert space.used() == 9


def test_a_pool_of_4_tib_sparse_capacity_commits_and_reports_status(tmp_path):
    """Chunks at both ends of a 4 TiB pool (sparse data file): written, copied on
    write, freed by a destroy; status and the commits get every count right, the
    freed chunks become free again, and the pool reopens clean."""
    path = str(tmp_path / "pool")
    rng = np.random.default_rng(3)
    a, b = (rng.integers(1, 256, 4096, np.uint8).tobytes() for _ in range(2))
    with Pool.create(path, 4 * TiB, CS, commit_interval=0) as pool:
        cap = pool.status()["capacity"] // CS
        pool.create_volume("v", 8 * GiB)
        with pool.open_device("v") as dev:
            dev.pwrite(a, 0)
            pool.md.space.cursor = cap - 1       # the next chunks at the far end of the pool
            dev.pwrite(a, 8 * GiB - 4096)
            pool.commit()
            assert pool.status()["used"] == 2 * CS
            pool.snapshot("v@1")
            dev.pwrite(b, 0)                     # a copy on write: a third chunk
            dev.pwrite(b, 8 * GiB - 4096)        # and a fourth, wrapped round to the start
            pool.commit()
            assert pool.status()["used"] == 4 * CS
        pool.destroy("v@1")                      # its two chunks are freed by the commit
        pool.commit()
        st = pool.status()
        assert (st["used"], st["free"]) == (2 * CS, st["capacity"] - 2 * CS)
        assert not pool.md.space.flagged(0xFF).size
    assert check_path(path).problems == []
    with Pool.open(path) as pool, pool.open_device("v") as dev:
        assert pool.status()["used"] == 2 * CS
        assert dev.pread(0, 4096) == b and dev.pread(8 * GiB - 4096, 4096) == b
