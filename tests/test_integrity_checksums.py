"""Data checksums: computed at commit for written chunks only, and the crash window.

A chunk written in place after its last commit no longer matches its stored checksum;
a crash then must not turn it into a false I/O error, while damage to chunks outside
the write-intent regions must still be caught.
"""

from __future__ import annotations

import os

import crashkit
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from integrity_helpers import CHUNK, flip_chunk

from thinstore import Pool, datasums
from thinstore.errors import DataChecksumError


@pytest.fixture
def small_regions(monkeypatch):
    """Regions of 16 chunks, so a test pool has many (the default is 64 MiB)."""
    monkeypatch.setattr(datasums, "REGION_MIN_BYTES", 16 * CHUNK)


def _pool(path: str) -> Pool:
    pool = Pool.create(path, 4 << 20, CHUNK, commit_interval=0)
    pool.create_volume("v", 512 << 10)
    with pool.open_device("v") as dev:
        dev.pwrite(os.urandom(512 << 10), 0)
    pool.commit()
    return pool


def _chunk(pool, vchunk: int) -> int:
    dm = pool._find("v")
    pid = int(dm.directory.arr[0])
    pool.md.maps.ensure_loaded([pid])
    return int(pool.md.maps.pages[pid, vchunk])


def test_commit_hashes_only_chunks_written_since(tmp_path):
    pool = _pool(str(tmp_path / "p"))
    before = pool._sums.counters["chunks_hashed"]
    with pool.open_device("v") as dev:
        for i in range(20):
            dev.pwrite(b"z" * 512, 5 * CHUNK + i * 512 % CHUNK)   # 20 small writes, 1 chunk
        dev.pwrite(b"y" * 100, 40 * CHUNK)
    assert pool._sums.counters["chunks_hashed"] == before       # not on each write
    pool.commit()
    assert pool._sums.counters["chunks_hashed"] == before + 2
    pool.close()


def test_in_place_writes_mark_a_region_once_per_commit(tmp_path, small_regions):
    pool = _pool(str(tmp_path / "p"))
    intent = pool._sums.intent
    w0 = intent.writes
    with pool.open_device("v") as dev:
        for i in range(10):
            dev.pwrite(b"a" * 100, i * CHUNK)                     # chunks 0-9: one region
    assert intent.writes == w0 + 1 and intent.bits.sum() == 1
    with pool.open_device("v") as dev:
        dev.pwrite(b"b" * 100, 40 * CHUNK)                        # another region
    assert intent.writes == w0 + 2
    pool.commit()
    assert intent.bits.sum() == 2          # kept one more transaction: no I/O if written again
    with pool.open_device("v") as dev:
        dev.pwrite(b"c" * 100, 41 * CHUNK)
    assert intent.writes == w0 + 2             # still marked: nothing written
    pool.commit()
    assert intent.bits.sum() == 1 and intent.writes == w0 + 3   # region 0 idle: cleared
    pool.commit()
    assert not intent.bits.any()
    pool.close()


def test_crash_after_in_place_write_gives_no_false_error(tmp_path, small_regions):
    """Killed (no commit) after writing committed chunks in place: reads stay clean."""
    path = str(tmp_path / "p")
    pool = _pool(path)
    with pool.open_device("v") as dev:
        dev.pwrite(b"n" * 3000, 3 * CHUNK + 500)
        dev.pwrite(b"m" * CHUNK, 20 * CHUNK)
    crashkit._abandon(pool)                    # the process dies: no commit, data on disk
    report = crashkit.check_path(path)
    assert report.clean and report.info["unclean_regions"] == 2
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        assert dev.pread(3 * CHUNK + 500, 3000) == b"n" * 3000
        assert dev.pread(20 * CHUNK, CHUNK) == b"m" * CHUNK
        dev.pread(0, 512 << 10)                # every chunk verifies
    report = crashkit.check_path(path)
    assert report.clean and report.info["unclean_regions"] == 0


def test_damage_outside_the_intent_regions_is_still_caught(tmp_path, small_regions):
    path = str(tmp_path / "p")
    pool = _pool(path)
    victim = _chunk(pool, 100)                 # region 6; the writes below hit region 0
    with pool.open_device("v") as dev:
        dev.pwrite(b"n" * 3000, 3 * CHUNK + 500)
    crashkit._abandon(pool)
    flip_chunk(path, victim)
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        assert dev.pread(3 * CHUNK + 500, 3000) == b"n" * 3000
        with pytest.raises(DataChecksumError, match=f"offset {100 * CHUNK}"):
            dev.pread(100 * CHUNK, 10)


def test_unreadable_intent_file_means_recheck_everything(tmp_path, small_regions):
    path = str(tmp_path / "p")
    pool = _pool(path)
    with pool.open_device("v") as dev:
        dev.pwrite(b"q" * 10, 70 * CHUNK)
    crashkit._abandon(pool)
    with open(os.path.join(path, "intent"), "r+b") as f:
        f.write(b"\xff" * 8)                  # torn / damaged intent record
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        assert dev.pread(70 * CHUNK, 10) == b"q" * 10
        assert pool._sums.counters["chunks_hashed"] >= 128


