"""A pool on a nearly full host file system (docs/integrity.md, "When the host file
system is full"): the intent log never takes the space the data needs, FLUSHes keep
succeeding (as full commits once the log is off) until the file system is really
full, the first failure is ENOSPC, nothing acknowledged before the last successful
FLUSH is lost, and `thinstore check` passes.

The integration tests mount a small ext4 of their own (mkfs.ext4 on a sparse file,
mounted with -o loop), so they need root and a free loop device; elsewhere they skip,
saying why. The first test runs anywhere (and on the pure-Python twins): it tells the
log the file system is tightening, as the data filling it would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading

import pytest

from nbd_helpers import (ServeProcess, cli, need, need_libnbd_python, run, system_python,
                         wait_for)
from thinstore import Pool, logroom, synclog
from thinstore.errors import PoolFull

MiB = 1 << 20
BLOCK = 64 << 10


def block(i: int) -> bytes:
    """Block i's bytes (the NBD client script below makes the same)."""
    return hashlib.shake_128(i.to_bytes(8, "little")).digest(BLOCK)


def free_bytes(path: str) -> int:
    sv = os.statvfs(path)
    return sv.f_bavail * sv.f_frsize


def test_a_tightening_fs_turns_the_log_off_and_the_commit_gives_the_space_back(
        tmp_path, monkeypatch, caplog):
    """Flushed writes grow the log while the host file system is roomy; once it is
    tight (the free-space probe says 16 MiB), idle, the log gives back what lies past
    its records and a warning says why FLUSHes will be slower; the next flush is a
    full commit and the log's file is cut to nothing; once space is back, the
    next epoch logs again. Every flushed write reads back after a reopen."""
    free = {"bytes": 1 << 40}
    monkeypatch.setattr(logroom, "host_free", lambda fio: free["bytes"])
    path = str(tmp_path / "pool")
    Pool.create(path, 256 * MiB, commit_interval=0).close()
    log_path = os.path.join(path, synclog.LOG_NAME)
    with Pool.open(path, commit_interval=600) as pool:
        pool.create_volume("v", 64 * MiB)
        with pool.open_device("v") as dev:
            for i in range(64):                 # 4 MiB of records
                dev.pwrite(block(i), i * BLOCK)
                dev.flush()
            assert os.path.getsize(log_path) >= 4 * MiB
            assert pool.log_counters["commits_instead"] == 0
            tail = pool._log.tail
            free["bytes"] = 16 * MiB            # an eighth of 16 MiB + the log: < 8 MiB
            # idle, the timer gives back what lies past the records (zeros), then (the
            # log being off) commits, which cuts the rest
            wait_for(lambda: os.path.getsize(log_path) <= tail, 10, "the idle give-back")
            assert "intent log off: 16M free" in caplog.text    # the operator is told
            for i in range(64, 128):
                dev.pwrite(block(i), i * BLOCK)
                dev.flush()
            counts = pool.log_counters
            assert counts["commits_instead"] >= 1 and counts["trims"] == 2, counts
            assert counts["cap_now"] == 0 and os.path.getsize(log_path) == 0, counts
            free["bytes"] = 1 << 40             # space freed: the next epoch logs again
            pool.commit()
            records = pool.log_counters["records"]
            dev.pwrite(block(128), 128 * BLOCK)
            dev.flush()
            assert pool.log_counters["records"] == records + 1
            assert os.path.getsize(log_path) > 0
    with Pool.open(path) as pool, pool.open_device("v") as dev:
        for i in range(129):
            assert dev.pread(i * BLOCK, BLOCK) == block(i), i


