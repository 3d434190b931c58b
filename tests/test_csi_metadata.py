"""The SnapshotMetadata service: GetMetadataAllocated and GetMetadataDelta streamed from
the pool's map diff; the same ranges as ``thinstore diff``, at the cost of the change
(map pages read) rather than the size of the volume (must-show 3)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys

import grpc
import pytest

from csi_helpers import GiB, MiB, ROOT, Client, block_cap, pb, plugin_env, short_tmpdir
from thinstore import Pool
from thinstore.frontends.csi.service import Plugin
from thinstore.nbd.client import NBDDevice

C = grpc.StatusCode
CHUNK = 64 << 10
PAGE_SPAN = 508 * CHUNK              # virtual bytes one map page covers


def ranges(stream):
    out, types, caps = [], set(), set()
    for msg in stream:
        types.add(msg.block_metadata_type)
        caps.add(msg.volume_capacity_bytes)
        out += [(b.byte_offset, b.size_bytes) for b in msg.block_metadata]
    return out, types, caps


def delta(c, base, target, start=0, per=0):
    return c.metadata.GetMetadataDelta(pb.GetMetadataDeltaRequest(
        base_snapshot_id=base, target_snapshot_id=target, starting_offset=start,
        max_results=per), timeout=60)


def allocated(c, snap, start=0, per=0):
    return c.metadata.GetMetadataAllocated(pb.GetMetadataAllocatedRequest(
        snapshot_id=snap, starting_offset=start, max_results=per), timeout=60)


def stream_status(call):
    try:
        list(call)
    except grpc.RpcError as err:
        return err.code()
    return C.OK


def cli_diff(pool_dir, a, b=None):
    """``thinstore diff A [B] --json``: the ranges where A differs from B (or is mapped)."""
    out = subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool_dir, "diff", a,
                          *([b] if b else []), "--json"], capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    return [(r["offset"], r["length"]) for r in json.loads(out.stdout)["ranges"]]


def test_delta_equals_thinstore_diff_on_a_64_gib_sparse_volume():
    with plugin_env(capacity=2 * GiB) as env:
        c = env.client
        vol = c.create("pvc-cbt", 64 * GiB, caps=[block_cap()]).volume_id
        with NBDDevice(os.path.join(env.dir, "nbd.sock"), vol) as dev:
            for i in range(40):                                  # spread over the volume
                dev.pwrite(bytes([i + 1]) * (2 * CHUNK), i * (1600 * MiB) + 12345)
            dev.flush()
            base = c.snapshot("snap-base", vol).snapshot_id
            dev.pwrite(b"\xaa" * 100, 7 * (1600 * MiB))          # overwrite inside data
            dev.pwrite(b"\xbb" * (3 * CHUNK), 50 * GiB + 5 * CHUNK)   # new data in a hole
            dev.discard(20 * (1600 * MiB), 2 * CHUNK)            # data turned into a hole
            dev.pwrite(b"\xcc", 64 * GiB - 1)                    # the last byte
            dev.flush()
        target = c.snapshot("snap-target", vol).snapshot_id
        got, types, caps = ranges(delta(c, base, target, per=2))
        assert types == {pb.VARIABLE_LENGTH} and caps == {64 * GiB}
        assert len(got) == 4 and all(a[0] + a[1] <= b[0] for a, b in zip(got, got[1:]))
        messages = list(delta(c, base, target, per=2))
        assert len(messages) == 2 and all(len(m.block_metadata) <= 2 for m in messages)
        alloc, _, _ = ranges(allocated(c, target))
        assert sum(n for _, n in alloc) >= 40 * 2 * CHUNK
        # resume from an offset: the first range is clipped to it, none end before it
        mid = got[2][0] + 10
        resumed, _, _ = ranges(delta(c, base, target, start=mid))
        assert resumed[0] == (mid, got[2][1] - 10) and resumed[1:] == got[3:]
        env.stop_plugin()
        assert got == cli_diff(env.pool_dir, target, base)
        assert alloc == cli_diff(env.pool_dir, target)


def test_metadata_errors():
    with plugin_env(capacity=1 * GiB) as env:
        c = env.client
        vol = c.create("pvc-md-err", 16 * MiB).volume_id
        other = c.create("pvc-md-other", 16 * MiB).volume_id
        s1, s2 = c.snapshot("md-1", vol).snapshot_id, c.snapshot("md-2", vol).snapshot_id
        s3 = c.snapshot("md-3", other).snapshot_id
        assert stream_status(delta(c, s1, s2, start=-1)) == C.OUT_OF_RANGE
        assert stream_status(delta(c, s1, s2, start=16 * MiB + 1)) == C.OUT_OF_RANGE
        assert stream_status(allocated(c, s1, start=32 * MiB)) == C.OUT_OF_RANGE
        assert stream_status(delta(c, s1, "csi.x@csi.y")) == C.NOT_FOUND
        assert stream_status(allocated(c, vol)) == C.NOT_FOUND          # a volume, no snapshot
        assert stream_status(delta(c, "", s2)) == C.INVALID_ARGUMENT
        assert stream_status(allocated(c, "")) == C.INVALID_ARGUMENT
        assert stream_status(delta(c, s1, s2, per=-1)) == C.INVALID_ARGUMENT
        assert stream_status(delta(c, s1, s3)) == C.INVALID_ARGUMENT     # other volume
        empty = list(delta(c, s1, s2))            # nothing changed: one message, no ranges
        assert len(empty) == 1 and not empty[0].block_metadata
        assert empty[0].volume_capacity_bytes == 16 * MiB


@contextlib.contextmanager
def controller_only(pool_dir, sock, create=False):
    """The pool opened (or made) afresh in this process, with a plugin without block
    devices serving it: a test reads ``pool.md.maps.counters`` around its calls."""
    pool = Pool.create(pool_dir, 2 * GiB, CHUNK, commit_interval=0) if create \
        else Pool.open(pool_dir, commit_interval=0)
    plugin = Plugin(pool, pool_dir, "node-1")
    try:
        plugin.start(f"unix://{sock}")
        client = Client(sock)
        try:
            yield pool, client
        finally:
            client.close()
    finally:
        plugin.stop()
        pool.close()


@pytest.fixture
def sock():
    where = short_tmpdir()
    yield os.path.join(where, "csi.sock")
    shutil.rmtree(where, ignore_errors=True)


def test_delta_reads_only_the_differing_map_pages(tmp_path, sock):
    """64 GiB volume, data in 300 of its 2065 map pages (every sixth), 3 chunks changed
    between the snapshots: the delta reads the 3 pages on each side, the full listing
    all 300."""
    pool_dir = str(tmp_path / "pool")
    with controller_only(pool_dir, sock, create=True) as (pool, c):
        vol = c.create("pvc-cost", 64 * GiB, caps=[block_cap()]).volume_id
        with pool.open_device(vol) as dev:
            for page in range(300):
                dev.pwrite(b"\x01" * CHUNK, page * 6 * PAGE_SPAN + 3 * CHUNK)
            base = c.snapshot("cost-base", vol).snapshot_id
            for page in (5, 150, 299):
                dev.pwrite(b"\x02" * 4096, page * 6 * PAGE_SPAN + 3 * CHUNK)
            target = c.snapshot("cost-target", vol).snapshot_id
    # a fresh open: no map page is in memory until something reads it
    with controller_only(pool_dir, sock) as (pool, c):
        pages = pool.md.maps.counters
        before = pages["pages_read"]
        got, _, _ = ranges(delta(c, base, target))
        delta_pages = pages["pages_read"] - before
        before = pages["pages_read"]
        alloc, _, _ = ranges(allocated(c, target))
        full_pages = pages["pages_read"] - before
    assert len(got) == 3 and sum(n for _, n in got) == 3 * CHUNK
    assert delta_pages == 2 * 3
    assert full_pages >= 300 - 3 and len(alloc) == 300
    print(f"\nGetMetadataDelta read {delta_pages} map pages, GetMetadataAllocated "
          f"{full_pages}, of a 64 GiB volume's 2065")
