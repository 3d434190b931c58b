"""What a commit makes every request wait for, and the counters that show it.

A full commit holds the pool lock exclusively: every write (and every read behind a
waiting writer) waits for it. The pool's counters report how long each commit held
it and its parts (docs/integrity.md "Commit lock hold time"); the background commit
does the data file's fdatasync before it takes the lock, so the fsync under the lock
finds little; it commits early once the intent log's epoch is half full, so that no
FLUSH has to make the full commit itself; and a FLUSH that must still commit does that
preparation without the lock too (docs/bench.md "Commit stalls").
"""

from __future__ import annotations

import os
import threading
import time

from thinstore import Pool
from thinstore import synclog
from thinstore.storage import FileIO

MiB = 1 << 20
PARTS = ("tree", "data_sync", "meta_sync", "superblock", "release")


def test_counters_give_each_commits_lock_hold_time_and_its_parts(tmp_path):
    path = str(tmp_path / "p")
    Pool.create(path, 64 * MiB, commit_interval=0).close()
    with Pool.open(path, commit_interval=0) as pool:
        pool.create_volume("v", 8 * MiB)       # a management op: one commit
        with pool.open_device("v") as dev:
            dev.pwrite(os.urandom(MiB), 0)
            pool.commit()
            dev.pwrite(os.urandom(2 * MiB), 4 * MiB)
            pool.commit()
        c = dict(pool.counters)
    assert c["commits"] == 3
    parts = sum(c[f"commit_{p}_us"] for p in PARTS)
    assert 0 <= c["commit_hold_us"] - parts <= 20     # the parts add up to the hold (us)
    assert parts > 0 and c["commit_tree_us"] > 0
    assert c["commit_hold_us"] / 3 <= c["commit_hold_us_max"] <= c["commit_hold_us"]
    assert c["commit_waiters"] == c["commit_waiters_max"] == 0    # nobody else was there
    assert c["flush_commits"] == 0


class _Recorder(FileIO):
    """FileIO noting, for the data file, each datasync and fsync and whether the pool
    lock's exclusive side was held at the time."""
    pool = None
    calls: list = []

    def _note(self, what: str) -> None:
        if self.path.endswith(os.sep + "data") and _Recorder.pool is not None:
            _Recorder.calls.append((what, _Recorder.pool.lock._owner is not None))

    def datasync(self) -> None:
        self._note("datasync")
        super().datasync()

    def fsync(self) -> None:
        self._note("fsync")
        super().fsync()


def test_background_commit_syncs_the_data_before_it_takes_the_lock(tmp_path):
    path = str(tmp_path / "p")
    Pool.create(path, 64 * MiB, commit_interval=0).close()
    _Recorder.calls = []
    with Pool.open(path, commit_interval=0.1, fileio=_Recorder) as pool:
        _Recorder.pool = pool
        pool.create_volume("v", 8 * MiB)
        try:
            with pool.open_device("v") as dev:
                start = len(_Recorder.calls)
                commits = pool.counters["commits"]
                dev.pwrite(os.urandom(2 * MiB), 0)
                deadline = time.monotonic() + 20
                while pool.counters["commits"] == commits and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert pool.counters["commits"] > commits, "the timer did not commit"
                calls = _Recorder.calls[start:]
        finally:
            _Recorder.pool = None
    # the timer's commit: a datasync with the lock free, then the commit's own fsync
    # under it (durability still comes from that one)
    first_fsync = calls.index(("fsync", True))
    assert ("datasync", False) in calls[:first_fsync], calls


def test_a_flush_that_must_commit_syncs_the_data_before_the_lock(tmp_path, monkeypatch):
    """The first FLUSH after more unflushed writes than one log record may carry is a
    full commit; its data fdatasync runs before the commit takes the lock, and every
    write reads back after a reopen."""
    monkeypatch.setattr(synclog, "MAX_BATCH", 256 << 10)
    path = str(tmp_path / "p")
    Pool.create(path, 64 * MiB, commit_interval=0).close()
    _Recorder.calls = []
    data = os.urandom(2 * MiB)
    with Pool.open(path, commit_interval=0, fileio=_Recorder) as pool:
        pool.create_volume("v", 8 * MiB)
        _Recorder.pool = pool
        try:
            with pool.open_device("v") as dev:
                dev.pwrite(data, MiB)
                start = len(_Recorder.calls)
                dev.flush()
                calls = _Recorder.calls[start:]
            assert pool.counters["flush_commits"] == 1
        finally:
            _Recorder.pool = None
    first_fsync = calls.index(("fsync", True))
    assert ("datasync", False) in calls[:first_fsync], calls
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        assert dev.pread(MiB, len(data)) == data


def test_timer_commits_before_the_intent_log_fills(tmp_path, monkeypatch):
    """With a commit interval far longer than the test, flushed writes filling half
    the intent log's limit make the background commit run; no flush has to commit."""
    monkeypatch.setattr(synclog, "MAX_BYTES", 4 * MiB)
    path = str(tmp_path / "p")
    Pool.create(path, 64 * MiB, commit_interval=0).close()
    with Pool.open(path, commit_interval=600) as pool:
        pool.create_volume("v", 16 * MiB)
        data = {}
        with pool.open_device("v") as dev:
            commits = pool.counters["commits"]
            for i in range(40):                 # 40 x 64 KiB flushed: 2.5 MiB of records
                data[i] = os.urandom(64 << 10)
                dev.pwrite(data[i], i * (128 << 10))
                dev.flush()
            deadline = time.monotonic() + 20
            while pool.counters["commits"] == commits and time.monotonic() < deadline:
                time.sleep(0.05)
            c = dict(pool.counters)
            assert c["commits"] > commits, "no early commit: the timer waits its 600 s"
            assert c["flush_commits"] == 0
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        for i, want in data.items():
            assert dev.pread(i * (128 << 10), 64 << 10) == want