def test_a_cut_at_every_io_call_while_the_log_is_cut_back(tmp_path, monkeypatch):
    """test_synclog's scripted workload through the power-cut double, with the host
    file system turning tight (1 MiB free) before its full commit: that commit cuts
    the log's file to nothing, and the flush after it is a full commit. Cut at every
    I/O call: `check` is clean and every write acknowledged before the last completed
    flush reads back."""
    import crashkit
    import test_synclog as ts
    from faultfs import FaultDisk

    state = {"free": 1 << 40}
    monkeypatch.setattr(logroom, "host_free", lambda fio: state["free"])

    def run_op(pool, seed, op):
        if op[0] >= 10:
            state["free"] = 1 * MiB
        ts_run_op(pool, seed, op)

    def roomy(fn):
        def call(*args, **kwargs):
            state["free"] = 1 << 40     # each round opens the pool on a roomy fs
            return fn(*args, **kwargs)
        return call

    ts_run_op = ts.run_op
    monkeypatch.setattr(ts, "run_op", run_op)
    monkeypatch.setattr(ts, "_run", roomy(ts._run))
    monkeypatch.setattr(ts, "_io_calls", roomy(ts._io_calls))
    template = str(tmp_path / "template")
    contents = ts._template(template)
    once = str(tmp_path / "once")
    shutil.copytree(template, once)
    pool = roomy(Pool.open)(once, commit_interval=0, fileio=FaultDisk(0).open)
    for op in ts.SCRIPT:
        run_op(pool, ts.SEED, op)
    counts = pool.log_counters
    crashkit._abandon(pool)
    assert counts["records"] >= 2 and counts["trims"] == 1, counts
    assert counts["commits_instead"] >= 1, counts
    failures, n = ts._cut_everywhere(tmp_path, contents, template)
    assert n > 30 and not failures, failures[:10]


@pytest.fixture
def tight_fs():
    """A fresh 96 MiB ext4 mounted on a short temp dir; unmounted afterwards."""
    need("mkfs.ext4", "mount", "umount", "losetup")
    if os.geteuid() != 0:
        pytest.skip("mounting a loop file system needs root")
    if subprocess.run(["losetup", "-f"], capture_output=True).returncode:
        pytest.skip("no free loop device")
    top = tempfile.mkdtemp(prefix="tslog", dir="/tmp")
    image, mnt = os.path.join(top, "fs.img"), os.path.join(top, "m")
    os.mkdir(mnt)
    with open(image, "wb") as f:
        f.truncate(96 * MiB)
    run(["mkfs.ext4", "-q", "-F", image])
    run(["mount", "-o", "loop", image, mnt])
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", mnt], capture_output=True).returncode:
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(top, ignore_errors=True)


def ballast(mnt: str, size: int) -> str:
    """A file of `size` bytes to delete later: the space a user frees."""
    path = os.path.join(mnt, "ballast")
    with open(path, "wb") as f:
        f.write(b"\xa5" * size)
        os.fsync(f.fileno())
    return path


def free_again(path: str) -> None:
    os.unlink(path)
    os.sync()       # ext4 reuses blocks freed by an unlink once its journal commits


