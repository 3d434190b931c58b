"""Reopen, crash and full-pool behaviour of the pool."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from conftest import MiB, ROOT, pattern
from thinstore import Pool
from thinstore.check import check_pool
from thinstore.errors import PoolFull, PoolLocked


def test_close_and_reopen_brings_everything_back(pool_path):
    with Pool.create(pool_path, 64 * MiB, 16 << 10, commit_interval=0) as pool:
        pool.create_volume("a", 5 * MiB + 512)
        pool.create_volume("b", 3 * MiB)
        with pool.open_device("a") as dev:
            dev.pwrite(pattern(1, 5 * MiB + 512), 0)
        pool.snapshot("a@s")
        pool.clone("a@s", "c")
        with pool.open_device("c") as dev:
            dev.pwrite(b"clone", 77)
        before = {d.name: d for d in pool.list()}
    with Pool.open(pool_path, commit_interval=0) as pool:
        after = {d.name: d for d in pool.list()}
        assert after == before
        with pool.open_device("a") as dev:
            assert dev.pread(0, dev.size) == pattern(1, 5 * MiB + 512)
        with pool.open_device("c") as dev:
            exp = bytearray(pattern(1, 5 * MiB + 512)); exp[77:82] = b"clone"
            assert dev.pread(0, dev.size) == bytes(exp)
        assert pool.info("b").used == 0
        assert not check_pool(pool)


def test_second_opener_gets_locked_error_with_pid(pool):
    with pytest.raises(PoolLocked, match=str(os.getpid())):
        Pool.open(pool.path)


CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r})
    from thinstore import Pool
    import numpy as np
    pool = Pool.open({path!r}, commit_interval=0)
    dev = pool.open_device("vol")
    rng = np.random.default_rng(7)
    dev.pwrite(rng.integers(1, 255, 4 << 20, dtype=np.uint8).tobytes(), 0)
    pool.snapshot("vol@before")
    dev.discard(1 << 20, 1 << 20)
    dev.flush()
    print("FLUSHED", flush=True)
    i = 0
    while True:       # keep writing until killed, over everything incl. flushed data
        dev.pwrite(bytes([i % 250 + 1]) * 70000, (i * 99991) % ((4 << 20) - 70000))
        dev.discard((i * 65536) % (4 << 20), 65536)
        i += 1
        if i == 200:
            print("BUSY", flush=True)
""")


def test_sigkill_after_flush_keeps_every_flushed_byte(pool_path):
    import numpy as np
    with Pool.create(pool_path, 64 * MiB, 64 << 10, commit_interval=0) as pool:
        pool.create_volume("vol", 4 * MiB)
    code = CHILD.format(root=ROOT, path=pool_path)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "FLUSHED"
    assert proc.stdout.readline().strip() == "BUSY"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    expected = np.random.default_rng(7).integers(1, 255, 4 << 20, dtype=np.uint8).tobytes()
    flushed = expected[:1 << 20] + bytes(1 << 20) + expected[2 << 20:]
    with Pool.open(pool_path, commit_interval=0) as pool:
        assert not check_pool(pool)
        with pool.open_device("vol@before") as snap:
            assert snap.pread(0, 4 << 20) == expected
        with pool.open_device("vol") as dev:
            assert dev.pread(0, 4 << 20) == flushed   # nothing after the flush was committed


def test_chunk_freed_in_open_transaction_is_not_reused_before_commit(pool_path):
    cs = 64 << 10
    with Pool.create(pool_path, 4 * cs, cs, commit_interval=0) as pool:   # 4 usable chunks
        pool.create_volume("a", 2 * cs)
        pool.create_volume("b", 2 * cs)
        with pool.open_device("a") as a, pool.open_device("b") as b:
            a.pwrite(b"A" * (2 * cs), 0)
            b.pwrite(b"B" * cs, 0)
            pool.commit()
            used = {int(c) for c in pool.md.space.refs.arr.nonzero()[0]}
            a.discard(0, 2 * cs)                  # frees a's two chunks, not yet committed
            b.pwrite(b"b" * cs, cs)               # must take the 4th chunk, not a freed one
            new = {int(c) for c in pool.md.space.refs.arr.nonzero()[0]} - used
            assert new and not new & used
        # simulate a crash here: drop the pool without committing
        pool._closed = True
        pool.md.data_fio.close(); pool.md.meta_fio.close(); pool._owner.release()
    with Pool.open(pool_path, commit_interval=0) as pool:
        with pool.open_device("a") as a:
            assert a.pread(0, 2 * cs) == b"A" * (2 * cs)   # the committed map's data is intact
        assert not check_pool(pool)


def test_full_pool_fails_the_write_and_keeps_data(pool_path):
    cs = 64 << 10
    with Pool.create(pool_path, 16 * cs, cs, commit_interval=0) as pool:
        pool.create_volume("v", 64 * cs)          # over-provisioned 4x
        pool.create_volume("w", 64 * cs)
        data = pattern(3, 16 * cs)
        with pool.open_device("v") as v:
            v.pwrite(data, 0)
            with pytest.raises(PoolFull) as err:
                v.pwrite(b"x" * cs, 20 * cs)
            assert err.value.errno == 28          # ENOSPC
            with pool.open_device("w") as w, pytest.raises(PoolFull):
                w.pwrite(b"y", 0)
            assert v.pread(0, 16 * cs) == data
            v.pwrite(b"in place", 0)              # writes to mapped exclusive chunks still work
        pool.snapshot("v@s")
        with pool.open_device("v") as v, pytest.raises(PoolFull):
            v.pwrite(b"cow needs a chunk", 0)
        pool.destroy("v@s")
        pool.destroy("w")
        with pool.open_device("v") as v:
            v.discard(0, 4 * cs)
            v.pwrite(b"x" * cs, 20 * cs)          # a chunk freed by the discard (commit on demand)
            v.pwrite(b"z" * cs, 30 * cs)
            assert v.pread(20 * cs, cs) == b"x" * cs
            assert v.pread(4 * cs, 12 * cs) == data[4 * cs:]
        assert not check_pool(pool)


def test_low_water_mark_warns_once_per_crossing(pool_path, caplog):
    cs = 4096
    with Pool.create(pool_path, 100 * cs, cs, commit_interval=0, low_water=0.5) as pool:
        pool.create_volume("v", 100 * cs)
        with pool.open_device("v") as v, caplog.at_level("WARNING", logger="thinstore"):
            for i in range(70):
                v.pwrite(b"x" * cs, i * cs)
            pool.commit()
            assert sum("low-water" in r.message for r in caplog.records) == 1
            v.discard(0, 70 * cs)
            pool.commit()
            for i in range(70):
                v.pwrite(b"y" * cs, i * cs)
            pool.commit()
            assert sum("low-water" in r.message for r in caplog.records) == 2
        assert pool.status()["low_water_crossed"]


def test_growing_a_full_pool_makes_room(pool_path):
    cs = 4096
    with Pool.create(pool_path, 8 * cs, cs, commit_interval=0) as pool:
        pool.create_volume("v", 64 * cs)
        with pool.open_device("v") as v:
            v.pwrite(b"a" * 8 * cs, 0)
            with pytest.raises(PoolFull):
                v.pwrite(b"b" * cs, 8 * cs)
            pool.grow(16 * cs)
            v.pwrite(b"b" * cs, 8 * cs)
    with Pool.open(pool_path, commit_interval=0) as pool:
        assert pool.capacity == 16 * cs
        with pool.open_device("v") as v:
            assert v.pread(0, 9 * cs) == b"a" * 8 * cs + b"b" * cs
        assert not check_pool(pool)
