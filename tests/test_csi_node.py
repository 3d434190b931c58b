"""The CSI Node service through the plugin's socket, with real block devices and mounts
(the attach module: nbdfuse + loop, or kernel NBD): every call, its errors, idempotency,
and the snapshot/clone story of a file system a workload wrote (must-show 2)."""

from __future__ import annotations

import errno
import os
import signal

import grpc
import pytest

from csi_helpers import (MiB, Mode, block_cap, in_process, mount_cap, pb, plugin_env,
                         publish_req, require_block_devices, stage_req, status_of)

pytestmark = pytest.mark.integration
C = grpc.StatusCode


@pytest.fixture(scope="module")
def env():
    require_block_devices()
    with in_process() as e:
        yield e


def snap_source(sid):
    return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=sid))


def vol_source(vid):
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vid))


def stage_and_publish(c, env, vid, name, cap=None, readonly=False):
    stg, tgt = env.path("staging", name), env.path("pods", name, "volume")
    c.node.NodeStageVolume(stage_req(vid, stg, cap))
    c.node.NodePublishVolume(publish_req(vid, stg, tgt, cap, readonly))
    return stg, tgt


def unpublish_and_unstage(c, vid, stg, tgt):
    c.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=tgt))
    c.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=stg))


def write(path, text):
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def read(path):
    with open(path) as f:
        return f.read()


# ------------------------------------------------------------------------------ must-show 2

def test_snapshot_of_a_mounted_volume_clones_without_copying_and_diverges(env):
    c, pool = env.client, env.pool
    origin = c.create("pvc-origin", 128 * MiB)
    stg, tgt = stage_and_publish(c, env, origin.volume_id, "origin")
    write(os.path.join(tgt, "greeting"), "written by the workload\n")
    os.makedirs(os.path.join(tgt, "dir"))
    write(os.path.join(tgt, "dir", "big"), "x" * (3 * MiB))
    snap = c.snapshot("snap-origin", origin.volume_id)       # frozen while taken
    # unmounted, the origin's file system stops writing in the background (ext4 zeroes
    # its inode tables lazily after a mount), so the counters show the clones' cost alone
    unpublish_and_unstage(c, origin.volume_id, stg, tgt)
    before, used = dict(pool.counters), pool.status()["used"]
    from_snap = c.create("pvc-from-snap", 0, volume_content_source=snap_source(snap.snapshot_id))
    from_vol = c.create("pvc-from-vol", 0, volume_content_source=vol_source(origin.volume_id))
    after = dict(pool.counters)
    for key in ("chunks_allocated", "chunks_copied", "bytes_copied", "bytes_written"):
        assert after[key] == before[key], key               # no data chunk written or copied
    assert pool.status()["used"] == used                    # and none allocated
    for vol in (from_snap, from_vol):
        info = pool.info(vol.volume_id)
        assert info.exclusive == 0 and info.shared == info.used > 3 * MiB
    stg, tgt = stage_and_publish(c, env, origin.volume_id, "origin")
    clones = {}
    for vol, name in ((from_snap, "from-snap"), (from_vol, "from-vol")):
        clones[name] = (vol.volume_id, *stage_and_publish(c, env, vol.volume_id, name))
        t = clones[name][2]
        assert read(os.path.join(t, "greeting")) == "written by the workload\n"
        assert read(os.path.join(t, "dir", "big")) == "x" * (3 * MiB)
    write(os.path.join(tgt, "greeting"), "origin moved on\n")
    for name, (_vid, _s, t) in clones.items():
        write(os.path.join(t, "greeting"), f"{name} moved on\n")
        write(os.path.join(t, name), name)
    assert read(os.path.join(tgt, "greeting")) == "origin moved on\n"
    for name, (_vid, _s, t) in clones.items():
        assert read(os.path.join(t, "greeting")) == f"{name} moved on\n"
        others = {"from-snap", "from-vol"} - {name}
        assert not any(os.path.exists(os.path.join(t, o)) for o in others)
    assert not os.path.exists(os.path.join(tgt, "from-snap"))
    for vid, s, t in clones.values():
        unpublish_and_unstage(c, vid, s, t)
    unpublish_and_unstage(c, origin.volume_id, stg, tgt)


# ------------------------------------------------------------------------------ each call

