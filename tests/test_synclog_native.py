"""The intent log's native half (_native/intentlog.c): records built in C, and the writer.

- ts_mmh3 and ts_log_record agree with their twins (the mmh3 package, and
  format.finish_log_record fed by the Python gathering), byte for byte, on records
  with several devices, zero ranges and unaligned ends;
- the writer (native.LogSyncer), in both of its modes (Linux AIO and the writer
  thread): a wait returns once the records up to its ticket are in the file, from any
  number of threads; a failed write fails its waiter and the next wait tries again; a
  discard (the full commit) lets every wait through; after stop() waits fail cleanly;
- a pool whose flushed writes went only through the writer finds them again when it is
  reopened without having been closed (the records were on disk, the tree was not).

Power cuts at every I/O call of the log are tests/test_synclog.py's (the power-cut
double has no descriptor, so it runs the synchronous path; tools/crash_soak.py kills
real servers that use this one).
"""

from __future__ import annotations

import os
import random
import threading

import crashkit
import mmh3
import pytest

from thinstore import Pool
from thinstore import format as fmt
from thinstore import native, synclog

pytestmark = pytest.mark.skipif(native.BACKEND != "native",
                                reason="the native backend is not in use")

MODES = ["aio", "thread"]


@pytest.fixture(params=MODES)
def mode(request, monkeypatch):
    monkeypatch.setenv("THINSTORE_LOG_THREAD", "1" if request.param == "thread" else "0")
    return request.param


def test_mmh3_agrees_with_the_package():
    rng = random.Random(3)
    for n in list(range(0, 70)) + [511, 4096, 4607, 65536 + 3]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        for seed in (0, 1, 0xDEADBEEF):
            assert native.lib.ts_mmh3(native.ffi.from_buffer(data), n, seed) == \
                mmh3.hash(data, seed, signed=False), (n, seed)


def _pool_with_notes(tmp_path):
    """A pool with two devices written in several places (one range all zeros,
    unaligned edges, a range across two chunks), the writes noted and not flushed."""
    path = str(tmp_path / "pool")
    pool = Pool.create(path, 64 << 20, 4096, commit_interval=0)
    pool.create_volume("a", 4 << 20)
    pool.create_volume("b", 4 << 20)
    rng = random.Random(5)
    with pool.open_device("a") as a, pool.open_device("b") as b:
        a.pwrite(bytes(rng.getrandbits(8) for _ in range(5000)), 1234)
        a.pwrite(bytes(8192), 65536)                     # reads as zeros: a ZERO entry
        b.pwrite(b"q" * 777, 3 << 20)
        a.pwrite(bytes(rng.getrandbits(8) for _ in range(300)), (1 << 20) - 100)
        b.pwrite(b"z" * 4096, 0)
    return pool


def test_native_records_are_byte_for_byte_the_python_ones(tmp_path, monkeypatch):
    pool = _pool_with_notes(tmp_path)
    slog = pool._log
    with pool.lock.shared:
        native_rec, n1 = slog.capture(pool)
        native_rec = bytes(native_rec)
        monkeypatch.setattr(synclog, "_build", lambda *a: None)     # the twin's way
        python_rec, n2 = slog.capture(pool)
        python_rec = bytes(python_rec)
    assert n1 == n2 == 5
    assert native_rec == python_rec
    entries = fmt.unpack_log_record(native_rec)
    assert [e.kind for e in entries].count(fmt.LOG_ZERO) == 1
    assert len(entries) == 5
    pool.close()


def _syncer(tmp_path, dio=True, name="log"):
    path = str(tmp_path / name)
    with open(path, "wb") as f:
        f.write(bytes(1 << 20))
    fd = os.open(path, os.O_RDWR)
    dio_fd = os.open(path, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC) if dio else -1
    return path, fd, dio_fd, native.LogSyncer(fd, dio_fd)


def _record(i: int, size: int = 1024) -> bytes:
    return bytes([i % 251 + 1]) * size


@pytest.mark.parametrize("dio", [True, False], ids=["direct", "buffered"])
def test_a_wait_returns_once_the_records_are_in_the_file(tmp_path, mode, dio):
    path, fd, dio_fd, s = _syncer(tmp_path, dio)
    try:
        off = ticket = 0
        for i in range(20):
            rec = _record(i, 512 * (1 + i % 3))
            ticket += len(rec)
            s.append(rec, off, ticket)
            off += len(rec)
            if i % 4 == 3:
                assert s.wait(ticket) >= ticket
        assert s.wait(ticket) >= ticket
        with open(path, "rb") as f:
            data = f.read(off)
        expect = b"".join(_record(i, 512 * (1 + i % 3)) for i in range(20))
        assert data == expect
        done, ok, _, direct = s.stats()
        assert done >= ticket and ok >= 1
        assert (direct > 0) == dio
    finally:
        s.stop()
        os.close(fd)
        if dio_fd >= 0:
            os.close(dio_fd)


def test_waiters_on_many_threads_each_see_their_own_record(tmp_path, mode):
    """Group commit: appends are serialised (as synclog's mutex does), waits are not;
    every waiter returns only once its record is in the file."""
    path, fd, dio_fd, s = _syncer(tmp_path)
    lock = threading.Lock()
    state = {"off": 0, "ticket": 0}
    failures = []

    def worker(k):
        for i in range(40):
            rec = _record(k * 40 + i, 512)
            with lock:
                off = state["off"]
                state["off"] += 512
                state["ticket"] += 512
                ticket = state["ticket"]
                s.append(rec, off, ticket)
            s.wait(ticket)
            with open(path, "rb") as f:
                f.seek(off)
                if f.read(512) != rec:
                    failures.append((k, i))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s.stop()
    os.close(fd)
    os.close(dio_fd)
    assert not failures