def test_snapshot_shares_checksums_and_cow_chunk_gets_its_own(tmp_path):
    pool = _pool(str(tmp_path / "p"))
    pool.snapshot("v@s")
    with pool.open_device("v") as dev:
        dev.pwrite(b"c" * 10, 7 * CHUNK)       # copy on write: a new chunk
    pool.commit()
    with pool.open_device("v@s") as snap, pool.open_device("v") as dev:
        assert snap.pread(7 * CHUNK, 10) != b"c" * 10
        assert dev.pread(7 * CHUNK, 10) == b"c" * 10
    sums = pool.md.space.sums.arr
    assert (sums[pool.md.space.refs.arr > 0] != 0).all()
    pool.close()


def test_grown_pool_checksums_and_marks_new_chunks(tmp_path, small_regions):
    pool = Pool.create(str(tmp_path / "p"), 64 * CHUNK, CHUNK, commit_interval=0)
    pool.create_volume("v", 1 << 20)
    with pool.open_device("v") as dev:
        dev.pwrite(os.urandom(60 * CHUNK), 0)
        pool.grow(200 * CHUNK)
        dev.pwrite(os.urandom(100 * CHUNK), 60 * CHUNK)      # chunks past the old end
        pool.commit()
        dev.pwrite(b"x" * 10, 150 * CHUNK)                     # in place, a new region
        assert pool._sums.intent.bits[-1]
        pool.commit()
        dev.pread(0, 160 * CHUNK)
    assert crashkit.check_pool(pool) == []
    pool.close()


def test_commit_inside_a_write_keeps_the_crash_window_covered(tmp_path, small_regions):
    """A write that must commit to find a free chunk (pool full, chunks pending free)
    also writes in place to a chunk it just committed: that must be marked too."""
    path = str(tmp_path / "p")
    pool = Pool.create(path, 8 * CHUNK, CHUNK, commit_interval=0)
    pool.create_volume("v", 64 * CHUNK)
    with pool.open_device("v") as dev:
        dev.pwrite(os.urandom(8 * CHUNK), 0)           # the pool is full
        pool.commit()
        dev.discard(0, CHUNK)                          # one chunk pending free
        dev.pwrite(b"a" * 100, 7 * CHUNK)              # chunk 7: written this transaction
        commits = pool.counters["commits"]
        dev.pwrite(b"b" * 200, 8 * CHUNK - 100)        # chunk 7 in place + chunk 8 needs one
        assert pool.counters["commits"] == commits + 1
    crashkit._abandon(pool)                            # killed before the next commit
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        assert dev.pread(7 * CHUNK, 100) == b"a" * 100
        dev.pread(0, 64 * CHUNK)                       # no false checksum error


_OPS = st.lists(st.tuples(st.sampled_from(["write", "write", "discard", "commit", "zero"]),
                          st.integers(0, 48 * 1024 - 1), st.integers(1, 20000)),
                min_size=1, max_size=25)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(ops=_OPS, chunk=st.sampled_from([4096, 16384]))
def test_checksums_at_commit_match_the_bytes(tmp_path_factory, ops, chunk):
    """Whatever mix of small and large writes, discards and zeroing a transaction holds,
    the checksums its commit stores equal a hash of each chunk's bytes (scrub is clean)."""
    from thinstore.scrub import scrub_pool
    path = str(tmp_path_factory.mktemp("sums") / "p")
    with Pool.create(path, 64 * chunk, chunk, commit_interval=0) as pool, _vol(pool) as dev:
        for kind, off, ln in ops:
            ln = min(ln, 48 * 1024 - off)
            if kind == "write":
                dev.pwrite(os.urandom(ln), off)
            elif kind == "discard":
                dev.discard(off, ln)
            elif kind == "zero":
                dev.pwrite(bytes(ln), off)
            else:
                pool.commit()
        pool.commit()
        rep = scrub_pool(pool)
        assert not rep.damaged and rep.verified == rep.chunks


def _vol(pool):
    pool.create_volume("v", 48 * 1024)
    return pool.open_device("v")


# -- prehash: most of a commit's hashing done before it takes the lock -----------------
def _scrub_clean(pool) -> None:
    from thinstore.scrub import scrub_pool
    rep = scrub_pool(pool)
    assert rep.damaged == [] and rep.skipped == 0 and rep.verified == rep.chunks


