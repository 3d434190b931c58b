"""Snapshots, clones and chains: what a user sees after snapshotting and writing."""

import pytest

from conftest import MiB, pattern
from thinstore.check import check_pool
from thinstore.errors import ReadOnlyDevice

SIZE = 8 * MiB


def write(pool, name, data, offset):
    with pool.open_device(name) as dev:
        dev.pwrite(data, offset)


def read(pool, name, offset=0, length=SIZE):
    with pool.open_device(name) as dev:
        return dev.pread(offset, length)


def test_snapshot_keeps_old_data_volume_gets_new(pool):
    pool.create_volume("vol", SIZE)
    old = pattern(1, SIZE)
    write(pool, "vol", old, 0)
    pool.snapshot("vol@s1")
    new = pattern(2, 3 * MiB)
    write(pool, "vol", new, 12345)          # unaligned start and end
    assert read(pool, "vol@s1") == old
    assert read(pool, "vol") == old[:12345] + new + old[12345 + len(new):]


def test_clone_diverges_independently_of_volume(pool):
    pool.create_volume("vol", SIZE)
    base = pattern(3, SIZE)
    write(pool, "vol", base, 0)
    pool.snapshot("vol@s")
    pool.clone("vol@s", "c")
    write(pool, "c", b"C" * 70000, 100)
    write(pool, "vol", b"V" * 5000, 64 << 10)
    assert read(pool, "vol@s") == base
    c = bytearray(base); c[100:70100] = b"C" * 70000
    v = bytearray(base); v[65536:70536] = b"V" * 5000
    assert read(pool, "c") == bytes(c)
    assert read(pool, "vol") == bytes(v)


def test_snapshot_is_read_only(pool):
    pool.create_volume("vol", SIZE)
    pool.snapshot("vol@s")
    with pool.open_device("vol@s") as dev, pytest.raises(ReadOnlyDevice):
        dev.pwrite(b"x", 0)


def test_chain_of_depth_50_reads_correctly_at_every_level(pool):
    pool.create_volume("d0", SIZE)
    expected = {}
    content = bytearray(SIZE)
    name = "d0"
    for level in range(50):
        off = (level * 977_123) % (SIZE - 70000)
        chunk = pattern(100 + level, 70000)
        write(pool, name, chunk, off)
        content[off:off + len(chunk)] = chunk
        pool.snapshot(f"{name}@s")
        expected[f"{name}@s"] = bytes(content)
        nxt = f"d{level + 1}"
        pool.clone(f"{name}@s", nxt)
        name = nxt
    for snap, data in expected.items():
        assert read(pool, snap) == data, snap
    assert not check_pool(pool)


def test_destroying_origin_leaves_snapshots_and_clones_whole(pool):
    pool.create_volume("vol", SIZE)
    a = pattern(5, SIZE)
    write(pool, "vol", a, 0)
    pool.snapshot("vol@s1")
    b = pattern(6, MiB)
    write(pool, "vol", b, 2 * MiB)
    pool.snapshot("vol@s2")
    pool.clone("vol@s1", "c1")
    write(pool, "c1", b"c" * 1000, 0)
    expect = {n: read(pool, n) for n in ("vol@s1", "vol@s2", "c1")}
    pool.destroy("vol")
    for n, data in expect.items():
        assert read(pool, n) == data
    pool.destroy("vol@s1")              # the origin of clone c1
    assert read(pool, "c1") == expect["c1"]
    assert read(pool, "vol@s2") == expect["vol@s2"]
    assert not check_pool(pool)


def test_snapshot_copies_no_data_and_no_map_entry(pool_path):
    from thinstore import Pool
    with Pool.create(pool_path, 2048 * MiB, 64 << 10, commit_interval=0) as pool:
        pool.create_volume("big", 1024 * MiB)
        block = pattern(7, 8 * MiB)
        with pool.open_device("big") as dev:
            for off in range(0, 1024 * MiB, len(block)):
                dev.pwrite(block, off)
        pool.commit()
        maps = pool.md.maps.counters
        before = dict(pool.counters), dict(maps)
        pool.snapshot("big@s")
        assert pool.counters["chunks_copied"] == before[0]["chunks_copied"]
        assert pool.counters["chunks_allocated"] == before[0]["chunks_allocated"]
        assert maps["pages_written"] == before[1]["pages_written"]
        assert maps["pages_shadowed"] == before[1]["pages_shadowed"]
        assert pool.info("big@s").used == 1024 * MiB
        assert pool.info("big").exclusive == 0


def test_partial_write_to_shared_chunk_copies_only_uncovered_bytes(pool):
    pool.create_volume("vol", SIZE)
    write(pool, "vol", pattern(8, 64 << 10), 0)
    pool.snapshot("vol@s")
    before = dict(pool.counters)
    write(pool, "vol", b"z" * 4096, 8192)
    assert pool.counters["chunks_copied"] - before["chunks_copied"] == 1
    assert pool.counters["bytes_copied"] - before["bytes_copied"] == (64 << 10) - 4096
    before = dict(pool.counters)
    write(pool, "vol", b"y" * 4096, 16384)     # now exclusive: in place
    assert pool.counters["chunks_copied"] == before["chunks_copied"]
    assert pool.counters["chunks_allocated"] == before["chunks_allocated"]


