"""libnbd's tools and bindings against exports: nbdinfo, nbdcopy, python nbd.

The python scripts run under /usr/bin/python3, which has python3-libnbd.
"""

from __future__ import annotations

import json
import os

import pytest

from nbd_helpers import MiB, need, need_libnbd_python, run, served, system_python

SIZE = 64 * MiB


@pytest.fixture(scope="module")
def srv(backend):
    need("nbdinfo", "nbdcopy")
    with served(backend=backend) as s:
        yield s


def test_nbdinfo_list_shows_every_device(srv):
    srv.pool.create_volume("lst", SIZE)
    srv.pool.snapshot("lst@one")
    srv.pool.clone("lst@one", "lst-clone")
    out = json.loads(run(["nbdinfo", "--list", "--json", srv.uri()]).stdout)
    names = {e["export-name"]: e for e in out["exports"]}
    assert {"lst", "lst@one", "lst-clone"} <= set(names)
    assert names["lst@one"]["is_read_only"] is True
    assert names["lst"]["is_read_only"] is False
    assert names["lst"]["export-size"] == SIZE
    assert names["lst"]["can_multi_conn"] is True


def test_device_created_while_serving_is_exportable_at_once(srv):
    srv.pool.create_volume("late", 4 * MiB)
    out = json.loads(run(["nbdinfo", "--json", srv.uri("late")]).stdout)
    assert out["exports"][0]["export-size"] == 4 * MiB


def test_nbdinfo_map_shows_holes(srv):
    srv.pool.create_volume("holes", SIZE)
    with srv.pool.open_device("holes") as dev:
        dev.pwrite(b"\xee" * MiB, 4 * MiB)
    out = json.loads(run(["nbdinfo", "--map", "--json", srv.uri("holes")]).stdout)
    spans = [(e["offset"], e["length"], e["type"]) for e in out]
    assert spans == [(0, 4 * MiB, 3), (4 * MiB, MiB, 0), (5 * MiB, SIZE - 5 * MiB, 3)]


def test_nbdcopy_round_trips_a_sparse_image(srv, tmp_path):
    image = tmp_path / "sparse.img"
    with open(image, "wb") as f:
        f.truncate(SIZE)
        for offset, byte in ((0, 0x61), (10 * MiB, 0x62), (SIZE - MiB, 0x63)):
            f.seek(offset)
            f.write(bytes([byte]) * (512 << 10))
    srv.pool.create_volume("copy", SIZE)
    run(["nbdcopy", str(image), srv.uri("copy")])
    srv.pool.snapshot("copy@s")
    out = tmp_path / "out.img"
    run(["nbdcopy", srv.uri("copy@s"), str(out)])
    assert out.read_bytes() == image.read_bytes()
    with srv.pool.open_device("copy@s") as dev:
        mapped = [(o, n) for o, n, m in dev.extents(0, SIZE) if m]
    assert mapped == [(0, 512 << 10), (10 * MiB, 512 << 10), (SIZE - MiB, 512 << 10)]
    assert os.stat(out).st_blocks * 512 < 8 * MiB, "holes stayed holes in the copy"


SIMPLE_SCRIPT = r"""
import errno, sys, nbd
h = nbd.NBD()
h.set_request_structured_replies(False)
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert not h.get_structured_replies_negotiated()
size = h.get_size()
h.pwrite(b"\x5a" * 65536, 4096)
assert h.pread(65536, 4096) == b"\x5a" * 65536
assert h.pread(4096, 0) == bytes(4096)
h.zero(4096, 4096)
assert h.pread(4096, 4096) == bytes(4096)
h.trim(65536, 65536)
h.flush()
h.pwrite(b"\x01" * 512, 0, nbd.CMD_FLAG_FUA)
for call, code in ((lambda: h.pread(4096, size - 512), errno.EINVAL),
                   (lambda: h.pwrite(b"x" * 4096, size - 512), errno.ENOSPC)):
    try:
        call()
    except nbd.Error as e:
        assert e.errnum == code, (e.errnum, code)
    else:
        raise AssertionError("past-the-end request succeeded")
assert h.pread(512, 0) == b"\x01" * 512
h.shutdown()
print("ok")
"""


def test_simple_replies_the_kernel_way(srv):
    need_libnbd_python()
    srv.pool.create_volume("simple", 8 * MiB)
    assert system_python(SIMPLE_SCRIPT, srv.uri("simple")).stdout.strip() == "ok"


