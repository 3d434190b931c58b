"""Corruption is seen: a flipped superblock, metadata page or data chunk is caught by open,
check or read, never returned silently; repair mends what it can and says what it cannot;
scrub names every device that shares a bad chunk."""

from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pytest
from integrity_helpers import (CHUNK, contents_of, chunk_of, flip, flip_block, flip_chunk, make_pool,
                               map_page_block, tamper)

from thinstore import Pool
from thinstore.check import check_path
from thinstore.errors import CorruptMetadata, DataChecksumError
from thinstore.format import BLOCK_SIZE
from thinstore.kernels import ST_REF_CHANGED
from thinstore.repair import repair_path
from thinstore.salvage import DAMAGE_CODES
from thinstore.scrub import scrub_pool


@pytest.fixture
def pool_dir(tmp_path):
    path = str(tmp_path / "pool")
    return path, make_pool(path)


def _newest_slot(path: str) -> int:
    with Pool.open(path, commit_interval=0) as pool:
        return pool.md.generation % 2


def test_clean_pool_checks_clean(pool_dir):
    path, _ = pool_dir
    report = check_path(path)
    assert report.clean and report.exit_code == 0, report.problems
    assert report.info["devices"] == ["clone", "vol", "vol@snap"]


# ---------------------------------------------------------------- superblock
def test_corrupt_newest_superblock_falls_back_and_says_so(pool_dir, caplog):
    path, contents = pool_dir
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("vol") as dev:
        dev.pwrite(b"newest" * 100, 20 * CHUNK)         # the newest generation's change
    slot = _newest_slot(path)
    flip(os.path.join(path, "meta"), slot * BLOCK_SIZE + 40)
    report = check_path(path)
    assert report.exit_code == DAMAGE_CODES["superblock"]
    assert any(f"slot {slot}" in p.message for p in report.problems)
    with caplog.at_level(logging.WARNING, logger="thinstore"):
        with Pool.open(path, commit_interval=0) as pool:
            assert pool.md.slot_warning and "using generation" in pool.md.slot_warning
            pool.commit()
    assert "superblock" in caplog.text
    assert check_path(path).clean           # the next commit rewrote the damaged slot
    assert contents_of(path) == contents      # exactly the previous generation


def test_both_superblocks_corrupt_refuses_to_open(pool_dir):
    path, _ = pool_dir
    for slot in (0, 1):
        flip(os.path.join(path, "meta"), slot * BLOCK_SIZE + 40)
    with pytest.raises(CorruptMetadata, match="no valid superblock"):
        Pool.open(path, commit_interval=0)
    report = check_path(path)
    assert report.exit_code == DAMAGE_CODES["unreadable"]
    rep = repair_path(path)
    assert rep.unfixable and not rep.changes and "restore" in " ".join(rep.unfixable)


# ---------------------------------------------------------------- metadata pages
def test_corrupt_map_page_is_caught_and_repair_drops_only_it(pool_dir):
    path, contents = pool_dir
    block = map_page_block(path, "vol")
    flip_block(path, block)
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("vol") as dev:
        with pytest.raises(CorruptMetadata, match=f"block {block}"):
            dev.pread(10 * CHUNK, CHUNK)          # vol's own page (it diverged)
    report = check_path(path)
    assert report.exit_code == DAMAGE_CODES["metadata"]
    named = [p for p in report.problems if p.device == "vol"]
    assert named and named[0].offset == 0
    rep = repair_path(path)
    assert any("'vol'" in c and "unreadable" in c for c in rep.changes)
    assert any("refcount" in c for c in rep.changes)
    assert not rep.unfixable
    assert check_path(path).clean
    after = contents_of(path)
    assert after["vol"] == bytes(len(contents["vol"]))        # lost range reads zeros
    assert after["vol@snap"] == contents["vol@snap"]           # the others are whole
    assert after["clone"] == contents["clone"]


def test_refcount_damage_is_named_and_rebuilt(pool_dir):
    path, contents = pool_dir
    c_leak = chunk_of(path, "vol", 11)
    c_under = chunk_of(path, "vol", 0)     # on two map pages: vol's and the snap+clone one

    def damage(pool):
        refs = pool.md.space.refs.arr
        refs[c_leak] += 2
        refs[c_under] -= 2
        pool.md.space.mark([c_leak, c_under], ST_REF_CHANGED)   # so the commit writes them
    tamper(path, damage)
    report = check_path(path)
    kinds = {p.kind for p in report.problems}
    assert kinds == {"refcount", "leak"} and report.exit_code == DAMAGE_CODES["refcount"]
    under = next(p for p in report.problems if p.kind == "refcount")
    assert under.chunk == c_under and "vol@0" in under.message and "clone@0" in under.message
    rep = repair_path(path)
    assert f"chunk {c_leak}: refcount 3 -> 1" in rep.changes
    assert f"chunk {c_under}: refcount 0 -> 2" in rep.changes   # vol's page + the shared one
    assert check_path(path).clean and contents_of(path) == contents


