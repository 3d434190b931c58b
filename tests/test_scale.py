"""Scale: many snapshots through one batch, and destroy's space given back in the background.

- a pool with 10,000 snapshots (taken in one batch: one commit, not 10,000) opens,
  lists, checks, and destroys every snapshot back to zero used chunks;
- a 1 PiB volume (64 KiB chunks) with writes at its start and end reads back, is
  snapshotted, survives reopen, check, a commit of only what changed, and destroy;
- batch(): a crash before its end commits none of its operations;
- destroying a device queues its chunks' hole punch for the background reclaim:
  status() shows them as "freeing" until punched; a chunk reused before the punch is
  never punched (its new data reads back); a crash with punches still queued loses
  nothing, leaks no chunk, and the next open gives the bytes back to the file system.
"""

import os

import pytest

from conftest import pattern
from thinstore import Pool, reclaim
from thinstore.check import check_path, check_pool

MiB = 1 << 20
GiB = 1 << 30
N_SNAPSHOTS = 10_000


def _allocated(path: str) -> int:
    """Bytes the data file holds on the host file system."""
    return os.stat(os.path.join(path, "data")).st_blocks * 512


def _abandon(pool) -> None:
    """Drop a pool without closing it: the machine went off."""
    pool._closed = True
    pool._stop.set()
    pool._owner.release()


def test_ten_thousand_snapshots_open_list_check_and_destroy_to_zero(pool_path):
    pool = Pool.create(pool_path, 256 * MiB, 64 << 10, commit_interval=0)
    pool.create_volume("vol", 1 * GiB)
    with pool.open_device("vol") as dev:
        for i in range(16):                       # scattered chunks over many map pages
            dev.pwrite(pattern(i, 4096), i * 64 * MiB)
    gen = pool.status()["generation"]
    with pool.batch():
        for i in range(N_SNAPSHOTS):
            pool.snapshot(f"vol@s{i:05d}")
    assert pool.status()["generation"] == gen + 1      # the batch is one commit
    pool.close()

    pool = Pool.open(pool_path, commit_interval=0)
    infos = pool.list()
    assert len(infos) == N_SNAPSHOTS + 1
    snaps = [i for i in infos if i.kind == "snapshot"]
    assert all(i.used == 16 * (64 << 10) and i.exclusive == 0 and i.origin == "vol"
               for i in snaps)
    assert pool.info("vol@s09999").used == 16 * (64 << 10)
    with pool.open_device("vol@s04321") as dev:
        assert dev.pread(5 * 64 * MiB, 4096) == pattern(5, 4096)
    assert check_pool(pool) == []
    pool.close()
    assert check_path(pool_path).problems == []

    pool = Pool.open(pool_path, commit_interval=0)
    with pool.batch():
        for info in snaps:
            pool.destroy(info.name)
    assert [i.name for i in pool.list()] == ["vol"]
    pool.destroy("vol")
    assert pool.status()["used"] == 0
    pool.close()
    pool = Pool.open(pool_path, commit_interval=0)
    assert pool.status()["used"] == 0 and pool.list() == []
    assert check_pool(pool) == []
    pool.close()


PiB = 1 << 50


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0])


