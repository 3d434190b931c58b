"""The native request loop (thinstore/nbd/burst.py) answers exactly as the Python path.

The same request stream goes to two servers, one with the loop on and one with it
off (ServerConfig.native_loop), each over a pool with the same contents; the
replies (each one's bytes, by cookie), the devices' contents afterwards and the
per-export counters must agree. Real clients (fio with verification, nbdcopy)
then run against ``thinstore serve`` with the loop on.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import sys
import threading
import time

import pytest

from nbd_helpers import (ROOT, MiB, RawClient, ServeProcess, new_pool_dir, need, run, served,
                         uri)
from thinstore import Pool, native
from thinstore.control import RemotePool
from thinstore.nbd import protocol as P

SIZE = 8 * MiB
FAST_MAX = 128 << 10
_W, _R = P.Cmd.WRITE, P.Cmd.READ

needs_loop = pytest.mark.skipif(native.BACKEND != "native",
                                reason="the loop runs with the native backend only")


def _fill(pool) -> None:
    """The same contents in every pool: data, zeros written, holes; a snapshot."""
    pool.create_volume("v", SIZE)
    rng = random.Random(1)
    with pool.open_device("v") as dev:
        dev.pwrite(rng.randbytes(2 * MiB), 0)
        dev.pwrite(bytes(MiB), 3 * MiB)             # zeros written: read as a hole
        dev.pwrite(rng.randbytes(MiB), 5 * MiB)
    pool.snapshot("v@s")


def _stream(seed: int, read_only: bool = False) -> list[list[tuple]]:
    """Batches of requests (flags, kind, cookie, offset, length, payload): pipelined
    in a batch, a batch sent after the previous one's replies are in. Requests run
    on workers (TRIM, WRITE_ZEROES) get a batch alone, so order never depends on timing."""
    rng = random.Random(seed)
    batches, cookie = [], 0

    def req(flags, kind, offset, length, payload=b""):
        nonlocal cookie
        cookie += 1
        return (flags, kind, cookie, offset, length, payload)

    for _ in range(40):
        batch = []
        for _ in range(rng.choice((1, 4, 16, 40))):
            pick = rng.random()
            length = rng.choice((1, 2, 3, 512, 4096, 4097, 65536, FAST_MAX, FAST_MAX + 1,
                                 MiB, rng.randrange(1, FAST_MAX)))
            offset = rng.choice((0, rng.randrange(SIZE - length + 1),
                                 rng.randrange(0, SIZE, 4096), 3 * MiB + 8192,
                                 SIZE - length + rng.choice((0, 1, 4096))))
            if pick < 0.4:
                payload = bytes(length) if rng.random() < 0.15 else rng.randbytes(length)
                batch.append(req(0, _W, offset, length, payload))
            elif pick < 0.8:
                batch.append(req(0, _R, offset, length))
            elif pick < 0.85:
                batch.append(req(P.CMD_FLAG_FUA, _W, offset, length, rng.randbytes(length)))
            elif pick < 0.9:
                batch.append(req(0, P.Cmd.FLUSH, 0, 0))
            elif pick < 0.93:
                batch.append(req(P.CMD_FLAG_DF, _R, offset, length))
            elif pick < 0.96:
                batch.append(req(0, rng.choice((_R, _W)), offset, 0))
            else:
                kind = rng.choice((P.Cmd.TRIM, P.Cmd.WRITE_ZEROES))
                batches.append([req(0, kind, offset, length)])
        batches.append(batch)
    return batches


def _replies(client: RawClient, batch) -> dict[int, bytes]:
    """Every reply of a batch as raw bytes, by cookie (FLUSH and FUA replies may come
    in a different order than the requests; each reply is whole). Structured replies
    answer READs only: every other request gets a simple reply."""
    wanted = {r[2]: r for r in batch}
    got: dict[int, bytes] = {}
    done: set[int] = set()
    while len(done) < len(wanted):
        magic = client.recv(4)
        if int.from_bytes(magic, "big") == P.STRUCTURED_REPLY_MAGIC:
            head = magic + client.recv(P.STRUCTURED_HEADER.size - 4)
            _, flags, _, cookie, n = P.STRUCTURED_HEADER.unpack(head)
            got[cookie] = got.get(cookie, b"") + head + client.recv(n)
            if flags & P.REPLY_FLAG_DONE:
                done.add(cookie)
        else:
            head = magic + client.recv(P.SIMPLE_REPLY.size - 4)
            magic, error, cookie = P.SIMPLE_REPLY.unpack(head)
            assert magic == P.SIMPLE_REPLY_MAGIC, hex(magic)
            _, kind, _, _, length, _ = wanted[cookie]
            got[cookie] = head + (client.recv(length) if kind == _R and not error else b"")
            done.add(cookie)
    assert set(got) == set(wanted)
    return got


def _send(client: RawClient, wire: bytes, slow: bool) -> None:
    if slow and len(wire) > 40:     # a request's payload arrives late
        client.sock.sendall(wire[:40])
        time.sleep(0.002)
        wire = wire[40:]
    client.sock.sendall(wire)


def _run_stream(export: str, structured: bool, loop: bool, seed: int, slow_payload: bool):
    """(replies by cookie, device contents, counters) of one server running the stream."""
    with served(native_loop=loop, workers=2) as s:
        _fill(s.pool)
        client = RawClient(s.sock)
        client.greet()
        client.go(export, structured=structured, meta=False)
        replies = {}
        for batch in _stream(seed):
            wire = b"".join(P.encode_request(f, k, c, o, n) + d for f, k, c, o, n, d in batch)
            sender = threading.Thread(target=_send, args=(client, wire, slow_payload))
            sender.start()          # replies are read meanwhile: no one waits on a full socket
            replies.update(_replies(client, batch))
            sender.join()
        client.request(P.Cmd.DISC)
        assert client.closed_by_server()
        client.close()
        with s.pool.open_device(export) as dev:
            contents = hashlib.sha256(dev.pread(0, SIZE)).hexdigest()
        counts = s.server.iostat()["devices"][export]
        return replies, contents, counts


@needs_loop
@pytest.mark.parametrize("export,structured,slow", [
    ("v", True, False), ("v", False, True), ("v@s", True, True), ("v@s", False, False)])
def test_loop_answers_like_the_python_path(export, structured, slow):
    seed = len(export) * 10 + structured
    on = _run_stream(export, structured, True, seed, slow)
    off = _run_stream(export, structured, False, seed, slow)
    assert on[0].keys() == off[0].keys()
    differ = [c for c in on[0] if on[0][c] != off[0][c]]
    assert not differ, f"{len(differ)} replies differ, first cookie {differ[0]}"
    assert on[1] == off[1]
    same = ("read_ops", "read_bytes", "write_ops", "write_bytes", "flush_ops", "other_ops",
            "errors")
    assert {k: on[2][k] for k in same} == {k: off[2][k] for k in same}
    # the loop times every request it serves; the Python path one in eight
    assert on[2]["read_timed"] > off[2]["read_timed"]
    if export == "v":
        assert on[2]["write_timed"] > off[2]["write_timed"]


@pytest.mark.parametrize("length", [4096, 1 << 20])
def test_a_write_the_lane_leaves_is_answered_at_once(length):
    """An all-zero WRITE (the lane leaves it to the general path) sent alone gets its
    reply without the client sending anything more, small or large."""
    with served() as s:
        _fill(s.pool)
        client = RawClient(s.sock)
        client.greet()
        client.go("v")
        for cookie in range(1, 4):
            client.request(_W, MiB * cookie, length, cookie=cookie, data=bytes(length))
            assert client.simple_reply() == (cookie, 0, b"")
            client.request(_R, MiB * cookie, 4096, cookie=10 + cookie)
            assert client.structured_reply()[0] == 10 + cookie
        client.close()


def test_hang_up_in_a_payload_the_loop_waits_for():
    """A client gone in the middle of a WRITE's payload: the connection ends, the
    write is not applied, the server keeps serving."""
    with served() as s:
        _fill(s.pool)
        before = s.pool.open_device("v").pread(0, 8192)
        client = RawClient(s.sock)
        client.greet()
        client.go("v")
        client.sock.sendall(P.encode_request(0, _W, 1, 0, 8192) + b"x" * 100)
        time.sleep(0.05)
        client.close()
        other = RawClient(s.sock)
        other.greet()
        other.go("v")
        other.request(_R, 0, 8192, cookie=7)
        cookie, chunks = other.structured_reply()
        assert cookie == 7 and chunks[0][1][8:] == before
        other.close()


@pytest.mark.integration
def test_real_clients_through_the_loop():
    """fio writes with verification at QD16 (sizes 512 B to 256 KiB: the loop and the
    Python path interleaved), nbdcopy copies a file in and out: every byte reads back."""
    need("fio", "nbdcopy")
    with new_pool_dir() as pool:
        run([sys.executable, "-m", "thinstore", "--pool", pool, "create", "--size", "64M",
             "vol"], env=dict(os.environ, PYTHONPATH=ROOT))
        sock = os.path.join(os.path.dirname(pool), "nbd.sock")
        serve = ServeProcess(pool, "--socket", sock)
        try:
            run(["fio", "--name=v", "--ioengine=nbd", f"--uri={uri(sock, 'vol')}",
                 "--rw=randwrite", "--bsrange=512-256k", "--bs_unaligned", "--iodepth=16",
                 "--size=32M", "--verify=crc32c", "--verify_fatal=1", "--randrepeat=0"],
                 timeout=300)
            data = os.urandom(16 * MiB)
            src = os.path.join(os.path.dirname(pool), "in.raw")
            dst = os.path.join(os.path.dirname(pool), "out.raw")
            with open(src, "wb") as f:
                f.write(data)
            run(["nbdcopy", src, uri(sock, "vol")])
            run(["nbdcopy", uri(sock, "vol"), dst])
            with open(dst, "rb") as f:
                assert f.read(16 * MiB) == data
        finally:
            serve.stop()


def _pipelined_writes(client: RawClient, flags: int, cookies, lengths, seed: int) -> dict:
    """WRITEs (with `flags`) of random data at random 512-aligned offsets of an 8 MiB
    export, lengths picked from `lengths`, sent at once; every reply must be OK.
    Returns {cookie: (offset, data)}."""
    rng = random.Random(seed)
    expect, wire = {}, b""
    for cookie in cookies:
        length = rng.choice(lengths)
        offset, data = rng.randrange(0, 8 * MiB - length, 512), rng.randbytes(length)
        wire += P.encode_request(flags, _W, cookie, offset, length) + data
        expect[cookie] = (offset, data)
    client.sock.sendall(wire)
    for _ in expect:
        assert client.simple_reply()[1] == 0
    return expect


def _served_by_the_loop(pool_dir: str, name: str, writes: int) -> None:
    """The export counted `writes` WRITEs, (nearly) all timed: the loop served them
    (the Python path times one in eight)."""
    with RemotePool.connect(pool_dir) as remote:
        counts = remote.iostat()["devices"][name]
    assert counts["write_ops"] == writes
    assert counts["write_timed"] >= 0.9 * counts["write_ops"]


@needs_loop
def test_writes_the_loop_answered_survive_a_kill_after_a_flush_elsewhere():
    """The crash contract through the loop: 4 KiB writes pipelined on one connection
    (served in C: overwrites, and first writes whose new chunks only the map and
    the intent log know of), a FLUSH answered on another, then SIGKILL: every write
    answered reads back from the reopened pool."""
    with new_pool_dir() as pool_dir:
        serve = ServeProcess(pool_dir)
        try:
            run([sys.executable, "-m", "thinstore", "--pool", pool_dir, "create", "mc",
                 "--size", "8M"], env=dict(os.environ, PYTHONPATH=ROOT))
            sock = os.path.join(pool_dir, "nbd.sock")
            writer, flusher = RawClient(sock), RawClient(sock)
            for c in (writer, flusher):
                c.greet()
                c.go("mc")
            # maps the first half's chunks, and the map page the second half's holes
            # are in: writes there allocate, in the loop, changing only the map
            writer.request(_W, 0, 4 * MiB, cookie=1, data=os.urandom(4 * MiB))
            assert writer.simple_reply() == (1, 0, b"")
            expect = _pipelined_writes(writer, 0, range(2, 200), (4096,), seed=5)
            _served_by_the_loop(pool_dir, "mc", len(expect) + 1)
            flusher.request(P.Cmd.FLUSH, cookie=2)
            assert flusher.simple_reply() == (2, 0, b"")
        finally:
            serve.stop(signal.SIGKILL)
        image = bytearray(8 * MiB)
        with Pool.open(pool_dir) as pool, pool.open_device("mc") as dev:
            got = dev.pread(0, 8 * MiB)
        for cookie in sorted(expect):
            offset, data = expect[cookie]
            image[offset:offset + 4096] = data
        for offset, data in expect.values():
            assert got[offset:offset + 4096] == image[offset:offset + 4096]


@needs_loop
def test_fua_writes_the_loop_served_survive_a_kill():
    """FUA writes (the loop writes and notes them, the reader holds each reply until
    the intent log has it): first writes into holes and overwrites, pipelined, every
    one answered, then SIGKILL with no FLUSH: every one reads back, and the loop (not
    the Python path, which times one write in eight) served them."""
    with new_pool_dir() as pool_dir:
        serve = ServeProcess(pool_dir)
        try:
            run([sys.executable, "-m", "thinstore", "--pool", pool_dir, "create", "fua",
                 "--size", "8M"], env=dict(os.environ, PYTHONPATH=ROOT))
            c = RawClient(os.path.join(pool_dir, "nbd.sock"))
            c.greet()
            c.go("fua")
            expect = _pipelined_writes(c, P.CMD_FLAG_FUA, range(1, 120),
                                       (512, 4096, 65536, FAST_MAX), seed=7)
            _served_by_the_loop(pool_dir, "fua", len(expect))
        finally:
            serve.stop(signal.SIGKILL)
        image = bytearray(8 * MiB)
        for cookie in sorted(expect):
            offset, data = expect[cookie]
            image[offset:offset + len(data)] = data
        with Pool.open(pool_dir) as pool, pool.open_device("fua") as dev:
            assert dev.pread(0, 8 * MiB) == bytes(image)