def test_map_entry_outside_pool_is_dropped(pool_dir):
    path, contents = pool_dir

    def damage(pool):
        dm = pool._find("vol")
        pid = int(dm.directory.arr[0])
        pool.md.maps.ensure_loaded([pid])
        pool.md.maps.pages[pid, 11] = 10 ** 9
        pool.md.maps.dirty[pid] = 1
    tamper(path, damage)
    report = check_path(path)
    assert report.exit_code == DAMAGE_CODES["range"]
    assert any(p.device == "vol" and p.offset == 11 * CHUNK for p in report.problems)
    rep = repair_path(path)
    assert any("outside the pool" in c and f"byte {11 * CHUNK}" in c for c in rep.changes)
    assert check_path(path).clean
    vol = contents_of(path)["vol"]
    assert vol[11 * CHUNK:12 * CHUNK] == bytes(CHUNK)
    assert vol[:11 * CHUNK] == contents["vol"][:11 * CHUNK]


def test_repair_refuses_while_pool_is_held(pool_dir):
    from thinstore.errors import PoolLocked
    path, _ = pool_dir
    with Pool.open(path, commit_interval=0):
        with pytest.raises(PoolLocked):
            repair_path(path)
        with pytest.raises(PoolLocked):
            check_path(path)


# ---------------------------------------------------------------- data chunks
def test_corrupt_data_chunk_fails_the_read_with_eio(pool_dir):
    path, contents = pool_dir
    c = chunk_of(path, "vol", 11)
    flip_chunk(path, c)
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("vol") as dev:
        for off, ln in ((11 * CHUNK, CHUNK), (11 * CHUNK + 100, 10), (0, 64 * CHUNK)):
            buf = bytearray(b"\xee" * ln)
            with pytest.raises(DataChecksumError) as exc:
                dev.readinto(buf, off)
            assert exc.value.errno == errno.EIO
            assert "'vol'" in str(exc.value) and f"offset {11 * CHUNK}" in str(exc.value)
            assert f"chunk {c}" in str(exc.value)
            assert buf == bytes(ln)                      # no damaged bytes handed out
        assert dev.pread(0, 11 * CHUNK) == contents["vol"][:11 * CHUNK]
    assert check_path(path).clean            # metadata is fine; scrub finds data damage


def test_scrub_names_every_device_sharing_a_bad_chunk(pool_dir):
    path, _ = pool_dir
    shared = chunk_of(path, "vol", 3)         # vol, vol@snap and clone all map it
    own = chunk_of(path, "vol", 11)
    flip_chunk(path, shared)
    flip_chunk(path, own, at=4000)
    with Pool.open(path, commit_interval=0) as pool:
        seen = []
        rep = scrub_pool(pool, progress=seen.append)
    assert seen[-1] == rep.chunks and rep.verified == rep.chunks
    assert [d.chunk for d in rep.damaged] == sorted([shared, own])
    users = {d.chunk: sorted(d.users) for d in rep.damaged}
    assert users[shared] == [("clone", 3 * CHUNK), ("vol", 3 * CHUNK), ("vol@snap", 3 * CHUNK)]
    assert users[own] == [("vol", 11 * CHUNK)]
    assert "vol@snap at byte 12288" in next(d for d in rep.damaged if d.chunk == shared).describe()


def test_repair_leaves_data_alone_and_scrub_still_sees_it(pool_dir):
    path, _ = pool_dir
    c = chunk_of(path, "vol", 11)
    flip_chunk(path, c)
    before = open(os.path.join(path, "data"), "rb").read()
    rep = repair_path(path)
    assert not rep.changes
    assert open(os.path.join(path, "data"), "rb").read() == before
    with Pool.open(path, commit_interval=0) as pool:
        assert [d.chunk for d in scrub_pool(pool).damaged] == [c]


def test_pool_without_checksums_reads_without_verifying(tmp_path):
    path = str(tmp_path / "p")
    make_pool(path, checksums=False)
    with Pool.open(path, commit_interval=0) as pool:
        assert not pool.data_checksums
        assert not np.any(pool.md.space.sums.arr)
        assert scrub_pool(pool).verified == 0
    assert not os.path.exists(os.path.join(path, "intent"))
    assert check_path(path).clean


def test_stored_page_no_directory_names_is_a_leak(pool_dir):
    path, _ = pool_dir

    def damage(pool):
        maps = pool.md.maps
        pid = int(pool._find("vol").directory.arr[0])
        maps.ensure_loaded([pid])
        orphan = maps.allocate()          # live in memory (ref 1), so the commit stores it,
        maps.pages[orphan] = maps.pages[pid]   # but no directory names it: on disk, a leak
    tamper(path, damage)
    report = check_path(path)
    assert any(p.kind == "leak" and "map page" in p.message for p in report.problems)
    rep = repair_path(path)
    assert any(c.startswith("freed map page") for c in rep.changes)
    assert check_path(path).clean