def test_a_petabyte_volume_is_created_written_snapshotted_and_checked(pool_path):
    head, tail = pattern(3, 8192), pattern(4, 4096)
    with Pool.create(pool_path, 256 * MiB, 64 << 10, commit_interval=0) as pool:
        pool.create_volume("big", PiB)
        rss = _rss_kib()
        with pool.open_device("big") as dev:
            dev.pwrite(head, 0)
            dev.pwrite(tail, PiB - 4096)
        for i in range(10):
            pool.snapshot(f"big@s{i}")
        # the directory of a 1 PiB volume is 33.8M entries: only written leaves are held
        assert _rss_kib() - rss < 16 * 1024, "ten snapshots of a sparse 1 PiB volume"
        assert pool.info("big@s3").used == 2 * (64 << 10)
    with Pool.open(pool_path, commit_interval=0) as pool:
        for name in ("big", "big@s9"):
            with pool.open_device(name) as dev:
                assert dev.size == PiB
                assert dev.pread(0, 8192) == head
                assert dev.pread(PiB - 4096, 4096) == tail
                assert dev.pread(PiB // 2, 4096) == bytes(4096)
        assert check_pool(pool) == []
        for i in range(10):
            pool.destroy(f"big@s{i}")
        pool.destroy("big")
        assert pool.status()["used"] == 0
    assert check_path(pool_path).problems == []


def test_a_crash_inside_a_batch_commits_none_of_it(pool_path):
    pool = Pool.create(pool_path, 64 * MiB, 64 << 10, commit_interval=0)
    pool.create_volume("vol", 16 * MiB)
    with pool.batch():
        pool.snapshot("vol@a")
        pool.snapshot("vol@b")
        pool.destroy("vol@a")
        assert {i.name for i in pool.list()} == {"vol", "vol@b"}   # visible inside
        _abandon(pool)                      # power off before the batch ends
    pool = Pool.open(pool_path, commit_interval=0)
    assert [i.name for i in pool.list()] == ["vol"]
    with pytest.raises(Exception):
        with pool.batch():
            pool.snapshot("vol@kept")
            pool.snapshot("vol@kept")       # DeviceExists: the first one still commits
    pool.close()
    with Pool.open(pool_path, commit_interval=0) as pool:
        assert [i.name for i in pool.list()] == ["vol", "vol@kept"]


def _filled(pool, name: str, size: int, seed: int) -> bytes:
    data = pattern(seed, size)
    with pool.open_device(name) as dev:
        dev.pwrite(data, 0)
    pool.commit()
    return data


def test_destroy_frees_in_the_background_shown_as_freeing(pool_path):
    pool = Pool.create(pool_path, 128 * MiB, 64 << 10, commit_interval=0)
    pool.create_volume("big", 32 * MiB)
    pool.create_volume("keep", 4 * MiB)
    keep = _filled(pool, "keep", 4 * MiB, 2)
    _filled(pool, "big", 32 * MiB, 1)
    before = _allocated(pool_path)
    with pool.lock:          # holding the pool keeps the reclaim thread out for a moment
        pool.destroy("big")
        status = pool.status()
        assert status["freeing"] == 32 * MiB
        assert status["used"] == 4 * MiB        # free in the space map already
        assert _allocated(pool_path) >= before - MiB   # not punched inside destroy
    assert pool.wait_freed(timeout=60)
    assert pool.status()["freeing"] == 0
    assert _allocated(pool_path) <= before - 31 * MiB
    with pool.open_device("keep") as dev:
        assert dev.pread(0, 4 * MiB) == keep
    pool.close()


def test_a_chunk_reused_before_its_punch_keeps_its_new_data(pool_path):
    # a pool of 16 chunks: the new volume can only be written into the freed chunks
    pool = Pool.create(pool_path, 1 * MiB, 64 << 10, commit_interval=0)
    pool.create_volume("old", 1 * MiB)
    _filled(pool, "old", 1 * MiB, 3)
    pool.create_volume("new", 1 * MiB)
    with pool.lock:
        pool.destroy("old")
        assert pool.status()["freeing"] == 1 * MiB
        fresh = _filled(pool, "new", 1 * MiB, 4)      # reuses every freed chunk
    assert pool.wait_freed(timeout=60)
    with pool.open_device("new") as dev:
        assert dev.pread(0, 1 * MiB) == fresh
    pool.close()
    with Pool.open(pool_path, commit_interval=0) as pool, pool.open_device("new") as dev:
        assert dev.pread(0, 1 * MiB) == fresh
    assert check_path(pool_path).problems == []


def test_a_crash_with_punches_queued_loses_and_leaks_nothing(pool_path, monkeypatch):
    monkeypatch.setattr(reclaim, "SCAN_DELAY", 0.0)
    pool = Pool.create(pool_path, 128 * MiB, 64 << 10, commit_interval=0)
    pool.create_volume("big", 32 * MiB)
    pool.create_volume("keep", 4 * MiB)
    keep = _filled(pool, "keep", 4 * MiB, 5)
    _filled(pool, "big", 32 * MiB, 6)
    before = _allocated(pool_path)
    with pool.lock:
        pool.destroy("big")
        assert pool.status()["freeing"] == 32 * MiB
        _abandon(pool)                     # power off with the punches still queued
    assert _allocated(pool_path) >= before - MiB
    pool = Pool.open(pool_path, commit_interval=0)
    assert pool.status()["used"] == 4 * MiB          # no chunk leaked
    assert [i.name for i in pool.list()] == ["keep"]
    assert pool.wait_freed(timeout=60)               # the open found them and punched
    assert _allocated(pool_path) <= before - 31 * MiB
    with pool.open_device("keep") as dev:
        assert dev.pread(0, 4 * MiB) == keep
    assert check_pool(pool) == []
    pool.close()


@pytest.fixture
def loop_device(tmp_path):
    """A 256 MiB loop device over a sparse file (root and losetup needed)."""
    import shutil
    import subprocess
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup (util-linux)")
    backing = tmp_path / "backing"
    with open(backing, "wb") as f:
        f.truncate(256 * MiB)
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    dev = made.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_data_on_a_raw_block_device(tmp_path, loop_device):
    dev, backing = loop_device
    path = str(tmp_path / "pool")
    pool = Pool.create(path, None, 64 << 10, commit_interval=0, data_device=dev)
    assert pool.capacity == 256 * MiB - (64 << 10)          # the whole device, less chunk 0
    pool.create_volume("vol", 64 * MiB)
    data = _filled(pool, "vol", 32 * MiB, 7)
    pool.snapshot("vol@a")
    with pool.open_device("vol") as d:
        d.pwrite(pattern(8, 4096), 4096)
    pool.close()
    with Pool.open(path, commit_interval=0) as pool:
        with pool.open_device("vol@a") as d:
            assert d.pread(0, 32 * MiB) == data
        with pool.open_device("vol") as d:
            assert d.pread(4096, 4096) == pattern(8, 4096)
        with pytest.raises(OSError, match="block device holds"):
            pool.grow(512 * MiB)
        pool.destroy("vol@a")
        pool.destroy("vol")
        assert pool.wait_freed(timeout=60)
        assert pool.status()["used"] == 0
    assert check_path(path).problems == []
    assert os.stat(backing).st_blocks * 512 < 4 * MiB     # punched through to the loop file


@pytest.fixture
def second_loop_device(tmp_path, loop_device):
    """Another 256 MiB loop device, holding data of its own at 1 MiB."""
    import subprocess
    backing = tmp_path / "other"
    with open(backing, "wb") as f:
        f.truncate(256 * MiB)
        f.seek(MiB)
        f.write(b"another disk's data" * 100)
    made = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True,
                          text=True)
    if made.returncode != 0:
        pytest.skip(f"no second loop device: {made.stderr.strip()}")
    try:
        yield made.stdout.strip(), backing
    finally:
        subprocess.run(["losetup", "-d", made.stdout.strip()], check=False)


