"""The intent log: a flush is durable without a commit, and survives a power cut anywhere.

A scripted workload (copy on write in a clone, a first write into a hole, overwrites,
discards, flushes, a full commit that folds the log, unflushed writes at the end) is
cut at EVERY I/O call it makes through the power-cut double: before, inside and after
each log append, inside the fold. A pool left with records to replay is then cut at
every I/O call of its reopen (the replay and the fold). Each time, `check` must be
clean and every byte acknowledged before the last completed flush must read back
(tests/workload.py's model). Negative control: a log whose appends are acknowledged
without their fdatasync loses flushed writes under the same cuts.
"""

from __future__ import annotations

import os
import shutil

import crashkit
import pytest
from faultfs import FaultDisk, PowerCut
from workload import Model, run_op, snapshot_contents

from thinstore import Pool
from thinstore import format as fmt
from thinstore import synclog
from thinstore.check import check_path

SEED = 7
SIZE = 96 << 10


def _template(path: str) -> dict:
    """A pool with volume v (half written), v@s and clone c of it, all committed."""
    Pool.create(path, 4 << 20, 4096, commit_interval=0).close()
    with Pool.open(path, commit_interval=0) as pool:
        pool.create_volume("v", SIZE)
        with pool.open_device("v") as dev:
            dev.pwrite(os.urandom(SIZE // 2), 0)
        pool.snapshot("v@s")
        pool.clone("v@s", "c")
        return snapshot_contents(pool)


# (index, op): run_op makes flush index % 4 == 0 a full commit, else Pool.flush
SCRIPT = [
    (1, ("write", "v", 100, 5000)),          # copy on write: v's chunks are shared with v@s
    (2, ("write", "c", 8192, 9000)),          # copy on write in the clone
    (3, ("write", "v", 60000, 3000)),         # a first write into a hole
    (5, ("flush",)),
    (6, ("write", "c", 8300, 60)),            # in place, into a chunk of this transaction
    (7, ("discard", "v", 0, 12288)),
    (9, ("flush",)),
    (10, ("write", "v", 40000, 4096)),
    (12, ("flush",)),                         # the full commit: folds the log
    (13, ("write", "c", 0, 20000)),
    (14, ("write", "v", 90000, 3000)),
    (15, ("flush",)),
    (17, ("write", "v", 1000, 7000)),          # never flushed
    (18, ("write", "c", 50000, 4096)),
]


def _run(path: str, disk: FaultDisk, model: Model):
    """Run SCRIPT through `disk` until it ends or the power is cut; returns the op in
    progress at the cut (None when none was)."""
    pool = Pool.open(path, commit_interval=0, fileio=disk.open)
    op = None
    try:
        for op in SCRIPT:
            run_op(pool, SEED, op)
            model.apply(SEED, op)
        op = None
    except PowerCut:
        pass
    finally:
        crashkit._abandon(pool)
    disk.power_cut()
    return op


def _io_calls(template: str, tmp) -> int:
    work = str(tmp / "count")
    shutil.copytree(template, work)
    disk = FaultDisk(0)
    pool = Pool.open(work, commit_interval=0, fileio=disk.open)
    for op in SCRIPT:
        run_op(pool, SEED, op)
    crashkit._abandon(pool)
    return disk.ops


def _cut_everywhere(tmp_path, contents, template):
    failures, n = [], _io_calls(template, tmp_path)
    for k in range(1, n + 1):
        work = str(tmp_path / f"k{k}")
        shutil.copytree(template, work)
        model = Model(contents)
        in_progress = _run(work, FaultDisk(k, crash_after=k), model)
        failures += [f"cut at I/O {k}: {e}" for e in crashkit.verify(work, model, in_progress)]
        shutil.rmtree(work)
    return failures, n


def test_a_cut_at_every_io_call_keeps_every_flushed_write(tmp_path):
    template = str(tmp_path / "template")
    contents = _template(template)
    failures, n = _cut_everywhere(tmp_path, contents, template)
    assert n > 30                       # the script does go through appends and a fold
    assert not failures, failures[:10]


def test_a_cut_at_every_io_call_of_the_replay_and_fold(tmp_path):
    template = str(tmp_path / "template")
    contents = _template(template)
    disk = FaultDisk(1)
    disk.rng.random = lambda: 0.1        # the cut drops every unsynced write
    model = Model(contents)
    assert _run(template, disk, model) is None
    probe = str(tmp_path / "probe")
    shutil.copytree(template, probe)
    disk = FaultDisk(2)
    with Pool.open(probe, commit_interval=0, fileio=disk.open) as pool:
        assert pool._log.counters["replayed"] == 1       # the record of the last flush
    n = disk.ops
    failures = []
    for k in range(1, n + 1):
        work = str(tmp_path / f"r{k}")
        shutil.copytree(template, work)
        disk = FaultDisk(k, crash_after=k)
        try:
            crashkit._abandon(Pool.open(work, commit_interval=0, fileio=disk.open))
        except PowerCut:
            pass
        disk.power_cut()
        failures += [f"cut at reopen I/O {k}: {e}" for e in crashkit.verify(work, model, None)]
        shutil.rmtree(work)
    assert n >= 5 and not failures, failures[:10]


def test_unsynced_log_appends_are_caught(tmp_path, monkeypatch):
    """Negative control: acknowledging a flush before its record is durable loses data
    under the same cuts, so the fdatasync, not luck, is what keeps flushed writes."""
    template = str(tmp_path / "template")
    contents = _template(template)
    monkeypatch.setattr(synclog.SyncLog, "sync", lambda self, ticket: None)
    failures, _ = _cut_everywhere(tmp_path, contents, template)
    assert failures, "no cut noticed flushes acknowledged before their record was durable"


def test_flush_writes_one_record_and_syncs_only_the_log(tmp_path):
    """On a pool of 64 GiB capacity: the write's data and the metadata stay unsynced,
    the generation does not move, and the log holds one record; a close then folds it."""
    path = str(tmp_path / "pool")
    Pool.create(path, 64 << 30, commit_interval=0).close()
    disk = FaultDisk(3)
    pool = Pool.open(path, commit_interval=0, fileio=disk.open)
    pool.create_volume("v", 1 << 30)
    gen = pool.md.generation
    with pool.open_device("v") as dev:
        dev.pwrite(b"x" * 4096, 123 << 20)
        dev.flush()
        files = {os.path.basename(f.path): f for f in disk.files}
        assert files["data"].pending and not files["meta"].pending
        assert not files["log"].pending
        assert pool.md.generation == gen and pool._log.counters["records"] == 1
        dev.flush()                            # nothing new: no second record
        assert pool._log.counters["records"] == 1
    disk.rng.random = lambda: 0.1              # the power fails: unsynced writes are lost
    crashkit._abandon(pool)
    disk.power_cut()
    report = check_path(path)                   # the committed tree lacks the write...
    assert report.clean and report.info["log_records"] == 1    # ...the log has it
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        assert dev.pread(123 << 20, 4096) == b"x" * 4096
        assert pool.md.generation == gen + 1  # the replay was folded in by one commit


def test_the_log_is_written_ahead_of_its_tail(tmp_path):
    """Every record lands in blocks written (as zeros) at least two growth steps
    before it: the file never needs a block allocated at a FLUSH (synclog.SyncLog._grow)."""
    path = str(tmp_path / "pool")
    with Pool.create(path, 1 << 30, commit_interval=0) as pool:
        pool.create_volume("v", 64 << 20)
        log_path = os.path.join(path, synclog.LOG_NAME)
        data = os.urandom(800 * 4096)
        with pool.open_device("v") as dev:
            for i in range(800):                # ~3.6 MiB of records: the log grows 4 times
                dev.pwrite(data[i * 4096:(i + 1) * 4096], i * 4096)
                dev.flush()
                size = os.path.getsize(log_path)
                assert size % synclog.GROW_STEP == 0
                assert size >= pool._log.tail + 2 * synclog.GROW_STEP
        assert pool._log.counters["records"] == 800
    with Pool.open(path) as pool, pool.open_device("v") as dev:
        assert dev.pread(0, len(data)) == data


def _record(base, seq, data=b"abc"):
    return fmt.pack_log_record(base, seq, [fmt.LogEntry(1, 0, len(data), fmt.LOG_DATA, data)])


def test_records_apply_only_in_sequence_on_their_base():
    base = fmt.LogBase(5, 123, b"u" * 16)
    rec = _record(base, 0)
    assert len(rec) % fmt.LOG_ALIGN == 0
    assert fmt.log_record_length(rec, base, 0) == len(rec)
    assert fmt.unpack_log_record(rec)[0].data == b"abc"
    assert fmt.log_record_length(rec, base, 1) == 0                     # out of sequence
    assert fmt.log_record_length(rec, base._replace(generation=6), 0) == 0   # older epoch
    assert fmt.log_record_length(rec, base._replace(commit_time_ns=1), 0) == 0
    torn = bytearray(rec)
    torn[fmt.LOG_HEADER.size + fmt.LOG_ENTRY.size] ^= 1
    assert fmt.unpack_log_record(bytes(torn)) is None                     # checksum


@pytest.mark.parametrize("keep", [0, 100, 700])
def test_a_torn_record_ends_the_replay(tmp_path, keep):
    """A record cut short (only its first `keep` bytes reached the disk) is not
    applied, and neither is anything after it; the records before it are."""
    path = str(tmp_path / "pool")
    Pool.create(path, 4 << 20, 4096, commit_interval=0).close()
    pool = Pool.open(path, commit_interval=0)
    pool.create_volume("v", SIZE)
    with pool.open_device("v") as dev:
        dev.pwrite(b"1" * 4096, 0)
        dev.flush()
        first_end = pool._log.tail
        dev.pwrite(b"2" * 4096, 0)
        dev.flush()
        second_end = pool._log.tail
    crashkit._abandon(pool)
    with open(os.path.join(path, "log"), "r+b") as f:
        f.seek(first_end + keep)
        f.write(bytes(second_end - first_end - keep))
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        assert pool._log.counters["replayed"] == 1
        assert dev.pread(0, 4096) == b"1" * 4096


def test_fua_goes_through_the_log_and_a_batch_too_large_commits(tmp_path, monkeypatch):
    """A FUA write is one log record (no new generation); a flush whose batch is past
    MAX_BATCH is a full commit instead, and both read back after a power cut."""
    path = str(tmp_path / "pool")
    Pool.create(path, 4 << 20, 4096, commit_interval=0).close()
    disk = FaultDisk(4)
    pool = Pool.open(path, commit_interval=0, fileio=disk.open)
    pool.create_volume("v", SIZE)
    gen = pool.md.generation
    with pool.open_device("v") as dev:
        dev.pwrite(b"f" * 4096, 8192, fua=True)
        assert pool.md.generation == gen and pool._log.counters["records"] == 1
        monkeypatch.setattr(synclog, "MAX_BATCH", 8192)
        dev.pwrite(b"g" * 12288, 40960)
        dev.flush()
        assert pool.md.generation == gen + 1 and pool._log.counters["commits_instead"] == 1
        dev.pwrite(b"h" * 100, 0, fua=True)      # the first record of the new epoch
    disk.rng.random = lambda: 0.1
    crashkit._abandon(pool)
    disk.power_cut()
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        assert pool._log.counters["replayed"] == 1
        assert dev.pread(8192, 4096) == b"f" * 4096
        assert dev.pread(40960, 12288) == b"g" * 12288
        assert dev.pread(0, 100) == b"h" * 100
