"""FLUSH and FUA over NBD: held replies answered by one intent-log sync per burst.

A Transmission runs in-process on one end of a socketpair, over a pool on the power-cut
double (tests/faultfs.py), so what a reply promised can be checked after the power
fails: every FUA write and every write acknowledged before a FLUSH reply reads back.
Requests written into the socket before the reader starts arrive as one burst.
"""

from __future__ import annotations

import errno
import os
import socket
import threading

import crashkit
from faultfs import FaultDisk

from thinstore import Pool
from thinstore.nbd import protocol as P
from thinstore.nbd import stats as S
from thinstore.nbd.handshake import Agreement
from thinstore.nbd.server import ServerConfig
from thinstore.nbd.held import HOLD_MAX
from thinstore.nbd.transmission import Transmission

SIZE = 1 << 20


def _pool(tmp_path, disk):
    path = str(tmp_path / "pool")
    Pool.create(path, 8 << 20, 4096, commit_interval=0).close()
    pool = Pool.open(path, commit_interval=0, fileio=disk.open)
    pool.create_volume("v", SIZE)
    pool.commit()
    return path, pool


def _session(pool):
    """(client socket, Transmission on the other end, not started)."""
    client, server = socket.socketpair()
    agreement = Agreement(server, pool.open_device("v"), structured=False)
    return client, Transmission(agreement, ServerConfig(workers=2))


def _request(kind, offset=0, data=b"", flags=0, cookie=0, length=None):
    n = len(data) if length is None else length
    return P.encode_request(flags, kind, cookie, offset, n) + data


def _replies(client, n):
    """n simple replies: {cookie: error}."""
    out, buf = {}, b""
    while len(out) < n:
        while len(buf) < P.SIMPLE_REPLY.size:
            got = client.recv(4096)
            assert got, f"connection closed after {len(out)} of {n} replies"
            buf += got
        magic, error, cookie = P.SIMPLE_REPLY.unpack_from(buf)
        assert magic == P.SIMPLE_REPLY_MAGIC
        out[cookie] = error
        buf = buf[P.SIMPLE_REPLY.size:]
    return out


def _power_cut(path, pool, disk):
    disk.rng.random = lambda: 0.1           # every unsynced write is lost
    crashkit._abandon(pool)
    disk.power_cut()
    return Pool.open(path, commit_interval=0)


def test_a_burst_of_fua_writes_and_flushes_shares_one_sync(tmp_path):
    """16 FUA writes and a FLUSH sent together: all answered OK after ONE record and
    ONE fdatasync, and every one of them survives a power cut."""
    disk = FaultDisk(11)
    path, pool = _pool(tmp_path, disk)
    client, session = _session(pool)
    blocks = {i: os.urandom(4096) for i in range(16)}
    burst = b"".join(_request(P.Cmd.WRITE, i * 8192, blocks[i], P.CMD_FLAG_FUA, cookie=i)
                     for i in blocks)
    client.sendall(burst + _request(P.Cmd.FLUSH, cookie=99) + _request(P.Cmd.DISC))
    session.run()                            # in this thread: it ends at DISC
    assert _replies(client, 17) == {c: 0 for c in [*blocks, 99]}
    assert pool._log.counters["records"] == 1 and pool._log.counters["syncs"] == 1
    with _power_cut(path, pool, disk) as pool, pool.open_device("v") as dev:
        for i, data in blocks.items():
            assert dev.pread(i * 8192, 4096) == data


def test_more_held_replies_than_the_cap_settle_early(tmp_path):
    disk = FaultDisk(12)
    path, pool = _pool(tmp_path, disk)
    client, session = _session(pool)
    n = HOLD_MAX + 5
    reqs = b"".join(_request(P.Cmd.WRITE, i * 4096, bytes([i % 250 + 1]) * 512,
                             P.CMD_FLAG_FUA, cookie=i) for i in range(n))
    sender = threading.Thread(target=client.sendall, args=(reqs + _request(P.Cmd.DISC),))
    sender.start()
    session.run()
    sender.join()
    assert _replies(client, n) == {i: 0 for i in range(n)}
    assert pool._log.counters["syncs"] >= 2          # one per HOLD_MAX at most
    with _power_cut(path, pool, disk) as pool, pool.open_device("v") as dev:
        assert all(dev.pread(i * 4096, 512) == bytes([i % 250 + 1]) * 512 for i in range(n))


def test_a_client_that_flushes_after_every_write_is_synced_before_it_asks(tmp_path):
    """At queue depth 1 with a FLUSH after each write, the log is already synced when
    the FLUSH arrives (the server flushed while the write's reply travelled); a client
    that then stops flushing costs no further syncs, and each write answered before a
    FLUSH reply survives the power cut."""
    disk = FaultDisk(13)
    path, pool = _pool(tmp_path, disk)
    client, session = _session(pool)
    reader = threading.Thread(target=session.run)
    reader.start()
    slog = pool._log
    for i in range(4):
        client.sendall(_request(P.Cmd.WRITE, i * 4096, bytes([i + 1]) * 4096, cookie=i))
        assert _replies(client, 1) == {i: 0}
        if i:          # from the second round on, the pattern is known
            wait_until(lambda: slog.synced == slog.appended and not slog.pending)
        client.sendall(_request(P.Cmd.FLUSH, cookie=100 + i))
        assert _replies(client, 1) == {100 + i: 0}
    syncs = slog.counters["syncs"]
    assert syncs == 4
    for i in range(4, 24):                    # no more FLUSHes: no more syncs
        client.sendall(_request(P.Cmd.WRITE, i * 4096, bytes([i + 1]) * 4096, cookie=i))
        assert _replies(client, 1) == {i: 0}
    assert slog.counters["syncs"] <= syncs + 1
    client.sendall(_request(P.Cmd.DISC))
    reader.join()
    with _power_cut(path, pool, disk) as pool, pool.open_device("v") as dev:
        for i in range(4):
            assert dev.pread(i * 4096, 4096) == bytes([i + 1]) * 4096


def test_a_failed_sync_fails_every_held_request_and_the_session_goes_on(tmp_path):
    disk = FaultDisk(14)
    path, pool = _pool(tmp_path, disk)
    client, session = _session(pool)

    def broken(ticket):
        raise OSError(errno.EIO, "the log cannot be synced")
    pool._log.sync = broken
    client.sendall(_request(P.Cmd.WRITE, 0, b"a" * 4096, P.CMD_FLAG_FUA, cookie=1)
                   + _request(P.Cmd.FLUSH, cookie=2))
    reader = threading.Thread(target=session.run)
    reader.start()
    assert _replies(client, 2) == {1: P.EIO, 2: P.EIO}
    del pool._log.sync                         # the disk recovers
    client.sendall(_request(P.Cmd.FLUSH, cookie=3))
    assert _replies(client, 1) == {3: 0}
    client.sendall(_request(P.Cmd.DISC))
    reader.join()
    counts = session.stats.total()        # what iostat shows: the failed two are errors
    assert (counts[S.FLUSH_OPS], counts[S.WRITE], counts[S.ERRORS]) == (1, 0, 2)
    crashkit._abandon(pool)


def wait_until(predicate, timeout=10.0):
    import time
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "the log was not synced ahead of the FLUSH"
        time.sleep(0.001)
