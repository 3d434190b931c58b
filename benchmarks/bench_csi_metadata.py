"""CSI changed-block metadata: what GetMetadataDelta costs beside its peer in one run.

    python -m pytest benchmarks/bench_csi_metadata.py --benchmark-only -s

A 64 GiB volume with data in 2048 of its 2065 map pages (16 KiB every 8 MiB: 8192
chunks), two snapshots 16 chunks apart.  Through the plugin's socket:

- GetMetadataDelta between them vs GetMetadataAllocated of the later one (what a full
  backup lists): time ratio (target: far below 1: the delta costs the change, the
  listing the volume's map);
- the map pages each reads, on a pool opened afresh (nothing cached).
"""

import os
import shutil
import tempfile

import grpc
import pytest

from conftest import report
from thinstore import Pool
from thinstore.frontends.csi import csi_pb2 as pb
from thinstore.frontends.csi import csi_pb2_grpc as pbg
from thinstore.frontends.csi.service import Plugin

GiB = 1 << 30
CS = 64 << 10
SIZE = 64 * GiB
PLACES = 8192


@pytest.fixture(scope="module")
def served():
    where = tempfile.mkdtemp(prefix="tscsib", dir="/tmp")
    pool_dir, sock = os.path.join(where, "pool"), os.path.join(where, "csi.sock")
    pool = Pool.create(pool_dir, 2 * GiB, CS, commit_interval=0, data_checksums=False)
    pool.create_volume("csi.bench", SIZE)
    step = SIZE // PLACES
    with pool.open_device("csi.bench") as dev:
        block = os.urandom(16 << 10)
        for i in range(PLACES):
            dev.pwrite(block, i * step)
        pool.snapshot("csi.bench@csi.base")
        for i in range(16):
            dev.pwrite(b"\x07" * 4096, (i * 509 % PLACES) * step)
        pool.snapshot("csi.bench@csi.target")
    pool.close()
    pool = Pool.open(pool_dir, commit_interval=0)
    plugin = Plugin(pool, pool_dir, "bench")
    plugin.start(f"unix://{sock}")
    channel = grpc.insecure_channel(f"unix:{sock}")
    yield pool, pbg.SnapshotMetadataStub(channel)
    channel.close()
    plugin.stop()
    pool.close()
    shutil.rmtree(where, ignore_errors=True)


def _delta(stub):
    req = pb.GetMetadataDeltaRequest(base_snapshot_id="csi.bench@csi.base",
                                     target_snapshot_id="csi.bench@csi.target")
    return sum(len(m.block_metadata) for m in stub.GetMetadataDelta(req))


def _allocated(stub):
    req = pb.GetMetadataAllocatedRequest(snapshot_id="csi.bench@csi.target")
    return sum(len(m.block_metadata) for m in stub.GetMetadataAllocated(req))


def test_delta(benchmark, served, results):
    pool, stub = served
    before = pool.md.maps.counters["pages_read"]
    assert _delta(stub) == 16
    results["delta_pages"] = pool.md.maps.counters["pages_read"] - before
    benchmark(_delta, stub)
    results["delta"] = benchmark.stats.stats.median


def test_allocated(benchmark, served, results):
    pool, stub = served
    before = pool.md.maps.counters["pages_read"]
    assert _allocated(stub) == PLACES
    pages = pool.md.maps.counters["pages_read"] - before
    benchmark.pedantic(_allocated, args=(stub,), rounds=5, iterations=1)
    allocated = benchmark.stats.stats.median
    report(f"csi metadata, 64 GiB volume, data in 2048 of its 2065 map pages, 16 chunks changed: "
           f"GetMetadataDelta {results['delta'] * 1e3:.2f} ms ({results['delta_pages']} map "
           f"pages read) vs GetMetadataAllocated {allocated * 1e3:.1f} ms ({pages} pages): "
           f"ratio {results['delta'] / allocated:.4f} (target << 1)")