STRUCTURED_SCRIPT = r"""
import sys, nbd
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.pwrite(b"\x77" * 65536, 65536)
chunks = []
def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0
buf = h.pread_structured(196608, 0, chunk)
assert buf == bytes(65536) + b"\x77" * 65536 + bytes(65536), "content"
kinds = sorted(chunks)
assert kinds == [(0, 65536, nbd.READ_HOLE), (65536, 65536, nbd.READ_DATA),
                 (131072, 65536, nbd.READ_HOLE)], kinds
chunks.clear()
h.pread_structured(196608, 0, chunk, nbd.CMD_FLAG_DF)
assert chunks == [(0, 196608, nbd.READ_DATA)], chunks
for offset, status in ((4096, nbd.READ_HOLE), (69632, nbd.READ_DATA)):
    chunks.clear()
    h.pread_structured(4096, offset, chunk)
    assert chunks == [(offset, 4096, status)], (offset, chunks)
entries = []
def extent(ctx, offset, ents, err):
    entries.append(list(ents))
    return 0
h.block_status(196608, 0, extent)
assert entries[-1] == [65536, 3, 65536, 0, 65536, 3], entries
h.block_status(196608, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert entries[-1] == [65536, 3], entries
h.cache(4096, 0)
h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO)
try:
    h.zero(65536, 65536, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
except nbd.Error as e:
    assert e.errnum == 95, e.errnum
else:
    raise AssertionError("FAST_ZERO with NO_HOLE promised speed it cannot keep")
h.shutdown()
print("ok")
"""


def test_structured_replies_holes_df_block_status(srv):
    need_libnbd_python()
    srv.pool.create_volume("structured", 8 * MiB)
    assert system_python(STRUCTURED_SCRIPT, srv.uri("structured")).stdout.strip() == "ok"


READONLY_SCRIPT = r"""
import errno, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only()
for call in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
    try:
        call()
    except nbd.Error as e:
        assert e.errnum == errno.EPERM, e.errnum
    else:
        raise AssertionError("a write to a snapshot succeeded")
print("ok")
"""


def test_snapshot_refuses_writes_with_eperm(srv):
    need_libnbd_python()
    srv.pool.create_volume("rov", 4 * MiB)
    srv.pool.snapshot("rov@s")
    assert system_python(READONLY_SCRIPT, srv.uri("rov@s")).stdout.strip() == "ok"


READ_ONLY_SERVER = r"""
import errno, sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)
h.connect_uri(sys.argv[1])
assert h.is_read_only() and not h.can_trim() and not h.can_zero()
assert h.pread(512, 0) == b"\x09" * 512
try:
    h.pwrite(b"x" * 512, 0)
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e.errnum
else:
    raise AssertionError("a read-only server took a write")
print("ok")
"""


def test_read_only_server_exports_volumes_read_only():
    need_libnbd_python()
    with served(read_only=True) as s:
        s.pool.create_volume("vol", MiB)
        with s.pool.open_device("vol") as dev:
            dev.pwrite(b"\x09" * 512, 0)
        assert system_python(READ_ONLY_SERVER, s.uri("vol")).stdout.strip() == "ok"


def test_nbdinfo_lists_a_pool_with_many_devices():
    with served() as s:
        s.pool.create_volume("many", MiB)
        for i in range(299):
            s.pool.snapshot(f"many@s{i:03}")
        out = json.loads(run(["nbdinfo", "--list", "--json", s.uri()]).stdout)
        assert len(out["exports"]) == 300


MIXED_SCRIPT = r"""
import os, random, sys, nbd
uri, region = sys.argv[1], int(sys.argv[2])
rng = random.Random(7)
handles = [nbd.NBD() for _ in range(4)]
for h in handles:
    h.connect_uri(uri)
model = [bytearray(region) for _ in handles]
pending = [[] for _ in handles]          # in-flight writes: (cookie, start, end)
sizes = (512, 4096, 65536, 200 * 1024, 1 << 20, 5 << 20)

def settle(i, start, end):
    # NBD may reorder in-flight requests: never overlap a write still in flight
    h = handles[i]
    while True:
        pending[i] = [p for p in pending[i] if not h.aio_command_completed(p[0])]
        if not any(s < end and start < e for _, s, e in pending[i]) and h.aio_in_flight() < 16:
            return
        h.poll(-1)

for step in range(300):
    for i, h in enumerate(handles):
        size = rng.choice(sizes)
        off = rng.randrange(0, region - size + 1) & ~511
        kind = rng.random()
        settle(i, off, off + size)
        where = i * region + off
        if kind < 0.5:
            data = os.urandom(size)
            flags = nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0
            pending[i].append((h.aio_pwrite(data, where, flags=flags), off, off + size))
            model[i][off:off + size] = data
        elif kind < 0.6:
            pending[i].append((h.aio_zero(size, where), off, off + size))
            model[i][off:off + size] = bytes(size)
        elif kind < 0.65:
            h.aio_flush()
        else:
            h.aio_pread(nbd.Buffer(size), where)
for h in handles:
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.flush()
for i in range(4):
    got = handles[(i + 1) % 4].pread(region, i * region)   # through another connection
    assert got == bytes(model[i]), f"region {i} differs"
print("ok")
"""


def test_four_connections_mixed_pipelined_io_matches_a_model():
    need_libnbd_python()
    region = 16 * MiB
    with served() as s:
        s.pool.create_volume("mixed", 4 * region)
        assert system_python(MIXED_SCRIPT, s.uri("mixed"), str(region),
                             timeout=240).stdout.strip() == "ok"
