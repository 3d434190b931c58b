"""The native loop's durable path: FLUSH and FUA answered in C (nbd_fast.h).

A Transmission runs in-process on one end of a socketpair over a pool on real files
(the native log writer needs a descriptor, which the power-cut double has not), with
the native backend. Every write lands where only the map and the intent log know of
it (first writes into a fresh volume, copies on write in a clone), so after the pool
is dropped without a commit a write reads back only if a record holding it was
appended before its FLUSH or FUA reply: the check the crash contract needs.
"""

from __future__ import annotations

import os
import socket
import threading

import crashkit
import pytest

from thinstore import Pool, native
from thinstore.nbd import protocol as P
from thinstore.nbd.handshake import Agreement
from thinstore.nbd.server import ServerConfig
from thinstore.nbd.transmission import Transmission

pytestmark = pytest.mark.skipif(native.BACKEND != "native", reason="the loop runs with the "
                                "native backend only (THINSTORE_PURE_PYTHON=1 runs Python's path)")

SIZE = 4 << 20
W, F, FUA = P.Cmd.WRITE, P.Cmd.FLUSH, P.CMD_FLAG_FUA


def _pool(tmp_path):
    path = str(tmp_path / "pool")
    Pool.create(path, 64 << 20, 4096, commit_interval=0).close()
    pool = Pool.open(path, commit_interval=0)
    pool.create_volume("fresh", SIZE)
    pool.create_volume("base", SIZE)
    with pool.open_device("base") as dev:
        dev.pwrite(os.urandom(SIZE), 0)
    pool.snapshot("base@snap")
    pool.clone("base@snap", "clone")
    pool.commit()
    return path, pool


class _Session:
    """A client socket and the in-process server reading the other end."""

    def __init__(self, pool, name: str):
        self.client, server = socket.socketpair()
        tx = Transmission(Agreement(server, pool.open_device(name), structured=False),
                          ServerConfig(workers=2))
        assert tx._loop is not None and tx._loop.c.log != native.ffi.NULL
        self.thread = threading.Thread(target=tx.run)
        self.thread.start()
        self.buf = b""

    def send(self, kind, offset=0, data=b"", flags=0, cookie=0) -> None:
        self.client.sendall(P.encode_request(flags, kind, cookie, offset, len(data)) + data)

    def replies(self, n: int) -> dict:
        out = {}
        while len(out) < n:
            while len(self.buf) < P.SIMPLE_REPLY.size:
                got = self.client.recv(65536)
                assert got, "the server closed the connection"
                self.buf += got
            magic, error, cookie = P.SIMPLE_REPLY.unpack_from(self.buf)
            assert magic == P.SIMPLE_REPLY_MAGIC
            out[cookie] = error
            self.buf = self.buf[P.SIMPLE_REPLY.size:]
        return out

    def close(self) -> None:
        self.send(P.Cmd.DISC)
        self.thread.join(10)
        self.client.close()


def _reopen(path, pool):
    crashkit._abandon(pool)             # no commit: only the log has the writes
    return Pool.open(path, commit_interval=0)


@pytest.mark.parametrize("name", ["fresh", "clone"])
def test_a_flush_after_each_write_is_answered_by_the_loop_and_survives(tmp_path, name):
    """QD1, a FLUSH after every write (a database's commit): the loop appends each
    write's record itself, before the write's reply goes out once the pattern is
    known, and answers the FLUSH; every write answered before a FLUSH reply reads
    back after the pool is dropped."""
    path, pool = _pool(tmp_path)
    s = _Session(pool, name)
    blocks = {}
    for i in range(40):
        offset, data = i * 65536 + 512 * (i % 8), os.urandom(4096)
        s.send(W, offset, data, cookie=i)
        assert s.replies(1) == {i: 0}
        s.send(F, cookie=1000 + i)
        assert s.replies(1) == {1000 + i: 0}
        blocks[offset] = data
    counts = pool._log.counters
    assert counts["loop_records"] >= 38 and counts["commits_instead"] == 0
    assert not pool._log.notes and pool._log._cur.pending == 0
    pool = _reopen(path, pool)
    with pool, pool.open_device(name) as dev:
        assert pool._log.counters["replayed"] >= 38
        for offset, data in blocks.items():
            assert dev.pread(offset, 4096) == data


def test_a_burst_of_fua_writes_is_one_record_of_the_loop(tmp_path):
    """16 FUA writes sent at once, four times: each burst is one record (group
    commit), the later ones appended and waited for by the loop, every write answered
    OK, all of them read back after the pool is dropped."""
    path, pool = _pool(tmp_path)
    s = _Session(pool, "clone")
    blocks = {}
    for burst in range(4):
        wire = b""
        for k in range(16):
            i = burst * 16 + k
            offset, data = i * 65536, os.urandom(4096)
            wire += P.encode_request(FUA, W, i, offset, 4096) + data
            blocks[offset] = data
        s.client.sendall(wire)
        assert s.replies(16) == {burst * 16 + k: 0 for k in range(16)}
    counts = pool._log.counters
    # one record a burst, not one a write; the loop appends those whose writes it
    # served itself (a first write under a map page the clone still shares with its
    # snapshot is the reader's, which then records that burst)
    assert counts["records"] <= 8 and counts["loop_records"] >= 2, counts
    pool = _reopen(path, pool)
    with pool, pool.open_device("clone") as dev:
        for offset, data in blocks.items():
            assert dev.pread(offset, 4096) == data