def test_prehash_is_used_only_for_chunks_not_written_again(tmp_path):
    """A chunk rewritten after the pre-hash read it gets the hash of its new bytes."""
    pool = _pool(str(tmp_path / "p"))
    with pool.open_device("v") as dev:
        dev.pwrite(b"a" * CHUNK, 3 * CHUNK)
        dev.pwrite(b"b" * CHUNK, 7 * CHUNK)
        dev.pwrite(b"c" * 100, 9 * CHUNK + 50)            # in place, part of a chunk
        with pool.lock.shared:
            plan = pool._sums.prehash_plan()
        pool._sums.prehash(plan)
        dev.pwrite(b"B" * 512, 7 * CHUNK + 1024)          # after the pre-hash read it
        before = pool._sums.counters["chunks_prehashed"]
        pool.commit()
        assert pool._sums.counters["chunks_prehashed"] == before + 2    # chunks 3 and 9
        _scrub_clean(pool)
        assert dev.pread(7 * CHUNK + 1024, 512) == b"B" * 512
    pool.close()
    with Pool.open(str(tmp_path / "p"), commit_interval=0) as pool:
        _scrub_clean(pool)
        with pool.open_device("v") as dev:
            assert dev.pread(7 * CHUNK, CHUNK)[1024:1536] == b"B" * 512


def test_a_catch_up_prehash_hashes_only_what_was_written_since(tmp_path):
    """The second pass takes the chunks written again after the first read them and
    the chunks first written since, and the commit then hashes nothing itself."""
    pool = _pool(str(tmp_path / "p"))
    with pool.open_device("v") as dev:
        dev.pwrite(b"a" * CHUNK, 3 * CHUNK)
        dev.pwrite(b"b" * CHUNK, 7 * CHUNK)
        with pool.lock.shared:
            pool._sums.prehash(pool._sums.prehash_plan())
            assert pool._sums.prehash_plan(again=True) is None     # nothing since
        dev.pwrite(b"B" * 512, 7 * CHUNK + 1024)                    # written again
        dev.pwrite(b"c" * CHUNK, 11 * CHUNK)                        # first written now
        with pool.lock.shared:
            plan = pool._sums.prehash_plan(again=True)
        assert len(plan[2]) == 2                # the chunks holding 7 and 11
        pool._sums.prehash(plan)
        hashed = pool._sums.counters["chunks_hashed"]
        pre = pool._sums.counters["chunks_prehashed"]
        pool.commit()
        assert pool._sums.counters["chunks_prehashed"] == pre + 3          # 3, 7 and 11
        assert pool._sums.counters["chunks_hashed"] == hashed
        _scrub_clean(pool)
    pool.close()
    with Pool.open(str(tmp_path / "p"), commit_interval=0) as pool:
        _scrub_clean(pool)
        with pool.open_device("v") as dev:
            assert dev.pread(7 * CHUNK, CHUNK)[1024:1536] == b"B" * 512


def test_prehash_of_an_older_transaction_is_not_used(tmp_path):
    pool = _pool(str(tmp_path / "p"))
    with pool.open_device("v") as dev:
        dev.pwrite(b"a" * CHUNK, 3 * CHUNK)
        with pool.lock.shared:
            plan = pool._sums.prehash_plan()
        pool._sums.prehash(plan)
        pool.commit()                       # uses it
        dev.pwrite(b"x" * CHUNK, 3 * CHUNK)
        pool._sums.prehash(plan)            # a stale plan: an older generation
        before = pool._sums.counters["chunks_prehashed"]
        pool.commit()
        assert pool._sums.counters["chunks_prehashed"] == before
        _scrub_clean(pool)
    pool.close()


def test_prehash_beside_writes_commits_true_checksums(tmp_path):
    """Writes (native lane and general path alike) running while the pre-hash reads the
    chunks they change: every commit still stores the hash of what the chunk holds."""
    import threading
    pool = Pool.create(str(tmp_path / "p"), 8 << 20, CHUNK, commit_interval=0)
    pool.create_volume("v", 64 * CHUNK)
    stop = threading.Event()
    errors = []

    def writer(seed: int) -> None:
        import random
        rnd = random.Random(seed)
        try:
            with pool.open_device("v") as dev:
                while not stop.is_set():
                    n = rnd.choice((512, 4096, CHUNK, 3 * CHUNK))
                    dev.pwrite(os.urandom(n), rnd.randrange(0, 64 * CHUNK - n, 512))
        except Exception as e:      # noqa: BLE001 -- reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    try:
        used = 0
        for i in range(30):
            if i % 2:                   # the timer's way: a pre-hash and catch-up passes
                pool._prehash()
            else:
                with pool.lock.shared:
                    plan = pool._sums.prehash_plan()
                if plan is not None:
                    pool._sums.prehash(plan)
            before = pool._sums.counters["chunks_prehashed"]
            pool.commit()
            used += pool._sums.counters["chunks_prehashed"] - before
            with pool.lock:             # no write between the commit and the check
                if pool._dirty:
                    pool.commit()
                _scrub_clean(pool)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors
    assert used > 0                     # the pre-hash did take work off the commits
    pool.close()
    with Pool.open(str(tmp_path / "p"), commit_interval=0) as pool:
        _scrub_clean(pool)
