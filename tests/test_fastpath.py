"""The fast write path (Pool._write_fast: K.write in mode REQ_LOCKED) changes nothing a user
or the next open could see: the same workload with it switched off leaves the same
bytes, refcounts, chunk choices, checksums, intent marks and counters."""

from __future__ import annotations

import numpy as np
import pytest

from thinstore import Pool
from thinstore.pool import COMMIT_COUNTERS

MiB = 1 << 20
CS = 64 << 10


def _workload(pool: Pool, seed: int) -> None:
    """Random writes (sizes from 1 byte to 300 KiB, some all-zero) over a volume,
    with snapshots (so copies on write), commits and a clone written in between."""
    rng = np.random.default_rng(seed)
    pool.create_volume("v", 8 * MiB)
    devs = [pool.open_device("v")]
    for step in range(160):
        dev = devs[int(rng.integers(len(devs)))]
        size = int(rng.choice([1, 512, 4096, 4096, 4096, 65536, 300 << 10]))
        off = int(rng.integers(0, dev.size - size))
        if rng.random() < 0.5:
            off -= off % 4096
        zero = rng.random() < 0.1
        data = bytes(size) if zero else rng.integers(0, 256, size, np.uint8).tobytes()
        dev.pwrite(data, off)
        if step % 40 == 39:
            pool.snapshot(f"v@s{step}")
        if step == 100:
            pool.clone("v@s79", "c")
            devs.append(pool.open_device("c"))
        if step % 25 == 24:
            pool.commit()
    for d in devs:
        d.close()


def _state(pool: Pool) -> dict:
    space, sums = pool.md.space, pool._sums
    out = {"refs": space.refs.arr.tolist(), "state": space.state.tolist(),
           "cursor": space.cursor,
           "counters": {k: v for k, v in pool.counters.items()   # not the commits' times
                        if k not in COMMIT_COUNTERS},
           "intent": (sums.intent.bits.tolist(), sums.intent.hot.tolist()),
           "fresh": dict(sums.fresh)}
    for info in pool.list():
        with pool.open_device(info.name) as dev:
            out[info.name] = dev.pread(0, dev.size)
    pool.commit()
    out["sums"] = space.sums.arr.tolist()
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fast_path_matches_general_path(tmp_path, seed, monkeypatch):
    states = []
    for fast in (True, False):
        monkeypatch.setattr(Pool, "FAST_WRITES", fast)
        with Pool.create(str(tmp_path / f"p{fast}"), 64 * MiB, CS, commit_interval=0) as pool:
            _workload(pool, seed)
            states.append(_state(pool))
    fast, slow = states
    assert fast.keys() == slow.keys()
    for key in fast:
        assert fast[key] == slow[key], key


def test_a_first_write_after_reopen_keeps_the_page_it_lands_in(tmp_path):
    """After an open, map pages are read on first use; an unread page's row looks all
    holes in memory. A first write into a hole of such a page (the fast path now maps
    holes) must read the page first, not map its chunk into the empty row and so lose
    every other entry of the page at the next commit. A resumed receive did that."""
    path = str(tmp_path / "pool")
    rng = np.random.default_rng(5)
    old = rng.integers(0, 256, 4 * MiB, np.uint8).tobytes()
    new = rng.integers(0, 256, MiB, np.uint8).tobytes()
    with Pool.create(path, 64 * MiB, CS) as pool:
        pool.create_volume("v", 8 * MiB)
        with pool.open_device("v") as dev:
            dev.pwrite(old, 0)
    with Pool.open(path) as pool, pool.open_device("v") as dev:
        dev.pwrite(new, 6 * MiB)                 # holes under the page that maps `old`
        dev.pwrite(new[:4096], 5 * MiB + 4096)
    with Pool.open(path) as pool, pool.open_device("v") as dev:
        assert dev.pread(0, 4 * MiB) == old
        assert dev.pread(6 * MiB, MiB) == new
        assert dev.pread(5 * MiB + 4096, 4096) == new[:4096]


def test_writes_land_after_every_array_the_pool_owns_is_replaced(tmp_path):
    """The kernels work on one struct the pool owns, pointing into its arrays. Each
    way Python replaces an array -- the map store doubling its page table, the pool
    growing (space map, checksums), a volume resized (its directory) -- happens
    with a handle open and writing on either side of it; every write reads back,
    then and after a reopen, and the pool checks clean."""
    from thinstore.check import check_path
    path = str(tmp_path / "pool")
    rng = np.random.default_rng(9)
    want: dict[tuple[str, int], bytes] = {}

    def put(dev, name, off):
        data = rng.integers(1, 256, 4096, np.uint8).tobytes()
        dev.pwrite(data, off)
        want[(name, off)] = data

    with Pool.create(path, 64 * MiB, CS, commit_interval=0) as pool:
        pool.create_volume("v", 8 * MiB)
        with pool.open_device("v") as dev:
            put(dev, "v", 0)
            pages = len(pool.md.maps.ref)
            for i in range(pages + 8):           # one map page each: the table doubles
                pool.create_volume(f"w{i}", CS)
                with pool.open_device(f"w{i}") as w:
                    put(w, f"w{i}", 0)
            assert len(pool.md.maps.ref) > pages
            put(dev, "v", 4096)
            pool.grow(256 * MiB)                 # new space map and checksum arrays
            put(dev, "v", 8192)
            for off in range(0, 8 * MiB, CS):   # first writes: refcounts in the new arrays
                put(dev, "v", off + 12288)
            pool.resize("v", 64 * MiB)           # a new directory for v
            put(dev, "v", 40 * MiB)
            for (name, off), data in want.items():
                with pool.open_device(name) as d:
                    assert d.pread(off, 4096) == data, (name, off)
    assert check_path(path).problems == []
    with Pool.open(path) as pool:
        for (name, off), data in want.items():
            with pool.open_device(name) as d:
                assert d.pread(off, 4096) == data, (name, off)
