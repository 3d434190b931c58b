"""Reads run side by side under the pool's shared lock; writes run alone.

What a user would notice if this broke: a read racing a write returning bytes torn
between two writes, or another device's bytes, or a hang. Correctness only, no
timing: every wait has a generous bound and exists only to turn a deadlock into a
failure.
"""

from __future__ import annotations

import hashlib
import struct
import threading

import numpy as np
import pytest

from thinstore import Pool
from thinstore.check import check_pool
from thinstore.rwlock import RWLock

MiB = 1 << 20
CS = 64 << 10
CHUNKS = 32
TAG = struct.Struct("<IIQ")     # device, chunk, generation: repeated over a whole chunk
WAIT = 60


def _chunk(dev: int, chunk: int, gen: int) -> bytes:
    return TAG.pack(dev, chunk, gen) * (CS // TAG.size)


def _check_piece(piece: bytes, dev: int, chunk: int, issued: list) -> None:
    """A piece of one chunk: one tag throughout, this device's and chunk's, and a
    generation the writer has started to write."""
    tags = set(np.frombuffer(piece, dtype=np.dtype([("d", "<u4"), ("c", "<u4"),
                                                    ("g", "<u8")])).tolist())
    assert len(tags) == 1, f"chunk {chunk} of device {dev} torn: {sorted(tags)[:4]}"
    (d, c, g), = tags
    assert (d, c) == (dev, chunk), f"read device {dev} chunk {chunk}, got device {d} chunk {c}"
    assert g <= issued[chunk], f"chunk {chunk}: generation {g} never written"


def _reader(pool: Pool, name: str, dev_id: int, issued: list, stop: threading.Event,
            errors: list, seed: int) -> None:
    rng = np.random.default_rng(seed)
    try:
        with pool.open_device(name) as dev:
            for _ in range(3000):                # bounded, and ends early with the writer
                if stop.is_set():
                    break
                first = int(rng.integers(0, CHUNKS - 3))
                n = int(rng.integers(1, 4))
                buf = dev.pread(first * CS, n * CS)
                for i in range(n):
                    _check_piece(buf[i * CS:(i + 1) * CS], dev_id, first + i, issued)
    except BaseException as e:               # handed to the main thread
        errors.append(e)


def _writer(pool: Pool, issued: list, errors: list) -> None:
    """Whole-chunk writes of new generations to volume a. Every few writes a snapshot
    comes and goes and the pool commits, so chunks are copied on write, freed and
    punched, and freed chunks reused: a read that outlived its translation would
    see zeros or some other chunk's tag."""
    rng = np.random.default_rng(99)
    try:
        with pool.open_device("a") as dev:
            for step in range(600):
                if step % 8 == 0:
                    pool.snapshot("a@s")
                c = int(rng.integers(0, CHUNKS))
                issued[c] += 1
                dev.pwrite(_chunk(1, c, issued[c]), c * CS, fua=step % 3 == 0)
                if step % 8 == 7:
                    pool.destroy("a@s")
                    dev.flush()
    except BaseException as e:
        errors.append(e)


@pytest.fixture
def two_volumes(tmp_path):
    pool = Pool.create(str(tmp_path / "pool"), 64 * MiB, CS, commit_interval=0.05)
    for dev_id, name in ((1, "a"), (2, "b")):
        pool.create_volume(name, CHUNKS * CS)
        with pool.open_device(name) as dev:
            for c in range(CHUNKS):
                dev.pwrite(_chunk(dev_id, c, 0), c * CS)
    pool.commit()
    yield pool
    pool.close()


def test_reads_beside_a_writer_are_never_torn(two_volumes):
    pool = two_volumes
    issued = [0] * CHUNKS
    errors: list = []
    stop = threading.Event()
    readers = [threading.Thread(target=_reader, args=(pool, name, dev_id, issued, stop,
                                                      errors, seed))
               for seed, (name, dev_id) in enumerate([("a", 1), ("a", 1), ("a", 1), ("b", 2)])]
    writer = threading.Thread(target=_writer, args=(pool, issued, errors))
    for t in readers + [writer]:
        t.start()
    writer.join(WAIT)
    stop.set()
    for t in readers:
        t.join(WAIT)
    assert not writer.is_alive() and not any(t.is_alive() for t in readers), "deadlock"
    if errors:
        raise errors[0]
    with pool.open_device("a") as dev:        # and the end state is the last generation
        for c in range(CHUNKS):
            assert dev.pread(c * CS, CS) == _chunk(1, c, issued[c])


# ---- small writes from many threads beside snapshots and commits --------------

BLOCK = 4096
BLOCKS = CHUNKS * CS // BLOCK
WRITERS = 3
SEQS = 3000                             # writes per writer
SNAPSHOTS = 60                          # taken at most, all kept to the end
STAMP = struct.Struct("<IIQ")           # writer, block, sequence number


def _block(writer: int, block: int, seq: int) -> bytes:
    return STAMP.pack(writer, block, seq) * (BLOCK // STAMP.size)


def _stamps(image: bytes) -> np.ndarray:
    """(writer, block, seq) of every block of a device image; a torn block fails."""
    a = np.frombuffer(image, np.dtype([("w", "<u4"), ("b", "<u4"), ("s", "<u8")]))
    a = a.reshape(BLOCKS, BLOCK // STAMP.size)
    assert (a == a[:, :1]).all(), "a block holds two writes"
    return a[:, 0]


def _expected(log: list, upto: int, owner: int) -> dict:
    """Block -> sequence number after writer `owner`'s first `upto` writes."""
    out = {b: 0 for b in range(owner, BLOCKS, WRITERS)}
    for seq, b in log[:upto]:
        out[b] = seq
    return out


def test_small_writes_beside_snapshots_land_whole_and_in_order(tmp_path):
    """Several threads write 4 KiB blocks of one volume (interleaved, so they copy the
    same shared chunks on write) while another takes snapshots, commits and reads
    them. Every snapshot must hold, for each writer, exactly the result of some
    prefix of its writes: a write is in a snapshot whole or not at all, and never
    after a later write of the same thread is; and it must read the same at the
    end as when it was taken. With the native backend these writes
    take the lane (no pool lock), so this is the lane's gate under test."""
    # thin: room for every snapshot's copies on write (at most SNAPSHOTS x 32 chunks)
    pool = Pool.create(str(tmp_path / "pool"), 1024 * MiB, CS, commit_interval=0.02)
    pool.create_volume("v", CHUNKS * CS)
    with pool.open_device("v") as dev:
        for b in range(BLOCKS):
            dev.pwrite(_block(b % WRITERS, b, 0), b * BLOCK)
    pool.commit()
    logs: list[list] = [[] for _ in range(WRITERS)]
    images: list[tuple] = []         # (stamps, digest) of each snapshot when taken, then of v
    errors: list = []
    done = threading.Event()

    def seen(image: bytes) -> tuple:
        return _stamps(image).copy(), hashlib.sha256(image).digest()

    def writer(w: int) -> None:
        rng = np.random.default_rng(w)
        try:
            with pool.open_device("v") as dev:
                mine = np.arange(w, BLOCKS, WRITERS)
                for seq in range(1, SEQS + 1):
                    b = int(rng.choice(mine))
                    logs[w].append((seq, b))
                    dev.pwrite(_block(w, b, seq), b * BLOCK)
        except BaseException as e:
            errors.append(e)

    def keeper() -> None:
        try:
            k = 0
            while not done.is_set() and k < SNAPSHOTS:
                pool.snapshot(f"v@{k}")
                with pool.open_device(f"v@{k}") as snap:
                    images.append(seen(snap.pread(0, snap.size)))
                k += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    side = threading.Thread(target=keeper)
    for t in threads + [side]:
        t.start()
    for t in threads:
        t.join(WAIT)
    done.set()
    side.join(WAIT)
    assert not any(t.is_alive() for t in threads + [side]), "deadlock"
    if errors:
        raise errors[0]
    for k, (_, digest) in enumerate(images):     # a snapshot never changes once taken
        with pool.open_device(f"v@{k}") as snap:
            assert seen(snap.pread(0, snap.size))[1] == digest, f"snapshot v@{k} changed"
    with pool.open_device("v") as dev:
        images.append(seen(dev.pread(0, dev.size)))
    assert len(images) > 2
    for stamps, _ in images:
        for w in range(WRITERS):
            own = stamps[w::WRITERS]
            assert (own["w"] == w).all() and (own["b"] == np.arange(w, BLOCKS, WRITERS)).all()
            upto = int(own["s"].max())
            want = _expected(logs[w], upto, w)
            assert own["s"].tolist() == [want[b] for b in range(w, BLOCKS, WRITERS)]
    assert int(images[-1][0]["s"].max()) == SEQS
    assert check_pool(pool) == []
    pool.close()
    with Pool.open(str(tmp_path / "pool"), commit_interval=0) as again:   # and it all lasts
        assert check_pool(again) == []
        for k, (_, digest) in enumerate(images[:-1]):
            with again.open_device(f"v@{k}") as snap:
                assert seen(snap.pread(0, snap.size))[1] == digest, f"v@{k} after reopen"
        with again.open_device("v") as dev:
            assert seen(dev.pread(0, dev.size))[1] == images[-1][1]


# ---- the lock itself ---------------------------------------------------------

def _in_thread(fn):
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_readers_hold_the_lock_together():
    lock = RWLock()
    both = threading.Barrier(2, timeout=WAIT)   # passes only if both hold it at once

    def read():
        with lock.shared:
            both.wait()
    threads = [_in_thread(read) for _ in range(2)]
    for t in threads:
        t.join(WAIT)
    assert not any(t.is_alive() for t in threads)


def test_a_writer_waits_for_readers_and_new_readers_wait_for_it():
    lock = RWLock()
    order: list = []
    lock.acquire_shared()
    w = _in_thread(lambda: (lock.acquire(), order.append("writer"), lock.release()))
    for _ in range(WAIT * 1000):              # until the writer is queued
        if lock._writers_waiting:
            break
        w.join(0.001)
    r = _in_thread(lambda: (lock.acquire_shared(), order.append("reader"),
                            lock.release_shared()))
    r.join(0.05)
    assert order == []                        # writer preference: the reader queues too
    lock.release_shared()
    w.join(WAIT)
    r.join(WAIT)
    assert order == ["writer", "reader"]


def test_exclusive_is_reentrant_and_may_read():
    lock = RWLock()
    with lock:
        with lock:
            with lock.shared:
                assert lock.acquire(blocking=False)
                lock.release()
    assert _in_thread(lambda: lock.acquire() and lock.release()).join(WAIT) is None
    assert lock._owner is None and lock._readers == 0


def test_shared_is_reentrant_and_upgrading_fails_loudly():
    lock = RWLock()
    with lock.shared:
        with lock.shared:
            with pytest.raises(RuntimeError):
                lock.acquire()
    with lock:                                # and it was all given back
        pass


class Recorder:
    """RWLock hooks that log what they hear, per thread."""

    def __init__(self):
        self.log: list = []

    def __getattr__(self, name):
        if name not in ("announce", "withdraw", "enter", "leave"):
            raise AttributeError(name)
        return lambda exclusive: self.log.append((name, exclusive))


def test_hooks_hear_each_outermost_take_and_release_once():
    """The lane's view of the lock: announce, then enter or withdraw, then leave,
    for the outermost take of each side only; a failed try withdraws."""
    lock, rec = RWLock(), Recorder()
    lock.hooks = rec
    with lock:
        with lock:
            with lock.shared:
                pass
    assert rec.log == [("announce", True), ("enter", True), ("leave", True)]
    rec.log.clear()
    with lock.shared:
        with lock.shared:
            got = []
            _in_thread(lambda: got.append(lock.acquire(blocking=False))).join(WAIT)
            assert got == [False]
    assert rec.log == [("announce", False), ("enter", False),
                       ("announce", True), ("withdraw", True), ("leave", False)]
