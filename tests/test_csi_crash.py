"""The plugin killed between a create and its reply, then restarted: the CO's retried
create returns the same volume or snapshot, and nothing is orphaned in the pool
(must-show 4).  The plugin dies at named points (THINSTORE_CSI_CRASH_AT, rpc.py):

    volume-recorded     the record is written, no device made yet
    clone-snapshotted   a volume clone's transient snapshot made, the clone not
    clone-made          the clone made, its transient snapshot not yet removed, not resized
    volume-made         everything done, the reply not sent
    snapshot-made       a snapshot made, the reply not sent
"""

from __future__ import annotations

import os

import grpc
import pytest

from csi_helpers import GiB, MiB, mount_cap, pb, plugin_env
from thinstore.frontends.csi.rpc import CRASH_ENV
from thinstore.frontends.csi.state import State
from thinstore.nbd.client import NBDDevice

# kills and restarts the plugin process: it tests the process, not the kernels, so CI
# runs it once (with the native kernels), not again on the pure-Python twins
pytestmark = pytest.mark.integration


def vol_source(vid):
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vid))


def clone_req():
    return pb.CreateVolumeRequest(
        name="pvc-clone", volume_capabilities=[mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=48 * MiB),
        volume_content_source=vol_source("csi.pvc-src"))


def plain_req():
    return pb.CreateVolumeRequest(name="pvc-new", volume_capabilities=[mount_cap()],
                                  capacity_range=pb.CapacityRange(required_bytes=24 * MiB))


def snap_req():
    return pb.CreateSnapshotRequest(name="snap-new", source_volume_id="csi.pvc-src")


TEMP = "csi.pvc-src@tmp.csi.pvc-clone"
#: point -> (call, request, the device it makes, the devices besides the source a crash
#: at that point leaves in the pool)
CASES = {
    "volume-recorded": ("CreateVolume", plain_req, "csi.pvc-new", set()),
    "volume-made": ("CreateVolume", plain_req, "csi.pvc-new", {"csi.pvc-new"}),
    "clone-snapshotted": ("CreateVolume", clone_req, "csi.pvc-clone", {TEMP}),
    "clone-made": ("CreateVolume", clone_req, "csi.pvc-clone", {TEMP, "csi.pvc-clone"}),
    "volume-made-clone": ("CreateVolume", clone_req, "csi.pvc-clone", {"csi.pvc-clone"}),
    "snapshot-made": ("CreateSnapshot", snap_req, "csi.pvc-src@csi.snap-new",
                      {"csi.pvc-src@csi.snap-new"}),
}


@pytest.mark.parametrize("point", sorted(CASES))
def test_a_create_cut_short_by_a_crash_is_finished_by_its_retry(point):
    method, make_req, made, left = CASES[point]
    with plugin_env(capacity=1 * GiB) as env:
        src = env.client.create("pvc-src", 32 * MiB)
        with NBDDevice(os.path.join(env.dir, "nbd.sock"), src.volume_id) as dev:
            dev.pwrite(b"origin data" * 1000, 5 * MiB)
            dev.flush()
        env.restart({CRASH_ENV: point.replace("-clone", "")})
        with pytest.raises(grpc.RpcError) as err:
            getattr(env.client.controller, method)(make_req(), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE        # the plugin died
        assert env.plugin.wait() == 86
        env.stop_plugin()
        assert set(env.devices()) == {"csi.pvc-src"} | left       # the crash's half-work
        env.start()
        first = getattr(env.client.controller, method)(make_req(), timeout=30)
        again = getattr(env.client.controller, method)(make_req(), timeout=30)
        assert first == again
        answer = first.volume if method == "CreateVolume" else first.snapshot
        assert (answer.volume_id if method == "CreateVolume" else answer.snapshot_id) == made
        if method == "CreateVolume" and make_req().HasField("volume_content_source"):
            assert answer.capacity_bytes == 48 * MiB
            with NBDDevice(os.path.join(env.dir, "nbd.sock"), made) as dev:
                assert dev.pread(5 * MiB, 11) == b"origin data"
        env.stop_plugin()
        assert sorted(env.devices()) == sorted({"csi.pvc-src", made})  # nothing orphaned
        state = State(os.path.join(env.pool_dir, "csi"))
        ids = {r["id"] for kind in ("volumes", "snapshots") for _, r in state.items(kind)}
        assert ids == {"csi.pvc-src", made}