def test_rollback_restores_snapshot_and_keeps_newer_ones(pool):
    pool.create_volume("vol", SIZE)
    a, b = pattern(9, SIZE), pattern(10, SIZE)
    write(pool, "vol", a, 0)
    pool.snapshot("vol@a")
    write(pool, "vol", b, 0)
    pool.snapshot("vol@b")
    write(pool, "vol", b"after", 0)
    pool.rollback("vol@a")
    assert read(pool, "vol") == a
    assert read(pool, "vol@b") == b
    write(pool, "vol", b"x" * 10, 0)
    assert read(pool, "vol@a") == a
    assert not check_pool(pool)


def test_rename_volume_carries_its_snapshots(pool):
    pool.create_volume("vol", SIZE)
    write(pool, "vol", b"hello", 0)
    pool.snapshot("vol@s")
    pool.rename("vol", "disk")
    assert {d.name for d in pool.list()} == {"disk", "disk@s"}
    assert read(pool, "disk@s", 0, 5) == b"hello"
    pool.rename("disk@s", "disk@t")
    assert {d.name for d in pool.list()} == {"disk", "disk@t"}


def test_rename_leaves_the_snapshots_of_an_earlier_volume_of_that_name(pool):
    pool.create_volume("a", SIZE)
    pool.snapshot("a@old")
    pool.destroy("a")
    pool.create_volume("a", SIZE)
    pool.snapshot("a@new")
    pool.rename("a", "b")
    assert {d.name for d in pool.list()} == {"a@old", "b", "b@new"}
    pool.rollback("b@new")


def test_resize_grow_and_shrink(pool):
    pool.create_volume("vol", SIZE)
    data = pattern(11, SIZE)
    write(pool, "vol", data, 0)
    pool.resize("vol", 2 * SIZE)
    assert read(pool, "vol", 0, 2 * SIZE) == data + bytes(SIZE)
    with pytest.raises(Exception):
        pool.resize("vol", MiB)
    pool.resize("vol", MiB + 1000, shrink=True)
    assert read(pool, "vol", 0, MiB + 1000) == data[:MiB + 1000]
    pool.resize("vol", SIZE)
    assert read(pool, "vol", 0, SIZE) == data[:MiB + 1000] + bytes(SIZE - MiB - 1000)
    assert not check_pool(pool)


def test_discard_and_write_zeroes(pool):
    pool.create_volume("vol", SIZE)
    data = pattern(12, SIZE)
    write(pool, "vol", data, 0)
    used = pool.info("vol").used
    with pool.open_device("vol") as dev:
        dev.discard(1000, 3 * (64 << 10))           # 2 whole chunks unmapped, edges zeroed
        exp = bytearray(data); exp[1000:1000 + 3 * 65536] = bytes(3 * 65536)
        assert dev.pread(0, SIZE) == bytes(exp)
        assert pool.info("vol").used == used - 2 * 65536
        dev.write_zeroes(MiB, MiB, no_hole=True)
        exp[MiB:2 * MiB] = bytes(MiB)
        assert dev.pread(0, SIZE) == bytes(exp)
        assert pool.info("vol").used == used - 2 * 65536
        dev.write_zeroes(MiB, MiB)
        assert pool.info("vol").used == used - 2 * 65536 - MiB
        ext = dev.extents(0, SIZE)
        assert (MiB, MiB, False) in ext
    assert not check_pool(pool)


def test_all_zero_write_leaves_chunks_unmapped(pool):
    pool.create_volume("vol", SIZE)
    with pool.open_device("vol") as dev:
        dev.pwrite(bytes(2 * MiB), 0)
        assert pool.info("vol").used == 0
        dev.pwrite(b"x" * MiB, 0)
        dev.pwrite(bytes(MiB), 0)
        assert pool.info("vol").used == 0
        assert dev.pread(0, MiB) == bytes(MiB)


def test_closing_a_handle_twice_releases_it_once(pool):
    from thinstore.errors import DeviceBusy
    pool.create_volume("vol", SIZE)
    a = pool.open_device("vol")
    b = pool.open_device("vol")
    a.close()
    a.close()
    with pytest.raises(DeviceBusy):
        pool.destroy("vol")
    b.close()
    pool.destroy("vol")


def test_rollback_refuses_a_snapshot_of_an_earlier_namesake(pool):
    from thinstore.errors import InvalidName
    pool.create_volume("vm", SIZE)
    write(pool, "vm", b"old", 0)
    pool.snapshot("vm@a")
    pool.destroy("vm")                   # vm@a stays whole
    pool.create_volume("vm", 2 * SIZE)   # an unrelated volume takes the name
    with pytest.raises(InvalidName, match="clone it instead"):
        pool.rollback("vm@a")
    assert pool.info("vm").size == 2 * SIZE
    pool.clone("vm@a", "vm-old")
    assert read(pool, "vm-old", 0, 3) == b"old"
