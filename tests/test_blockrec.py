"""tests/blockrec.py, the recording disk the power-cut tests stand on: it answers NBD
like a disk, records what it completed in order (FUA flags, FLUSHes, TRIM as zeros),
tells its position over the side socket, and shrugs off a broken client."""

from __future__ import annotations

import os

import pytest

from blockrec import FLUSH, WRITE, BlockRecorder, PositionClient
from nbd_helpers import RawClient, short_tmpdir

from thinstore.nbd import protocol as P


@pytest.fixture
def disk():
    d = short_tmpdir()
    br = BlockRecorder(1 << 20)
    br.listen(os.path.join(d, "nbd.sock"))
    br.listen_position(os.path.join(d, "pos.sock"))
    yield br, d
    br.close()


def _client(d: str) -> RawClient:
    c = RawClient(os.path.join(d, "nbd.sock"))
    c.greet()
    size, flags = c.go("", structured=False, meta=False)
    assert size == 1 << 20
    assert flags & P.TF_SEND_FLUSH and flags & P.TF_SEND_FUA
    return c


def test_writes_and_flushes_are_recorded_in_the_order_completed(disk):
    br, d = disk
    c = _client(d)
    c.request(P.Cmd.WRITE, 4096, 512, P.CMD_FLAG_FUA, 1, b"a" * 512)
    c.request(P.Cmd.WRITE, 8192, 1024, 0, 2, b"b" * 1024)
    c.request(P.Cmd.FLUSH, cookie=3)
    c.request(P.Cmd.TRIM, 4096, 512, cookie=4)
    assert [c.simple_reply()[:2] for _ in range(4)] == [(1, 0), (2, 0), (3, 0), (4, 0)]
    c.request(P.Cmd.READ, 4096, 8192 - 4096 + 1024, cookie=5)
    _, err, data = c.simple_reply(8192 - 4096 + 1024)
    assert err == 0 and data == bytes(4096) + b"b" * 1024
    got = [(r.seq, r.kind, r.offset, len(r.data), r.fua) for r in br.records]
    assert got == [(0, WRITE, 4096, 512, True), (1, WRITE, 8192, 1024, False),
                   (2, FLUSH, 0, 0, False), (3, WRITE, 4096, 512, False)]
    assert br.records[3].data == bytes(512)
    pos = PositionClient(os.path.join(d, "pos.sock"))
    assert pos.ask() == br.position() == 4
    pos.close()
    c.close()


def test_a_request_past_the_end_gets_an_error_and_a_broken_client_is_dropped(disk):
    br, d = disk
    c = _client(d)
    c.request(P.Cmd.WRITE, (1 << 20) - 512, 1024, 0, 7, b"x" * 1024)
    assert c.simple_reply()[1] != 0
    c.sock.sendall(b"\0" * 28)                      # not a request magic
    assert c.closed_by_server()
    other = _client(d)                              # the disk carries on
    other.request(P.Cmd.FLUSH, cookie=8)
    assert other.simple_reply()[:2] == (8, 0)
    assert [r.kind for r in br.records] == [FLUSH]
    other.close()
