"""Pipelined large WRITEs in the native loop (_native/nbd_fast.h, "Pipelined large WRITEs").

A large WRITE received whole is written by the connection's writer thread while the
loop receives the next request. What a client sees must not change: the same
replies (bytes, errors) as the loop writing in turn and as the Python path, the
same contents afterwards, and a failing or abandoned write handled as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import signal
import threading
import time

import pytest

from nbd_helpers import (MiB, RawClient, ServeProcess, cli, new_pool_dir, served,
                         wait_for, writer_and_flusher)
from test_nbd_loop import SIZE, _fill, _replies
from thinstore import Pool, native
from thinstore.nbd import protocol as P

FAST_MAX = 128 << 10
_W, _R = P.Cmd.WRITE, P.Cmd.READ

needs_loop = pytest.mark.skipif(native.BACKEND != "native",
                                reason="the loop runs with the native backend only")


def _large_stream(seed: int) -> list[list[tuple]]:
    """Batches of mostly large WRITEs over overlapping ranges (so order matters), some
    all zeros (the lane leaves those to Python: a hand-back in the middle of the
    pipeline), some out of range (an error reply), with reads and small writes between."""
    rng = random.Random(seed)
    batches, cookie = [], 0
    for _ in range(6):
        batch = []
        for _ in range(rng.randrange(12, 25)):
            cookie += 1
            pick = rng.random()
            length = rng.choice((FAST_MAX + 1, MiB, MiB + 4096, 2 * MiB, 3 * MiB + 1))
            offset = rng.choice((rng.randrange(SIZE - length + 1), rng.randrange(0, 4 * MiB)))
            if pick < 0.06:
                batch.append((0, _R, cookie, offset, 4096, b""))
            elif pick < 0.12:
                batch.append((0, _W, cookie, offset, 4096, rng.randbytes(4096)))
            elif pick < 0.16:       # past the end: ENOSPC from the Python path
                batch.append((0, _W, cookie, SIZE - length + 4096, length, rng.randbytes(length)))
            else:
                payload = bytes(length) if pick < 0.3 else rng.randbytes(length)
                batch.append((0, _W, cookie, min(offset, SIZE - length), length, payload))
        batches.append(batch)
    return batches


def _run(loop: bool, pipeline: bool, seed: int):
    """(replies by cookie, device contents, write counters) of one server."""
    with served(native_loop=loop, pipeline=pipeline, workers=2) as s:
        _fill(s.pool)
        client = RawClient(s.sock)
        client.greet()
        client.go("v")
        replies = {}
        for batch in _large_stream(seed):
            wire = b"".join(P.encode_request(f, k, c, o, n) + d for f, k, c, o, n, d in batch)
            sender = threading.Thread(target=client.sock.sendall, args=(wire,))
            sender.start()          # replies are read meanwhile
            replies.update(_replies(client, batch))
            sender.join()
        client.request(P.Cmd.DISC)
        assert client.closed_by_server()
        client.close()
        with s.pool.open_device("v") as dev:
            contents = hashlib.sha256(dev.pread(0, SIZE)).hexdigest()
        counts = s.server.iostat()["devices"]["v"]
        return replies, contents, {k: counts[k] for k in ("write_ops", "write_bytes", "errors")}


@needs_loop
@pytest.mark.parametrize("seed", [1, 2])
def test_pipelined_large_writes_answer_like_writes_in_turn_and_the_python_path(seed):
    piped, in_turn, python = (_run(loop, pipe, seed) for loop, pipe in
                              ((True, True), (True, False), (False, False)))
    assert piped[2]["errors"] > 0, "the stream's out-of-range writes are answered with errors"
    for other in (in_turn, python):
        assert piped[0].keys() == other[0].keys()
        differ = [c for c in piped[0] if piped[0][c] != other[0][c]]
        assert not differ, f"{len(differ)} replies differ, first cookie {differ[0]}"
        assert piped[1:] == other[1:]


def test_large_writes_past_the_pool_space_get_enospc_and_the_rest_read_back():
    """A pool with room for a few MiB: 1 MiB writes pipelined into a larger volume
    succeed until the space is gone, then each gets ENOSPC; what succeeded reads
    back, and the connection keeps serving."""
    with served(capacity=12 * MiB) as s:
        s.pool.create_volume("big", 64 * MiB)
        client = RawClient(s.sock)
        client.greet()
        client.go("big", structured=False)      # errors in simple replies
        rng = random.Random(3)
        data = {c: rng.randbytes(MiB) for c in range(1, 25)}
        wire = b"".join(P.encode_request(0, _W, c, (c - 1) * MiB, MiB) + d
                        for c, d in data.items())
        sender = threading.Thread(target=client.sock.sendall, args=(wire,))
        sender.start()
        errors = {}
        for _ in data:
            cookie, error, _ = client.simple_reply()
            errors[cookie] = error
        sender.join()
        ok = [c for c in data if errors[c] == 0]
        assert ok and len(ok) < len(data)
        assert {errors[c] for c in data if c not in ok} == {P.ENOSPC}
        for c in ok:
            client.request(_R, (c - 1) * MiB, MiB, cookie=100 + c)
            assert client.simple_reply(MiB) == (100 + c, 0, data[c])
        client.close()


def test_hang_up_in_the_payload_of_a_pipelined_write():
    """A client gone in the middle of a large WRITE's payload while the one before is
    being written: that one is applied whole, the torn one not at all, and the server
    serves the next client."""
    with served() as s:
        _fill(s.pool)
        with s.pool.open_device("v") as dev:
            before = dev.pread(4 * MiB, MiB)
        client = RawClient(s.sock)
        client.greet()
        client.go("v")
        first = random.Random(9).randbytes(MiB)
        client.sock.sendall(P.encode_request(0, _W, 1, 0, MiB) + first +
                            P.encode_request(0, _W, 2, 4 * MiB, MiB) + b"y" * (MiB // 2))
        client.close()
        # the first WRITE is applied beside the hang-up, on the server's own time: a read
        # by another client has to see it only once it is counted as done
        wait_for(lambda: s.server.iostat()["devices"].get("v", {}).get("write_ops") == 1,
                 what="the whole WRITE to be applied")
        wait_for(lambda: s.server.connections("v") == 0, what="the torn session to end")
        other = RawClient(s.sock)
        other.greet()
        other.go("v", structured=False)
        for cookie, offset, want in ((7, 0, first), (8, 4 * MiB, before)):
            other.request(_R, offset, MiB, cookie=cookie)
            assert other.simple_reply(MiB) == (cookie, 0, want)
        other.close()


@pytest.mark.parametrize("loop", [True, False], ids=["loop", "python"])
def test_the_close_line_counts_a_write_cut_off_in_its_payload(loop, caplog):
    """'serve -v' says at close how much the client asked to write: a WRITE whose
    payload never came whole counts as asked, with the native loop as without it."""
    caplog.set_level(logging.INFO, logger="thinstore.nbd.server")
    with served(native_loop=loop) as s:
        s.pool.create_volume("v", 8 * MiB)
        client = RawClient(s.sock)
        client.greet()
        client.go("v")
        client.sock.sendall(P.encode_request(0, _W, 1, 0, 64 << 10) + b"x" * (64 << 10) +
                            P.encode_request(0, _W, 2, MiB, MiB) + b"y" * (MiB // 2))
        client.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and "closed 'v'" not in caplog.text:
            time.sleep(0.05)
    assert re.search(r"closed 'v' after [\d.]+ s, read 0B, wrote 1\.06M", caplog.text), \
        caplog.text


@needs_loop
def test_pipelined_writes_answered_survive_a_kill_after_a_flush_elsewhere():
    """The crash contract through the pipeline: overlapping 1 MiB writes pipelined on
    one connection (first writes and overwrites), a FLUSH answered on another, then
    SIGKILL: the reopened pool holds every answered write, applied in order."""
    with new_pool_dir() as pool_dir:
        serve = ServeProcess(pool_dir)
        try:
            cli("--pool", pool_dir, "create", "mc", "--size", "16M")
            (writer, flusher), _ = writer_and_flusher(pool_dir, "mc")
            rng = random.Random(11)
            writes = [(rng.randrange(0, 15 * MiB, 4096 * rng.choice((1, 7))), rng.randbytes(MiB))
                      for _ in range(40)]
            wire = b"".join(P.encode_request(0, _W, cookie, offset, MiB) + data
                            for cookie, (offset, data) in enumerate(writes, 1))
            sender = threading.Thread(target=writer.sock.sendall, args=(wire,))
            sender.start()
            for _ in writes:
                assert writer.simple_reply()[1] == 0
            sender.join()
            flusher.request(P.Cmd.FLUSH, cookie=2)
            assert flusher.simple_reply() == (2, 0, b"")
        finally:
            serve.stop(signal.SIGKILL)
        image = bytearray(16 * MiB)
        for offset, data in writes:
            image[offset:offset + MiB] = data
        with Pool.open(pool_dir) as pool, pool.open_device("mc") as dev:
            assert dev.pread(0, 16 * MiB) == image


@needs_loop
def test_each_connections_writer_thread_ends_with_it():
    """Connections that pipelined large WRITEs leave no thread behind once closed."""
    def threads() -> int:
        return len(os.listdir("/proc/self/task"))

    with served() as s:
        _fill(s.pool)
        before = threads()
        for round_no in range(12):
            client = RawClient(s.sock)
            client.greet()
            client.go("v")
            wire = b"".join(P.encode_request(0, _W, c, c * MiB, MiB) + bytes([round_no + 1]) * MiB
                            for c in range(3))
            client.sock.sendall(wire)
            assert sorted(client.simple_reply()[:2] for _ in range(3)) == [(0, 0), (1, 0), (2, 0)]
            client.request(P.Cmd.DISC)
            assert client.closed_by_server()
            client.close()
        for _ in range(3000):       # the connections' threads end after their sockets close
            if threads() <= before:
                break
            time.sleep(0.01)
        assert threads() <= before