def test_stage_and_publish_are_idempotent_and_refuse_conflicts(env):
    c = env.client
    vol = c.create("pvc-node-idem", 64 * MiB)
    vid = vol.volume_id
    stg, tgt = stage_and_publish(c, env, vid, "idem")
    c.node.NodeStageVolume(stage_req(vid, stg))                       # again: OK
    c.node.NodePublishVolume(publish_req(vid, stg, tgt))              # again: OK
    assert status_of(c.node.NodeStageVolume, stage_req(vid, env.path("elsewhere"))) \
        == C.ALREADY_EXISTS
    assert status_of(c.node.NodeStageVolume, stage_req(vid, stg, block_cap())) \
        == C.ALREADY_EXISTS
    assert status_of(c.node.NodePublishVolume, publish_req(vid, stg, tgt, readonly=True)) \
        == C.ALREADY_EXISTS
    second = env.path("pods", "idem-2", "volume")
    c.node.NodePublishVolume(publish_req(vid, stg, second))          # SINGLE_NODE_WRITER: ok
    write(os.path.join(second, "shared"), "one file system")
    assert read(os.path.join(tgt, "shared")) == "one file system"
    assert status_of(c.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(
        volume_id=vid, staging_target_path=stg)) == C.FAILED_PRECONDITION    # still published
    for t in (tgt, second):
        for _ in range(2):
            c.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=t))
        assert not os.path.exists(t)
    for _ in range(2):
        c.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid,
                                                             staging_target_path=stg))
    assert not os.path.ismount(stg)


def test_single_writer_refuses_a_second_target(env):
    c = env.client
    cap = mount_cap(mode=Mode.SINGLE_NODE_SINGLE_WRITER)
    vid = c.create("pvc-single", 64 * MiB, caps=[cap]).volume_id
    stg, tgt = stage_and_publish(c, env, vid, "single", cap)
    other = env.path("pods", "single-2", "volume")
    assert status_of(c.node.NodePublishVolume, publish_req(vid, stg, other, cap)) \
        == C.FAILED_PRECONDITION
    unpublish_and_unstage(c, vid, stg, tgt)


def test_read_only_publish_refuses_writes(env):
    c = env.client
    vid = c.create("pvc-ro", 64 * MiB).volume_id
    stg, tgt = stage_and_publish(c, env, vid, "ro-rw")
    write(os.path.join(tgt, "kept"), "data")
    ro = env.path("pods", "ro", "volume")
    c.node.NodePublishVolume(publish_req(vid, stg, ro, readonly=True))
    assert read(os.path.join(ro, "kept")) == "data"
    with pytest.raises(OSError) as err:
        write(os.path.join(ro, "new"), "nope")
    assert err.value.errno == errno.EROFS
    c.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=ro))
    unpublish_and_unstage(c, vid, stg, tgt)


def test_raw_block_publishes_the_device_node(env):
    c = env.client
    cap = block_cap()
    vid = c.create("pvc-block", 32 * MiB, caps=[cap]).volume_id
    stg, tgt = stage_and_publish(c, env, vid, "block", cap)
    assert os.path.exists(tgt) and not os.path.isdir(tgt)
    fd = os.open(tgt, os.O_RDWR)
    try:
        assert os.lseek(fd, 0, os.SEEK_END) == 32 * MiB
        os.pwrite(fd, b"raw block bytes!" * 256, 5 * MiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    stats = c.node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id=vid,
                                                                  volume_path=tgt))
    assert stats.usage[0].total == 32 * MiB
    unpublish_and_unstage(c, vid, stg, tgt)
    assert not os.path.exists(tgt)
    with env.pool.open_device(vid) as dev:
        assert dev.pread(5 * MiB, 16) == b"raw block bytes!"


def test_a_publish_of_another_access_type_than_the_stage_is_refused(env):
    """A volume staged as a raw block device and published with a mount capability got
    its device node bound at the target (a file where the pod expects a directory), and
    one staged as a file system published as block got a directory: both are refused,
    as the CSI reference driver (csi-driver-host-path) refuses them, and nothing is left
    at the target."""
    c = env.client
    for staged, asked in ((block_cap(), mount_cap()), (mount_cap(), block_cap())):
        kind = staged.WhichOneof("access_type")
        vid = c.create(f"pvc-as-{kind}", 32 * MiB, caps=[staged]).volume_id
        stg, tgt = env.path("staging", f"as-{kind}"), env.path("pods", f"as-{kind}", "v")
        c.node.NodeStageVolume(stage_req(vid, stg, staged))
        assert status_of(c.node.NodePublishVolume,
                         publish_req(vid, stg, tgt, asked)) == C.INVALID_ARGUMENT
        assert not os.path.lexists(tgt)
        c.node.NodePublishVolume(publish_req(vid, stg, tgt, staged))   # as staged: fine
        unpublish_and_unstage(c, vid, stg, tgt)