def fill(mnt: str, leave: int = 0) -> None:
    """Fill the file system (as root: its reserved blocks too), then give `leave`
    bytes back."""
    with open(os.path.join(mnt, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\x5a" * MiB)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
        f.truncate(max(0, os.fstat(f.fileno()).st_size - leave))
    os.sync()


@pytest.mark.integration
def test_flushes_succeed_until_the_host_fs_is_full_and_nothing_is_lost(tight_fs):
    """Pool API: 64 KiB writes each FLUSHed until the file system is full. The log's
    file never passes an eighth of what was free and turns off as the data fills the
    file system; the data reaches nearly all of it (the log took nothing it needed);
    the first failure is ENOSPC; after space is freed, writes and flushes go on;
    every flushed write reads back after a reopen; `thinstore check` passes."""
    spare = ballast(tight_fs, 4 * MiB)
    path = os.path.join(tight_fs, "pool")
    Pool.create(path, 256 * MiB, commit_interval=0).close()
    free0 = free_bytes(tight_fs)
    bound = int(free0 * logroom.LOG_SHARE)
    log_path = os.path.join(path, synclog.LOG_NAME)
    largest = 0
    with Pool.open(path, commit_interval=600) as pool:
        pool.create_volume("v", 200 * MiB)
        with pool.open_device("v") as dev:
            n = 0
            with pytest.raises((OSError, PoolFull)) as full:
                while True:
                    dev.pwrite(block(n), n * BLOCK)
                    dev.flush()
                    n += 1
                    largest = max(largest, os.path.getsize(log_path))
                    assert largest <= bound, (largest, bound, n)
            assert full.value.errno == errno.ENOSPC, full.value
            counts = pool.log_counters
            assert counts["records"] > 0, "the log was never used: no test of its cap"
            assert counts["commits_instead"] > 0 and counts["cap_now"] == 0, counts
            assert 0 < largest <= bound, (largest, bound)
            assert os.path.getsize(log_path) == 0       # cut when it turned off
            assert n * BLOCK >= 0.8 * free0, (n * BLOCK, free0)
            free_again(spare)
            for k in range(n, n + 16):                  # the pool goes on
                dev.pwrite(block(k), k * BLOCK)
                dev.flush()
            n += 16
    with Pool.open(path) as pool, pool.open_device("v") as dev:
        for i in range(n):
            assert dev.pread(i * BLOCK, BLOCK) == block(i), i
    cli("--pool", path, "check")


@pytest.mark.integration
def test_a_growth_the_fs_refuses_makes_the_flush_a_commit(tight_fs, monkeypatch):
    """The free-space probe may be wrong (a quota, another writer): the file system
    refuses the log's growth. The flush still succeeds, as a full commit; the log's
    file keeps its size; the writes read back after a reopen."""
    monkeypatch.setattr(logroom, "host_free", lambda fio: 1 << 40)     # "plenty"
    path = os.path.join(tight_fs, "pool")
    Pool.create(path, 256 * MiB, commit_interval=0).close()
    log_path = os.path.join(path, synclog.LOG_NAME)
    n = 128                                     # 8 MiB: the record needs 10 MiB of log
    with Pool.open(path, commit_interval=600) as pool:
        pool.create_volume("v", 64 * MiB)
        with pool.open_device("v") as dev:
            for i in range(n):
                dev.pwrite(block(i), i * BLOCK)
            size = os.path.getsize(log_path)
            fill(tight_fs, leave=256 << 10)     # room for a commit, not for the log
            dev.flush()
            counts = pool.log_counters
            assert counts["grow_failures"] == 1 and counts["commits_instead"] == 1, counts
            assert os.path.getsize(log_path) == size
            assert pool._log.extent == size
    with Pool.open(path) as pool, pool.open_device("v") as dev:
        for i in range(n):
            assert dev.pread(i * BLOCK, BLOCK) == block(i), i
    cli("--pool", path, "check")


@pytest.mark.integration
def test_an_idle_pool_gives_the_logs_room_back_when_another_writer_fills_the_fs(tight_fs):
    """Another writer fills the file system while the pool is idle: the log gives its
    file back without waiting for a write (the writeback timer looks at the free
    space: the zeros past the records at once, then, the log being off, it commits
    and the rest goes), and the file system's free space grows by that much. Every
    flushed write reads back; `check` passes."""
    path = os.path.join(tight_fs, "pool")
    Pool.create(path, 256 * MiB, commit_interval=0).close()
    log_path = os.path.join(path, synclog.LOG_NAME)
    with Pool.open(path, commit_interval=600) as pool:
        pool.create_volume("v", 64 * MiB)
        with pool.open_device("v") as dev:
            for i in range(64):                 # 4 MiB of records, the file ahead of them
                dev.pwrite(block(i), i * BLOCK)
                dev.flush()
            grown = os.path.getsize(log_path)
            assert grown >= 6 * MiB
            # another writer takes what is free, at once (one fallocate)
            with open(os.path.join(tight_fs, "filler"), "wb") as f:
                os.posix_fallocate(f.fileno(), 0, free_bytes(tight_fs))
            full = free_bytes(tight_fs)
            wait_for(lambda: os.path.getsize(log_path) == 0, 10,
                     "the log to give its room back")
            back = free_bytes(tight_fs) - full
            assert back >= grown - MiB, (back, grown)   # the commit's metadata aside
            free_again(os.path.join(tight_fs, "filler"))
            for i in range(64, 80):
                dev.pwrite(block(i), i * BLOCK)
                dev.flush()
    with Pool.open(path) as pool, pool.open_device("v") as dev:
        for i in range(80):
            assert dev.pread(i * BLOCK, BLOCK) == block(i), i
    cli("--pool", path, "check")


CLIENT = r"""
import hashlib, json, sys
import nbd
uri, start, stop, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
BLOCK = 64 << 10
h = nbd.NBD()
h.connect_uri(uri)
out = {"flushed": start, "written": start, "errno": None, "error": None}
try:
    for i in range(start, stop):
        h.pwrite(hashlib.shake_128(i.to_bytes(8, "little")).digest(BLOCK), i * BLOCK)
        out["written"] = i + 1
        if (i + 1 - start) % every == 0:
            h.flush()
            out["flushed"] = i + 1
except nbd.Error as e:
    out["errno"], out["error"] = e.errno, e.string
print(json.dumps(out))
"""


@pytest.mark.integration
def test_nbd_writes_until_full_then_kill_9(tight_fs):
    """Through `thinstore serve` and libnbd: writes with a FLUSH every 4 until the file
    system is full. The first failure is ENOSPC; the log's file stays under an eighth
    of what was free; a `thinstore snapshot` on the full file system succeeds or says
    which file system is full; after the ballast is deleted a snapshot succeeds and
    the same server takes writes and FLUSHes again; after
    SIGKILL every write acknowledged before the last successful FLUSH reads back and
    `thinstore check` passes."""
    need_libnbd_python()
    # 8 MiB: the data file's allocator sets 4 MiB aside (fallocate) at its next chunk
    spare = ballast(tight_fs, 8 * MiB)
    path = os.path.join(tight_fs, "pool")
    cli("--pool", path, "init", "--capacity", "256M")
    cli("--pool", path, "create", "v", "--size", "200M")
    free0 = free_bytes(tight_fs)
    log_path = os.path.join(path, synclog.LOG_NAME)
    sizes, done = [], threading.Event()

    def watch() -> None:
        while not done.wait(0.005):
            sizes.append(os.path.getsize(log_path))

    watcher = threading.Thread(target=watch)
    serve = ServeProcess(path)
    try:
        uri = f"nbd+unix:///v?socket={os.path.join(path, 'nbd.sock')}"
        watcher.start()
        first = json.loads(system_python(CLIENT, uri, "0", "3200", "4",
                                         timeout=120).stdout)
        assert first["errno"] == "ENOSPC", first     # libnbd names the errno
        assert "No space left" in (first["error"] or ""), first
        assert first["flushed"] * BLOCK >= 0.75 * free0, (first, free0)
        # on the file system full to the last block a snapshot's commit may find no
        # block for its metadata: then it says so
        snap = cli("--pool", path, "snapshot", "v@full", check=False)
        assert snap.returncode == 0 or "no space left on the file system that holds " \
            f"pool {path}" in snap.stderr, snap.stderr
        free_again(spare)
        # with a few MiB free (the log took none of it) it succeeds (session 9's case)
        cli("--pool", path, "snapshot", "v@tight")
        more = first["written"] + 32
        after = json.loads(system_python(CLIENT, uri, str(first["written"]), str(more),
                                         "4").stdout)
        assert after["errno"] is None and after["flushed"] == more, after
        done.set()
        watcher.join()
        assert sizes and max(sizes) <= free0 * logroom.LOG_SHARE, (max(sizes), free0)
    finally:
        done.set()
        serve.stop(signal.SIGKILL)
    with Pool.open(path) as pool, pool.open_device("v") as dev:
        flushed = list(range(first["flushed"])) + list(range(first["written"], more))
        for i in flushed:
            assert dev.pread(i * BLOCK, BLOCK) == block(i), i
    cli("--pool", path, "check")


def test_after_a_failed_commit_a_flush_is_a_commit_not_a_record(tmp_path):
    """A management operation whose commit fails (here: ENOSPC for its metadata)
    leaves a device in memory that the committed tree lacks; replay stops at a record
    naming it, losing the records after it. So until a commit succeeds, a FLUSH makes
    no record: it is a full commit, and fails as long as that does; then records again."""
    path = str(tmp_path / "p")
    Pool.create(path, 16 << 20, 4096, commit_interval=0).close()
    with Pool.open(path, commit_interval=0) as pool:
        pool.create_volume("v", 1 << 20)
        real = pool.md.commit

        def full(*args, **kw):
            raise OSError(errno.ENOSPC, "No space left on device")

        with pool.open_device("v") as dev:
            dev.pwrite(b"a" * 4096, 0)
            pool.flush()
            assert pool.log_counters["records"] == 1
            pool.md.commit = full
            with pytest.raises(OSError):
                pool.create_volume("y", 1 << 20)
            assert pool.log_counters["cap_now"] == 0
            dev.pwrite(b"b" * 4096, 4096)
            with pytest.raises(OSError):
                pool.flush()              # no record to pretend with: the commit fails
            assert pool.log_counters["records"] == 1
            pool.md.commit = real
            pool.flush()                  # the commit succeeds: y and b are on disk
            assert pool.log_counters["cap_now"] > 0
            dev.pwrite(b"c" * 4096, 8192)
            pool.flush()
            assert pool.log_counters["records"] == 2      # records again
    with Pool.open(path, commit_interval=0) as pool:
        assert "y" in [d.name for d in pool.list()]
        with pool.open_device("v") as dev:
            assert dev.pread(0, 3 * 4096) == b"a" * 4096 + b"b" * 4096 + b"c" * 4096