def test_a_flush_covers_writes_answered_on_another_connection(tmp_path):
    """Writes answered on one connection (of another device) are still pending when
    another connection's loop holds a FLUSH: it must not answer from its own record
    alone, so it hands the FLUSH to the reader, whose flush records both; the first
    connection's writes read back after the pool is dropped."""
    path, pool = _pool(tmp_path)
    a, b = _Session(pool, "fresh"), _Session(pool, "clone")
    b.send(W, 0, os.urandom(4096), cookie=100)      # unshares the clone's first map page
    b.send(F, cookie=101)                           # and starts the log writer
    assert b.replies(2) == {100: 0, 101: 0}
    blocks = {}
    for i in range(20):
        offset, data = i * 65536, os.urandom(4096)
        a.send(W, offset, data, cookie=i)
        blocks[offset] = data
    assert a.replies(20) == {i: 0 for i in range(20)}
    # the first (a new map page) noted by Python's path, the rest in the shared notes
    assert len(pool._log.notes) + pool._log._cur.n_shared == 20
    assert pool._log._cur.pending == 20
    python_records = pool._log.counters["records"] - pool._log.counters["loop_records"]
    b.send(W, 4096, os.urandom(4096), cookie=1)    # served by the loop (a copy on write)
    assert b.replies(1) == {1: 0}
    b.send(F, cookie=2)
    assert b.replies(1) == {2: 0}
    counts = pool._log.counters
    assert counts["records"] - counts["loop_records"] > python_records
    assert pool._log._cur.pending == 0
    pool = _reopen(path, pool)
    with pool, pool.open_device("fresh") as dev:
        for offset, data in blocks.items():
            assert dev.pread(offset, 4096) == data


def test_a_flush_on_one_connection_is_answered_by_its_loop_for_writes_on_others(tmp_path):
    """A client with several connections to one export (nbdfuse, the kernel's nbd
    driver with multi-conn) sends its writes on some and the FLUSH on another: that
    connection's loop puts the others' writes in its own record (the shared notes)
    and answers the FLUSH without Python's path; every write answered before a FLUSH
    reply reads back after the pool is dropped."""
    path, pool = _pool(tmp_path)
    conns = [_Session(pool, "clone") for _ in range(3)]
    conns[0].send(W, 0, os.urandom(4096), cookie=1)   # unshare the clone's map pages
    conns[0].send(W, SIZE - 4096, os.urandom(4096), cookie=2)
    conns[0].send(F, cookie=3)                        # and start the log writer
    assert conns[0].replies(3) == {1: 0, 2: 0, 3: 0}
    before = pool._log.counters
    blocks = {}
    for i in range(30):                 # ext4's fsync: writes, then a FLUSH elsewhere
        for k in range(2):
            offset, data = (2 * i + k + 1) * 65536 + 1024 * (i % 4), os.urandom(3072)
            conns[(i + k) % 3].send(W, offset, data, cookie=10 * i + k)
            assert conns[(i + k) % 3].replies(1) == {10 * i + k: 0}
            blocks[offset] = data
        conns[(i + 2) % 3].send(F, cookie=10 * i + 9)
        assert conns[(i + 2) % 3].replies(1) == {10 * i + 9: 0}
    counts = pool._log.counters
    python_records = counts["records"] - counts["loop_records"]
    # each FLUSH the loop's own (a write the lane leaves to Python now and then, when
    # the chunks it may allocate run out, makes that FLUSH Python's)
    assert python_records - (before["records"] - before["loop_records"]) <= 4, counts
    assert counts["loop_records"] - before["loop_records"] >= 26, counts
    assert pool._log._cur.pending == 0 and pool._log._cur.n_shared == 0
    pool = _reopen(path, pool)
    with pool, pool.open_device("clone") as dev:
        for offset, data in blocks.items():
            assert dev.pread(offset, 3072) == data


def test_a_held_flush_before_a_request_the_loop_leaves_is_answered(tmp_path):
    """A FLUSH, then a TRIM (the reader's), then FUA writes, sent at once: every
    request is answered OK, and the FUA writes and the write before the FLUSH read
    back after the pool is dropped."""
    path, pool = _pool(tmp_path)
    s = _Session(pool, "fresh")
    first, fua = os.urandom(4096), os.urandom(8192)
    wire = (P.encode_request(0, W, 1, 0, 4096) + first
            + P.encode_request(0, F, 2, 0, 0)
            + P.encode_request(0, P.Cmd.TRIM, 3, 1 << 20, 65536)
            + P.encode_request(FUA, W, 4, 2 << 20, 8192) + fua
            + P.encode_request(0, F, 5, 0, 0))
    s.client.sendall(wire)
    assert s.replies(5) == {k: 0 for k in range(1, 6)}
    pool = _reopen(path, pool)
    with pool, pool.open_device("fresh") as dev:
        assert dev.pread(0, 4096) == first
        assert dev.pread(2 << 20, 8192) == fua


def test_a_client_gone_before_its_replies_ends_the_session(tmp_path):
    """The loop sends its own replies once it has settled; a client that sent writes
    and FLUSHes and hung up before reading them ends the session (the send fails, the
    reader drops the connection) without harm: the server thread returns and the pool
    reads back every write after it is dropped."""
    path, pool = _pool(tmp_path)
    s = _Session(pool, "fresh")
    for i in range(3):                  # the pattern, so the loop settles by itself
        s.send(W, i * 4096, b"x" * 4096, cookie=i)
        assert s.replies(1) == {i: 0}
        s.send(F, cookie=100 + i)
        assert s.replies(1) == {100 + i: 0}
    data = os.urandom(4096)
    s.client.sendall(P.encode_request(0, W, 7, 65536, 4096) + data
                     + P.encode_request(0, F, 8, 0, 0))
    s.client.close()
    s.thread.join(10)
    assert not s.thread.is_alive()
    pool = _reopen(path, pool)
    with pool, pool.open_device("fresh") as dev:
        assert dev.pread(0, 4096) == b"x" * 4096
        assert dev.pread(65536, 4096) in (data, bytes(4096))
