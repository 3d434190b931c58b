"""Crashes keep the pool consistent: SIGKILL at random moments and simulated power cuts.

After each crash the pool reopens, `check` is clean and every byte acknowledged
before the last completed flush reads back exactly on every device that existed then
(tests/workload.py says precisely what must survive). A negative control breaks the
commit order and shows the same power cuts then do lose data: the order, not luck,
is what keeps the pool whole.
"""

from __future__ import annotations


import crashkit
import pytest

from thinstore.errors import ThinstoreError
from thinstore.metadata import Metadata

KILLS = 50
CUTS = 300


def test_sigkill_at_random_moments(tmp_path):
    path = str(tmp_path / "pool")
    crashkit.new_pool(path)
    kills, failures, seed = 0, [], 1000
    while kills < KILLS and seed < 1000 + 2 * KILLS:
        r = crashkit.kill_round(path, seed)
        kills += r["killed"]
        failures += [f"seed {seed}: {e}" for e in r["errors"]]
        seed += 1
    assert not failures, failures[:10]
    assert kills >= KILLS


def test_power_cuts_lose_only_unflushed_writes(tmp_path):
    path = str(tmp_path / "pool")
    crashkit.new_pool(path)
    failures, cuts, torn, dropped = [], 0, 0, 0
    for seed in range(CUTS):
        r = crashkit.cut_round(path, seed)
        failures += [f"seed {seed}: {e}" for e in r["errors"]]
        cuts += r["cut"]
        torn += r["torn"]
        dropped += r["dropped"]
    assert not failures, failures[:10]
    assert cuts > CUTS // 2 and torn > 20 and dropped > 20   # the cuts did bite


def _commit_superblock_first(self, checksum_hook=None):
    """Metadata.commit with the order broken: superblock written before the tree is synced."""
    sb = self.write_tree(checksum_hook)
    self.write_superblock(sb)
    self.sync()
    self.release(sb)


def test_broken_commit_order_is_caught(tmp_path, monkeypatch):
    """Negative control: the power-cut double finds the damage a wrong order causes."""
    path = str(tmp_path / "pool")
    crashkit.new_pool(path)
    monkeypatch.setattr(Metadata, "commit", _commit_superblock_first)
    bad = 0
    for seed in range(150):
        try:
            r = crashkit.cut_round(path, seed)
        except ThinstoreError:      # the pool no longer opens: also damage
            bad += 1
            break
        if r["errors"]:
            bad += 1
            break
    assert bad, "150 power cuts did not notice a superblock written before its tree"


def test_fault_double_keeps_unsynced_writes_volatile(tmp_path):
    from faultfs import FaultDisk
    p = str(tmp_path / "f")
    disk = FaultDisk(seed=1)
    f = disk.open(p, create=True)
    f.pwrite(b"a" * 4096, 0)
    f.fsync()
    f.pwrite(b"b" * 4096, 0)
    assert f.pread(4096, 0) == b"b" * 4096 and f.size() == 4096
    disk.rng.random = lambda: 0.1          # drop every unsynced write
    disk.power_cut()
    with open(p, "rb") as real:
        assert real.read() == b"a" * 4096


@pytest.mark.parametrize("keep", [0, 8, 30, 60])    # the record is 80 bytes
def test_torn_superblock_write_falls_back(tmp_path, keep):
    """A cut that tears the superblock write (the last step of commit) leaves the
    previous generation in charge, whole."""
    import os

    from faultfs import FaultDisk

    from thinstore import Pool
    path = str(tmp_path / "pool")
    crashkit.new_pool(path)
    disk = FaultDisk(seed=keep)
    pool = Pool.open(path, commit_interval=0, fileio=disk.open)
    pool.create_volume("v", 64 << 10)
    gen = pool.md.generation
    meta = pool.md.meta_fio
    real_fsync, calls = meta.fsync, []

    def fsync():                      # the tree is synced; the superblock's own sync is lost
        calls.append(1)
        if len(calls) != 2:
            real_fsync()
    meta.fsync = fsync
    pool.create_volume("w", 64 << 10)
    crashkit._abandon(pool)
    (off, block), = meta.pending
    os.pwrite(meta._fd, block[:keep], off)
    meta.pending.clear()
    disk.power_cut()
    with Pool.open(path, commit_interval=0) as pool:
        assert pool.md.generation == gen and [d.name for d in pool.list()] == ["v"]


def test_soak_tool_runs_and_reports(tmp_path):
    """tools/crash_soak.py (the 500-kill run) works; here with a handful of rounds."""
    import subprocess
    import sys
    from pathlib import Path
    tool = Path(__file__).resolve().parent.parent / "tools" / "crash_soak.py"
    r = subprocess.run([sys.executable, str(tool), "--kills", "3", "--cuts", "5", "--json",
                        "--dir", str(tmp_path / "soak")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    import json
    rep = json.loads(r.stdout)
    assert rep["kills"] == 3 and rep["cut_rounds"] == 5 and not rep["failures"]