def test_volume_stats_bytes_and_inodes(env):
    c = env.client
    vid = c.create("pvc-stats", 64 * MiB).volume_id
    stg, tgt = stage_and_publish(c, env, vid, "stats")
    S = pb.NodeGetVolumeStatsRequest
    empty = c.node.NodeGetVolumeStats(S(volume_id=vid, volume_path=tgt))
    for i in range(20):
        write(os.path.join(tgt, f"f{i}"), "y" * 100_000)
    full = c.node.NodeGetVolumeStats(S(volume_id=vid, volume_path=tgt))
    units = {u.unit: u for u in full.usage}
    assert set(units) == {pb.VolumeUsage.BYTES, pb.VolumeUsage.INODES}
    assert units[pb.VolumeUsage.BYTES].used >= {u.unit: u for u in empty.usage}[
        pb.VolumeUsage.BYTES].used + 2_000_000
    assert units[pb.VolumeUsage.INODES].used >= 20 and not full.volume_condition.abnormal
    assert status_of(c.node.NodeGetVolumeStats, S(volume_id=vid, volume_path="some/path")) \
        == C.NOT_FOUND
    assert status_of(c.node.NodeGetVolumeStats, S(volume_id="csi.none", volume_path=tgt)) \
        == C.NOT_FOUND
    assert status_of(c.node.NodeGetVolumeStats, S(volume_path=tgt)) == C.INVALID_ARGUMENT
    assert status_of(c.node.NodeGetVolumeStats, S(volume_id=vid)) == C.INVALID_ARGUMENT
    unpublish_and_unstage(c, vid, stg, tgt)


def df_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_offline_expansion_then_the_file_system_grows(env, fs):
    """After ControllerExpandVolume the next stage shows the new size in df (ext4 grown
    before it is mounted, so no CAP_SYS_RESOURCE is needed); NodeExpandVolume after it
    has nothing left to do and says so with the size."""
    c = env.client
    cap = mount_cap(fs)
    vid = c.create(f"pvc-expand-{fs}", 320 * MiB, caps=[cap]).volume_id
    stg, tgt = stage_and_publish(c, env, vid, "expand", cap)
    write(os.path.join(tgt, "keep"), "before growing")
    small = df_bytes(tgt)
    E = pb.ControllerExpandVolumeRequest
    grow = E(volume_id=vid, capacity_range=pb.CapacityRange(required_bytes=1024 * MiB),
             volume_capability=cap)
    assert status_of(c.controller.ControllerExpandVolume, grow) == C.FAILED_PRECONDITION
    unpublish_and_unstage(c, vid, stg, tgt)
    assert c.controller.ControllerExpandVolume(grow).node_expansion_required
    stg, tgt = stage_and_publish(c, env, vid, "expand", cap)
    assert df_bytes(tgt) > 2 * small, "the stage after an expansion kept the old size"
    got = c.node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id=vid, volume_path=tgt, capacity_range=grow.capacity_range))
    assert got.capacity_bytes == 1024 * MiB
    assert df_bytes(tgt) > 2 * small and read(os.path.join(tgt, "keep")) == "before growing"
    N = pb.NodeExpandVolumeRequest
    assert status_of(c.node.NodeExpandVolume, N(volume_id="csi.none", volume_path=tgt)) \
        == C.NOT_FOUND
    assert status_of(c.node.NodeExpandVolume, N(volume_id=vid)) == C.INVALID_ARGUMENT
    unpublish_and_unstage(c, vid, stg, tgt)


@pytest.mark.parametrize("fs", ["ext4", "xfs"])
def test_a_clone_made_larger_than_its_snapshot_shows_its_full_size(env, fs):
    """CreateVolume from a snapshot with a larger capacity: the clone's file system is
    grown at its stage, so df in the pod shows the capacity asked for, with the data."""
    c = env.client
    cap = mount_cap(fs)
    vid = c.create(f"pvc-small-{fs}", 320 * MiB, caps=[cap]).volume_id
    stg, tgt = stage_and_publish(c, env, vid, f"small-{fs}", cap)
    write(os.path.join(tgt, "keep"), "in the snapshot")
    small = df_bytes(tgt)
    sid = c.snapshot(f"snap-small-{fs}", vid).snapshot_id
    unpublish_and_unstage(c, vid, stg, tgt)
    clone = c.create(f"pvc-large-{fs}", 1024 * MiB, caps=[cap],
                     volume_content_source=snap_source(sid)).volume_id
    stg, tgt = stage_and_publish(c, env, clone, f"large-{fs}", cap)
    assert df_bytes(tgt) > 2 * small, (df_bytes(tgt), small)
    assert read(os.path.join(tgt, "keep")) == "in the snapshot"
    unpublish_and_unstage(c, clone, stg, tgt)