def test_a_data_device_renamed_to_another_disk_is_refused_before_a_byte_is_written(
        tmp_path, loop_device, second_loop_device):
    """POOL/data names its device by path, and device names change (sdb and sdc swap at
    a boot, a loop number is reused): a pool whose name led to another disk wrote its
    data there (that disk's bytes at 1 MiB were overwritten by an import). The device is
    labelled at init; another disk is refused (exit 10), untouched; the right one works."""
    import subprocess
    import sys
    from conftest import ROOT
    from thinstore.errors import WrongDataDevice
    dev, _ = loop_device
    other, other_backing = second_loop_device
    path = str(tmp_path / "pool")
    with Pool.create(path, None, 64 << 10, commit_interval=0, data_device=dev) as pool:
        pool.create_volume("vol", 8 * MiB)
        with pool.open_device("vol") as d:
            d.pwrite(pattern(3, MiB), 0)
    before = other_backing.read_bytes()
    link = os.path.join(path, "data")
    os.unlink(link)
    os.symlink(other, link)                        # the name now leads to another disk
    with pytest.raises(WrongDataDevice, match="carries no label"):
        Pool.open(path, commit_interval=0)
    env = dict(os.environ, PYTHONPATH=ROOT)
    cli = subprocess.run([sys.executable, "-m", "thinstore", "--pool", path, "import", "x",
                          "-", "--size", "1M"], input=b"x" * MiB, capture_output=True,
                         env=env, timeout=60)
    assert cli.returncode == 10 and b"ln -sfn" in cli.stderr, cli.stderr
    assert other_backing.read_bytes() == before
    os.unlink(link)
    os.symlink(dev, link)                          # pointed back: as before
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("vol") as d:
        assert d.pread(0, MiB) == pattern(3, MiB)
    with open(dev, "r+b") as f:                    # as an older thinstore left it: no label
        f.write(bytes(4096))
    with pytest.raises(WrongDataDevice, match="upgrade"):
        Pool.open(path, commit_interval=0)
    done = subprocess.run([sys.executable, "-m", "thinstore", "--pool", path, "upgrade"],
                          capture_output=True, env=env, timeout=60)
    assert done.returncode == 0 and b"labelled" in done.stderr, done.stderr
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("vol") as d:
        assert d.pread(0, MiB) == pattern(3, MiB)


def test_init_refuses_a_data_device_that_holds_a_file_system_or_another_pool(tmp_path,
                                                                              loop_device):
    """'init --data-device' on a disk holding a file system took it silently (the label
    and then the data overwrite it), as it would a disk of another pool: refused, naming
    what is there, unless --force (mkfs, pvcreate and zpool create refuse alike)."""
    import shutil
    import subprocess
    import sys
    from conftest import ROOT
    if shutil.which("mkfs.ext4") is None or shutil.which("blkid") is None:
        pytest.skip("needs mkfs.ext4 (e2fsprogs) and blkid (util-linux)")
    dev, backing = loop_device
    subprocess.run(["mkfs.ext4", "-q", dev], check=True)
    before = backing.read_bytes()[:4 * MiB]
    env = dict(os.environ, PYTHONPATH=ROOT)

    def init(path, *extra):
        return subprocess.run([sys.executable, "-m", "thinstore", "--pool", str(path), "init",
                               "--data-device", dev, *extra], capture_output=True, text=True,
                              env=env, timeout=60)
    r = init(tmp_path / "p1")
    assert r.returncode == 2 and "type ext4" in r.stderr and "--force" in r.stderr, r.stderr
    assert backing.read_bytes()[:4 * MiB] == before and not (tmp_path / "p1").exists()
    assert init(tmp_path / "p1", "--force").returncode == 0
    r = init(tmp_path / "p2")                     # now another pool's data device
    assert r.returncode == 2 and "holds the data of thinstore pool" in r.stderr, r.stderr