def test_a_failed_write_fails_its_waiter_and_is_tried_again(tmp_path, mode):
    """Writes to a descriptor that refuses them: the waiter gets the errno, every
    later wait tries again (and fails again here), nothing hangs; stop() then makes
    waits fail with EBADF."""
    path = str(tmp_path / "log")
    with open(path, "wb") as f:
        f.write(bytes(1 << 16))
    ro = os.open(path, os.O_RDONLY)
    ro_direct = os.open(path, os.O_RDONLY | os.O_DIRECT)
    s = native.LogSyncer(ro, ro_direct)
    s.append(_record(1, 512), 0, 512)
    for _ in range(2):
        with pytest.raises(OSError) as e:
            s.wait(512)
        assert e.value.errno == 9        # EBADF: not open for writing
    s.discard(512)                       # a full commit made it durable another way
    assert s.wait(512) >= 512
    s.stop()
    with pytest.raises(OSError) as e:
        s.wait(1024)
    assert e.value.errno == 9
    os.close(ro)
    os.close(ro_direct)


def test_flushed_writes_come_back_from_the_writer_after_a_crash(tmp_path, mode):
    """Flushes through the native writer, then the process 'dies' (no close, no
    commit): the reopened pool replays the records and has every flushed byte."""
    path = str(tmp_path / "pool")
    Pool.create(path, 1 << 30, commit_interval=0).close()
    pool = Pool.open(path, commit_interval=0)
    pool.create_volume("v", 64 << 20)
    pool.commit()
    rng = random.Random(9)
    written = {}
    with pool.open_device("v") as dev:
        for i in range(30):
            off = rng.randrange(0, (64 << 20) - 8192, 512)
            data = bytes([i + 1]) * rng.choice((512, 4096, 5000))
            dev.pwrite(data, off)
            written[off] = data
            if i % 3 == 2:
                dev.flush()
        dev.flush()
        assert dev.flush(wait=False)     # nothing new: started is still True
    assert pool._log._syncer is not None
    gen = pool.md.generation
    crashkit._abandon(pool)
    with Pool.open(path, commit_interval=0) as again, again.open_device("v") as dev:
        assert again.md.generation == gen + 1      # the replay was folded in
        expect = {}
        for off, data in written.items():          # later writes win where they overlap
            expect.update({off + k: data[k:k + 1] for k in range(len(data))})
        for off in sorted(written):
            data = written[off]
            got = dev.pread(off, len(data))
            assert got == b"".join(expect[off + k] for k in range(len(data)))


@pytest.fixture
def sector_4k_fs(tmp_path):
    """An ext4 file system on a loop device with 4 KiB logical sectors: it opens
    O_DIRECT but refuses the 512-byte aligned direct writes records are made of."""
    import shutil
    import subprocess
    if os.geteuid() != 0:
        pytest.skip("a loop device and a mount need root")
    for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    img, mnt = str(tmp_path / "4k.img"), tmp_path / "mnt"
    mnt.mkdir()
    with open(img, "wb") as f:
        f.truncate(128 << 20)
    made = subprocess.run(["losetup", "-f", "--show", "-b", "4096", img],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"no loop device: {made.stderr.strip()}")
    loop = made.stdout.strip()
    try:
        subprocess.run(["mkfs.ext4", "-q", "-F", loop], check=True)
        subprocess.run(["mount", loop, str(mnt)], check=True)
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(mnt)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def _release_files(pool) -> None:
    """Close what an abandoned pool still holds open (the file system is unmounted
    after the test)."""
    pool._log.close()
    for f in (pool.md.data_fio, pool.md.meta_fio, pool._sums and pool._sums.intent.fio):
        if f is not None:
            f.close()
    pool.store.close()


def test_a_disk_with_4k_sectors_still_makes_flushes_durable(sector_4k_fs, mode):
    """The pool's log there is written by the writer without direct I/O; and a writer
    given a direct descriptor anyway (whose AIO writes fail only in their completion)
    falls back to buffered writes and fdatasync instead of failing every FLUSH."""
    path = str(sector_4k_fs / "pool")
    Pool.create(path, 64 << 20, commit_interval=0).close()
    pool = Pool.open(path, commit_interval=0)
    pool.create_volume("v", 8 << 20)
    with pool.open_device("v") as dev:
        dev.pwrite(b"d" * 4096, 0)
        dev.flush()
        dev.pwrite(b"e" * 4096, 8192)
        dev.pwrite(b"f" * 100, 20000)
        dev.flush()
    assert pool._log._dio_fd == -1
    crashkit._abandon(pool)
    _release_files(pool)
    with Pool.open(path, commit_interval=0) as again, again.open_device("v") as dev:
        assert dev.pread(0, 4096) == b"d" * 4096
        assert dev.pread(8192, 4096) == b"e" * 4096
        assert dev.pread(20000, 100) == b"f" * 100

    log = str(sector_4k_fs / "raw-log")
    with open(log, "wb") as f:
        f.write(bytes(1 << 20))
    fd = os.open(log, os.O_RDWR)
    dio_fd = os.open(log, os.O_WRONLY | os.O_DIRECT | os.O_DSYNC)
    s = native.LogSyncer(fd, dio_fd)
    try:
        for i in range(4):
            s.append(_record(i, 512), i * 512, (i + 1) * 512)
            assert s.wait((i + 1) * 512) >= (i + 1) * 512
        with open(log, "rb") as f:
            assert f.read(2048) == b"".join(_record(i, 512) for i in range(4))
    finally:
        s.stop()
        os.close(fd)
        os.close(dio_fd)