def test_node_argument_errors_and_unknown_volumes(env):
    c = env.client
    vid = c.create("pvc-node-errors", 16 * MiB).volume_id
    stg, tgt = env.path("staging", "errs"), env.path("pods", "errs", "volume")
    cases = [
        (c.node.NodeStageVolume, pb.NodeStageVolumeRequest(staging_target_path=stg,
                                                           volume_capability=mount_cap())),
        (c.node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id=vid,
                                                           volume_capability=mount_cap())),
        (c.node.NodeStageVolume, pb.NodeStageVolumeRequest(volume_id=vid,
                                                           staging_target_path=stg)),
        (c.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(staging_target_path=stg)),
        (c.node.NodeUnstageVolume, pb.NodeUnstageVolumeRequest(volume_id=vid)),
        (c.node.NodePublishVolume, publish_req("", stg, tgt)),
        (c.node.NodePublishVolume, publish_req(vid, stg, "")),
        (c.node.NodePublishVolume, pb.NodePublishVolumeRequest(
            volume_id=vid, staging_target_path=stg, target_path=tgt)),
        (c.node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(target_path=tgt)),
        (c.node.NodeUnpublishVolume, pb.NodeUnpublishVolumeRequest(volume_id=vid)),
    ]
    for call, req in cases:
        assert status_of(call, req) == C.INVALID_ARGUMENT, req
    assert status_of(c.node.NodeStageVolume, stage_req("csi.none", stg)) == C.NOT_FOUND
    assert status_of(c.node.NodePublishVolume, publish_req("csi.none", stg, tgt)) == C.NOT_FOUND
    assert status_of(c.node.NodePublishVolume, publish_req(vid, stg, tgt)) \
        == C.FAILED_PRECONDITION                                        # not staged
    assert status_of(c.node.NodePublishVolume, publish_req(vid, "", tgt)) \
        == C.FAILED_PRECONDITION
    assert status_of(c.node.NodeStageVolume, stage_req(
        vid, stg, mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER))) == C.FAILED_PRECONDITION
    c.node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id=vid, target_path=tgt))
    c.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=stg))


def test_node_info_and_capabilities(env):
    c = env.client
    info = c.node.NodeGetInfo(pb.NodeGetInfoRequest())
    assert info.node_id == "node-1"
    assert info.accessible_topology.segments["topology.csi.thinstore.dev/node"] == "node-1"
    R = pb.NodeServiceCapability.RPC.Type
    got = {cap.rpc.type for cap in c.node.NodeGetCapabilities(
        pb.NodeGetCapabilitiesRequest()).capabilities}
    assert {R.STAGE_UNSTAGE_VOLUME, R.GET_VOLUME_STATS, R.EXPAND_VOLUME} <= got


def test_a_blank_volume_gets_a_file_system_once_and_keeps_its_data(env):
    c = env.client
    vid = c.create("pvc-mkfs-once", 64 * MiB).volume_id
    stg, tgt = stage_and_publish(c, env, vid, "mkfs")
    write(os.path.join(tgt, "survives"), "restaging must not format")
    unpublish_and_unstage(c, vid, stg, tgt)
    stg, tgt = stage_and_publish(c, env, vid, "mkfs")
    assert read(os.path.join(tgt, "survives")) == "restaging must not format"
    unpublish_and_unstage(c, vid, stg, tgt)


def test_data_without_a_file_system_is_never_formatted(env):
    c = env.client
    vid = c.create("pvc-raw-data", 32 * MiB, caps=[block_cap()]).volume_id
    payload = os.urandom(1 << 20)
    with env.pool.open_device(vid) as dev:
        dev.pwrite(payload, 0)
    stg = env.path("staging", "raw-data")
    with pytest.raises(grpc.RpcError) as err:
        c.node.NodeStageVolume(stage_req(vid, stg), timeout=60)
    assert "refusing" in err.value.details()
    with env.pool.open_device(vid) as dev:
        assert dev.pread(0, 1 << 20) == payload
    c.node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id=vid, staging_target_path=stg))
    assert not os.path.ismount(stg)


# ------------------------------------------------------------------------------ restarts

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_restarted_plugin_stages_and_publishes_its_volumes_again(sig):
    require_block_devices()
    with plugin_env() as env:
        c = env.client
        vid = c.create("pvc-survivor", 64 * MiB).volume_id
        stg, tgt = os.path.join(env.dir, "stg"), os.path.join(env.dir, "pod", "vol")
        c.node.NodeStageVolume(stage_req(vid, stg))
        c.node.NodePublishVolume(publish_req(vid, stg, tgt))
        write(os.path.join(tgt, "state"), "before the crash")
        env.plugin.proc.send_signal(sig)
        env.plugin.wait()
        env.stop_plugin()
        env.start()
        c = env.client
        assert read(os.path.join(tgt, "state")) == "before the crash"
        c.node.NodeStageVolume(stage_req(vid, stg))                  # the CO's retry: OK
        c.node.NodePublishVolume(publish_req(vid, stg, tgt))
        write(os.path.join(tgt, "state"), "after the restart")
        unpublish_and_unstage(c, vid, stg, tgt)
        assert not os.path.exists(tgt) and not os.path.ismount(stg)
        c.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vid))
