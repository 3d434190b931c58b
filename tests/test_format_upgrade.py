"""Pools of on-disk format 1 (thinstore before the paged device table and the trees of
interior nodes): refused with a clear message, upgraded in place by `thinstore upgrade`
in one crash-safe commit, their intent log replayed first.

tests/data/pool-format1.tar.gz was made by the format-1 code: a 64 MiB pool of 64 KiB
chunks; volume vm (8 MiB) with A*64K at 0 and B*4K at 3M, snapshot vm@s1, then C*4K at 0
of vm; clone c1 of vm@s1 with D*8K at 5M; a commit; then E*4K at 7M of vm, flushed into
the intent log only, and the process killed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile

import pytest

from faultfs import FaultDisk, PowerCut

from thinstore import Pool
from thinstore import format as fmt
from thinstore.check import check_path
from thinstore.errors import OldFormat

FIXTURE = os.path.join(os.path.dirname(__file__), "data", "pool-format1.tar.gz")
M = 1 << 20


def _expected() -> dict:
    vm = bytearray(8 * M)
    vm[0:65536] = b"A" * 65536
    vm[3 * M:3 * M + 4096] = b"B" * 4096
    snap = bytes(vm)
    vm[0:4096] = b"C" * 4096
    vm[7 * M:7 * M + 4096] = b"E" * 4096
    c1 = bytearray(snap)
    c1[5 * M:5 * M + 8192] = b"D" * 8192
    return {"vm": bytes(vm), "vm@s1": snap, "c1": bytes(c1)}


def _unpack(tmp_path) -> str:
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    path = str(tmp_path / "pool")
    os.chmod(path, 0o700)
    return path


def _contents(path: str) -> dict:
    with Pool.open(path, commit_interval=0) as pool:
        out = {}
        for name in ("vm", "vm@s1", "c1"):
            with pool.open_device(name) as dev:
                out[name] = dev.pread(0, dev.size)
        return out


def _superblock_versions(path: str) -> set:
    with open(os.path.join(path, "meta"), "rb") as f:
        raw = f.read(2 * fmt.BLOCK_SIZE)
    return {int.from_bytes(raw[i * 4096 + 8:i * 4096 + 10], "little") for i in range(2)}


def _ts(*args):
    return subprocess.run([sys.executable, "-m", "thinstore", *args], capture_output=True,
                          text=True, timeout=120)


def test_an_old_pool_is_refused_with_the_command_that_upgrades_it(tmp_path):
    path = _unpack(tmp_path)
    with pytest.raises(OldFormat, match="upgrade"):
        Pool.open(path)
    r = _ts("--pool", path, "status")
    assert r.returncode == OldFormat.exit_code
    assert f"thinstore --pool {path} upgrade" in r.stderr
    assert "format 1" in r.stderr
    assert _superblock_versions(path) == {1}, "a refused open must not write the pool"
    r = _ts("--pool", path, "check")
    assert r.returncode == 0 and "on-disk format 1" in r.stdout and "upgrade" in r.stdout


def test_upgrade_keeps_every_byte_and_the_flushed_log(tmp_path):
    path = _unpack(tmp_path)
    r = _ts("--pool", path, "upgrade")
    assert r.returncode == 0, r.stderr
    assert "upgraded from format 1 to 2" in r.stdout
    assert fmt.VERSION in _superblock_versions(path)
    assert _contents(path) == _expected()
    assert check_path(path).problems == []
    r = _ts("--pool", path, "upgrade")
    assert r.returncode == 0 and "in format 2 already" in r.stdout
    r = _ts("--pool", path, "list")
    assert r.returncode == 0 and "vm@s1" in r.stdout and "c1" in r.stdout


def test_an_upgraded_pool_keeps_working(tmp_path):
    path = _unpack(tmp_path)
    Pool.open(path, upgrade=True, commit_interval=0).close()
    with Pool.open(path, commit_interval=0) as pool:
        pool.snapshot("vm@s2")
        pool.destroy("vm@s1")
        with pool.open_device("c1") as dev:
            dev.pwrite(b"F" * 4096, 0)
    want = _expected()
    with Pool.open(path, commit_interval=0) as pool:
        with pool.open_device("vm@s2") as dev:
            assert dev.pread(0, dev.size) == want["vm"]
        with pool.open_device("c1") as dev:
            assert dev.pread(0, 4096) == b"F" * 4096
    assert check_path(path).problems == []


def test_a_power_cut_anywhere_in_the_upgrade_leaves_one_format_or_the_other(tmp_path):
    """Cut power at every I/O call of the upgrading open (the log's replay, its fold,
    the commit in the new format): the pool opens afterwards, in format 1 (then the
    upgrade runs again) or 2, with every byte, the flushed ones included."""
    pristine = _unpack(tmp_path)
    want = _expected()
    seen = set()
    for k in range(1, 400):
        path = str(tmp_path / f"p{k}")
        shutil.copytree(pristine, path)
        disk = FaultDisk(k, crash_after=k)
        try:
            Pool.open(path, upgrade=True, commit_interval=0, fileio=disk.open).close()
            break                       # the whole upgrade ran before the k-th call
        except PowerCut:
            disk.power_cut()
        seen |= _superblock_versions(path)
        try:
            Pool.open(path, commit_interval=0).close()
        except OldFormat:
            Pool.open(path, upgrade=True, commit_interval=0).close()
        assert _contents(path) == want, f"cut at I/O call {k}"
        assert check_path(path).problems == [], f"cut at I/O call {k}"
        shutil.rmtree(path)
    else:
        pytest.fail("the upgrade did not finish within 400 I/O calls")
    assert k > 5, "the cuts must land inside the upgrade"
    assert seen >= {1, 2}, "cuts before and after the superblock's switch"