def test_early_commit_keeps_serving_writes_and_flushes(tmp_path, monkeypatch):
    """Writers flushing all along while the log is committed early, again and again:
    every flushed write reads back after a reopen."""
    monkeypatch.setattr(synclog, "MAX_BYTES", 2 * MiB)
    path = str(tmp_path / "p")
    Pool.create(path, 64 * MiB, commit_interval=0).close()
    errors: list = []
    with Pool.open(path, commit_interval=600) as pool:
        pool.create_volume("v", 16 * MiB)
        commits = pool.counters["commits"]
        expect: dict = {}

        def writer(k: int) -> None:
            try:
                with pool.open_device("v") as dev:
                    for i in range(60):
                        off = (k * 64 + i % 64) * (64 << 10)
                        buf = os.urandom(32 << 10)
                        dev.pwrite(buf, off)
                        dev.flush()
                        expect[off] = buf
            except Exception as e:          # noqa: BLE001 -- reported below
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert pool.counters["commits"] > commits
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        for off, want in expect.items():
            assert dev.pread(off, len(want)) == want


class _Timeline(FileIO):
    """FileIO noting, in order, the data file's fsync start and end, and the meta
    file's block writes, fsyncs and superblock writes (the data fsync runs on a
    thread of its own beside the tree's writes)."""
    events: list = []
    mutex = threading.Lock()

    def _note(self, what: str) -> None:
        with _Timeline.mutex:
            _Timeline.events.append(what)

    def _name(self) -> str:
        return os.path.basename(self.path)

    def fsync(self) -> None:
        name = self._name()
        if name in ("data", "meta"):
            self._note(f"{name} fsync")
        super().fsync()
        if name == "data":
            self._note("data fsync done")

    def pwrite(self, data, offset: int) -> None:
        if self._name() == "meta":
            self._note("meta write")
        super().pwrite(data, offset)

    def write_superblock(self, data, offset: int, generation: int) -> None:
        self._note("superblock")
        super().write_superblock(data, offset, generation)


def test_data_fsync_runs_beside_the_tree_and_ends_before_the_superblock(tmp_path):
    """The crash order of docs/integrity.md holds with the data fsync started first:
    the superblock goes out only after the data fsync has returned and meta was
    synced; meanwhile the tree's blocks were written beside it."""
    path = str(tmp_path / "p")
    Pool.create(path, 64 * MiB, commit_interval=0).close()
    with Pool.open(path, commit_interval=0, fileio=_Timeline) as pool:
        pool.create_volume("v", 8 * MiB)
        with pool.open_device("v") as dev:
            dev.pwrite(os.urandom(4 * MiB), 0)
            _Timeline.events = []
            pool.commit()
            events = list(_Timeline.events)
    assert events.count("superblock") == 1 and events.count("data fsync") == 1, events
    sb = events.index("superblock")
    done = events.index("data fsync done")
    assert events.index("data fsync") < events.index("meta write") < sb
    assert done < sb and "meta fsync" in events[done:sb]      # data, then meta, then sb
    assert events[sb + 1:].count("meta fsync") == 1            # the superblock's own


def test_native_chunk_hash_is_the_checksum_of_record(tmp_path):
    """ts_hash_chunks (C, no GIL) gives datasums.chunk_sum of each chunk, runs and
    gaps and a chunk past the end of the file (zeros) included."""
    import numpy as np
    import pytest
    from thinstore.datasums import chunk_sum
    from thinstore.native import NATIVE
    if NATIVE is None:
        pytest.skip("no native build")
    cs = 4096
    path = str(tmp_path / "f")
    with open(path, "wb") as f:
        f.write(os.urandom(cs * 20 + 100))            # the last chunk partly there
    fio = FileIO(path)
    try:
        ids = np.array([0, 1, 2, 3, 7, 9, 10, 19, 20, 21], dtype=np.int64)
        out = np.zeros(len(ids), dtype=np.uint32)
        assert NATIVE.hash_chunks(fio, ids, cs, out)
        data = open(path, "rb").read()
        want = [chunk_sum(data[i * cs:(i + 1) * cs].ljust(cs, b"\0")) for i in ids.tolist()]
        assert out.tolist() == want
    finally:
        fio.close()


def test_commit_hashes_many_chunks_to_the_same_checksums(tmp_path):
    """A commit hashing hundreds of chunks (two threads in C with the native kernels)
    stores what chunk_sum gives for each chunk's bytes."""
    from thinstore.datasums import chunk_sum
    path = str(tmp_path / "p")
    cs = 4096
    Pool.create(path, 64 * MiB, cs, commit_interval=0).close()
    with Pool.open(path, commit_interval=0) as pool:
        pool.create_volume("v", 4 * MiB)
        with pool.open_device("v") as dev:
            dev.pwrite(os.urandom(2 * MiB), 0)
            pool.commit()
            dev.pwrite(os.urandom(MiB), MiB // 2)     # in place: hashed again
            pool.commit()
        space = pool.md.space
        ids = [int(c) for c in range(len(space.refs.arr)) if space.refs.arr[c]]
        assert len(ids) >= 512
        with open(os.path.join(path, "data"), "rb") as f:
            for c in ids:
                f.seek(c * cs)
                assert int(space.sums.arr[c]) == chunk_sum(f.read(cs)), c
