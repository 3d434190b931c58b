"""The CSI Identity and Controller services through a grpcio client on the plugin's unix
socket, as csi-sanity drives a plugin: every call, its successes, the error codes the
spec names for it (spec.md, each call's "Errors" table) and idempotency by name."""

from __future__ import annotations

import os

import grpc
import pytest

from csi_helpers import (GiB, MiB, Mode, block_cap, mount_cap, once_released, pb, plugin_env,
                         status_of)
from thinstore.frontends.csi import state as csi_state
from thinstore.nbd.client import NBDDevice

C = grpc.StatusCode


@pytest.fixture(scope="module")
def env():
    with plugin_env(capacity=4 * GiB) as e:
        yield e


@pytest.fixture
def c(env):
    return env.client


def snap_source(sid):
    return pb.VolumeContentSource(snapshot=pb.VolumeContentSource.SnapshotSource(snapshot_id=sid))


def vol_source(vid):
    return pb.VolumeContentSource(volume=pb.VolumeContentSource.VolumeSource(volume_id=vid))


def create_req(name, size=64 * MiB, limit=0, caps=None, **kw):
    return pb.CreateVolumeRequest(
        name=name, volume_capabilities=caps or [mount_cap()],
        capacity_range=pb.CapacityRange(required_bytes=size, limit_bytes=limit), **kw)


# ------------------------------------------------------------------------------ Identity

def test_identity_names_the_plugin_and_its_services(c):
    info = c.identity.GetPluginInfo(pb.GetPluginInfoRequest())
    assert info.name == "csi.thinstore.dev" and info.vendor_version
    caps = c.identity.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest()).capabilities
    services = {cap.service.type for cap in caps if cap.HasField("service")}
    T = pb.PluginCapability.Service.Type
    assert {T.CONTROLLER_SERVICE, T.VOLUME_ACCESSIBILITY_CONSTRAINTS,
            T.SNAPSHOT_METADATA_SERVICE} <= services
    assert c.identity.Probe(pb.ProbeRequest()).ready.value is True


def test_controller_capabilities(c):
    caps = c.controller.ControllerGetCapabilities(pb.ControllerGetCapabilitiesRequest())
    R = pb.ControllerServiceCapability.RPC.Type
    got = {cap.rpc.type for cap in caps.capabilities}
    assert {R.CREATE_DELETE_VOLUME, R.LIST_VOLUMES, R.GET_CAPACITY, R.CREATE_DELETE_SNAPSHOT,
            R.LIST_SNAPSHOTS, R.CLONE_VOLUME, R.EXPAND_VOLUME, R.GET_VOLUME} <= got
    assert R.PUBLISH_UNPUBLISH_VOLUME not in got     # node-local: nothing to attach


# ------------------------------------------------------------------------------ CreateVolume

def test_create_volume_is_idempotent_by_name(c):
    first = c.controller.CreateVolume(create_req("pvc-idem", 10 * MiB + 1)).volume
    assert first.capacity_bytes >= 10 * MiB + 1
    assert first.accessible_topology[0].segments["topology.csi.thinstore.dev/node"] == "node-1"
    again = c.controller.CreateVolume(create_req("pvc-idem", 10 * MiB + 1)).volume
    assert again == first
    # a range the existing volume satisfies is the same volume too
    assert c.controller.CreateVolume(create_req("pvc-idem", 1 * MiB)).volume == first


@pytest.mark.parametrize("change", ["size", "params", "source"])
def test_create_volume_same_name_other_request_is_already_exists(c, change):
    name = f"pvc-clash-{change}"
    base = c.create(name, 16 * MiB)
    if change == "size":
        req = create_req(name, 32 * MiB)
    elif change == "params":
        req = create_req(name, 16 * MiB, parameters={"overcommit": "10"})
    else:
        req = create_req(name, 16 * MiB, volume_content_source=vol_source(base.volume_id))
    assert status_of(c.controller.CreateVolume, req) == C.ALREADY_EXISTS


def test_create_volume_honours_an_exact_range_and_rejects_impossible_ones(c):
    exact = c.controller.CreateVolume(create_req("pvc-exact", 5 * MiB + 4096,
                                                 5 * MiB + 4096)).volume
    assert exact.capacity_bytes == 5 * MiB + 4096
    assert status_of(c.controller.CreateVolume,
                     create_req("pvc-range", 8 * MiB, 4 * MiB)) == C.OUT_OF_RANGE
    assert status_of(c.controller.CreateVolume, create_req("pvc-huge", 1 << 62)) == C.OUT_OF_RANGE


def test_create_volume_refuses_sizes_its_file_system_cannot_take(c):
    """A capacity below what the mount capability's mkfs takes is an unsupported
    capacity_range (OUT_OF_RANGE); one whose mkfs metadata would not fit the pool's free
    space is RESOURCE_EXHAUSTED (ext4 at 100 TiB writes ~4.5 GiB; this pool has 4 GiB);
    a block volume has no file system: neither applies.  Nothing is made."""
    with pytest.raises(grpc.RpcError) as err:
        c.controller.CreateVolume(create_req("pvc-tinyx", 64 * MiB, caps=[mount_cap("xfs")]))
    assert err.value.code() == C.OUT_OF_RANGE and "xfs needs at least 300M" in \
        err.value.details(), err.value.details()
    assert status_of(c.controller.CreateVolume, create_req("pvc-tiny", MiB)) == C.OUT_OF_RANGE
    with pytest.raises(grpc.RpcError) as err:
        c.controller.CreateVolume(create_req("pvc-vast", 100 << 40))
    assert err.value.code() == C.RESOURCE_EXHAUSTED and "metadata" in err.value.details()
    names = {v.volume.volume_id for v in
             c.controller.ListVolumes(pb.ListVolumesRequest()).entries}
    assert not any(n.endswith(("tinyx", "tiny", "vast")) for n in names), names
    vast = c.controller.CreateVolume(create_req("pvc-vastx", 100 << 40,
                                                caps=[mount_cap("xfs")])).volume
    block = c.controller.CreateVolume(create_req("pvc-tinyblock", MiB,
                                                 caps=[block_cap()])).volume
    for vol in (vast, block):
        c.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_create_volume_only_where_the_topology_allows(c):
    key = "topology.csi.thinstore.dev/node"
    here = pb.TopologyRequirement(requisite=[pb.Topology(segments={key: "node-9"}),
                                             pb.Topology(segments={key: "node-1"})])
    vol = c.controller.CreateVolume(create_req("pvc-topo", accessibility_requirements=here))
    assert vol.volume.accessible_topology[0].segments[key] == "node-1"
    elsewhere = pb.TopologyRequirement(requisite=[pb.Topology(segments={key: "node-9"})])
    assert status_of(c.controller.CreateVolume, create_req(
        "pvc-topo-2", accessibility_requirements=elsewhere)) == C.RESOURCE_EXHAUSTED


def test_create_volume_without_a_range_gets_the_default(c):
    req = pb.CreateVolumeRequest(name="pvc-default", volume_capabilities=[block_cap()])
    assert c.controller.CreateVolume(req).volume.capacity_bytes == 1 * GiB


@pytest.mark.parametrize("req", [
    pb.CreateVolumeRequest(volume_capabilities=[mount_cap()]),                  # no name
    pb.CreateVolumeRequest(name="pvc-nocaps"),                                   # no caps
    pb.CreateVolumeRequest(name="pvc-mode", volume_capabilities=[
        mount_cap(mode=Mode.MULTI_NODE_MULTI_WRITER)]),
    pb.CreateVolumeRequest(name="pvc-noaccess", volume_capabilities=[pb.VolumeCapability(
        access_mode=pb.VolumeCapability.AccessMode(mode=Mode.SINGLE_NODE_WRITER))]),
    pb.CreateVolumeRequest(name="pvc-fs", volume_capabilities=[mount_cap("vfat9")]),
    pb.CreateVolumeRequest(name="pvc-param", volume_capabilities=[mount_cap()],
                           parameters={"replicas": "3"}),
    pb.CreateVolumeRequest(name="x" * 129, volume_capabilities=[mount_cap()]),
    pb.CreateVolumeRequest(name="bad\x01name", volume_capabilities=[mount_cap()]),
], ids=["no-name", "no-caps", "multi-node", "no-access-type", "fs-type", "parameter",
        "long-name", "control-char"])
def test_create_volume_invalid_argument(c, req):
    assert status_of(c.controller.CreateVolume, req) == C.INVALID_ARGUMENT


def test_create_volume_from_missing_sources_is_not_found(c):
    for source in (snap_source("csi.nope@csi.nope"), snap_source("garbage"),
                   vol_source("csi.nope"), vol_source("not-ours")):
        req = create_req("pvc-orphan", volume_content_source=source)
        assert status_of(c.controller.CreateVolume, req) == C.NOT_FOUND
    # the failed creates left the name free: another request under it succeeds
    assert c.create("pvc-orphan").volume_id == "csi.pvc-orphan"


def test_any_unicode_name_maps_to_a_volume_and_back(c, env):
    names = ["pvc/with spaces:and@signs", "ünïcødé-名前", "é" * 64]
    vols = [c.create(n, 4 * MiB) for n in names]
    assert len({v.volume_id for v in vols}) == 3
    assert [c.create(n, 4 * MiB) for n in names] == vols
    listed = _all_volumes(c)
    assert all(v.volume_id in listed for v in vols)


def test_create_from_snapshot_and_volume_sizes(c):
    src = c.create("pvc-src-sz", 32 * MiB)
    snap = c.snapshot("snap-src-sz", src.volume_id)
    same = c.controller.CreateVolume(create_req(
        "pvc-from-snap-sz", 0, volume_content_source=snap_source(snap.snapshot_id))).volume
    assert same.capacity_bytes == 32 * MiB
    assert same.content_source.snapshot.snapshot_id == snap.snapshot_id
    bigger = c.controller.CreateVolume(create_req(
        "pvc-from-vol-sz", 48 * MiB, volume_content_source=vol_source(src.volume_id))).volume
    assert bigger.capacity_bytes == 48 * MiB
    assert status_of(c.controller.CreateVolume, create_req(
        "pvc-from-snap-small", 8 * MiB, 8 * MiB,
        volume_content_source=snap_source(snap.snapshot_id))) == C.OUT_OF_RANGE


# ------------------------------------------------------------------------------ DeleteVolume

def test_delete_volume_is_idempotent_and_frees_the_name(c):
    vol = c.create("pvc-del", 8 * MiB)
    c.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    c.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    c.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id="never-existed"))
    assert vol.volume_id not in _all_volumes(c)
    assert c.create("pvc-del", 16 * MiB).capacity_bytes == 16 * MiB   # new parameters ok
    assert status_of(c.controller.DeleteVolume, pb.DeleteVolumeRequest()) == C.INVALID_ARGUMENT


def test_delete_volume_in_use_is_failed_precondition(c, env):
    vol = c.create("pvc-busy", 8 * MiB)
    with NBDDevice(os.path.join(env.dir, "nbd.sock"), vol.volume_id):
        req = pb.DeleteVolumeRequest(volume_id=vol.volume_id)
        assert status_of(c.controller.DeleteVolume, req) == C.FAILED_PRECONDITION
        assert vol.volume_id in _all_volumes(c)
        expand = pb.ControllerExpandVolumeRequest(
            volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=16 * MiB))
        assert status_of(c.controller.ControllerExpandVolume, expand) == C.FAILED_PRECONDITION
        got = c.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
            volume_id=vol.volume_id))
        assert list(got.status.published_node_ids) == ["node-1"]
    once_released(c.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vol.volume_id))


def test_deleting_a_volume_keeps_its_snapshots(c):
    vol = c.create("pvc-parent", 8 * MiB)
    snap = c.snapshot("snap-of-parent", vol.volume_id)
    c.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=vol.volume_id))
    listed = c.controller.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=snap.snapshot_id))
    assert [e.snapshot.snapshot_id for e in listed.entries] == [snap.snapshot_id]
    restored = c.create("pvc-restored", 0, volume_content_source=snap_source(snap.snapshot_id))
    assert restored.capacity_bytes == 8 * MiB


# ------------------------------------------------------------------------------ Validate, Get

def test_validate_volume_capabilities(c):
    vol = c.create("pvc-validate", 8 * MiB)
    ok = c.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[mount_cap("xfs"), block_cap()]))
    assert len(ok.confirmed.volume_capabilities) == 2
    no = c.controller.ValidateVolumeCapabilities(pb.ValidateVolumeCapabilitiesRequest(
        volume_id=vol.volume_id, volume_capabilities=[block_cap(Mode.MULTI_NODE_MULTI_WRITER)]))
    assert not no.HasField("confirmed") and "one node" in no.message
    V = pb.ValidateVolumeCapabilitiesRequest
    assert status_of(c.controller.ValidateVolumeCapabilities,
                     V(volume_id="csi.none", volume_capabilities=[block_cap()])) == C.NOT_FOUND
    assert status_of(c.controller.ValidateVolumeCapabilities,
                     V(volume_capabilities=[block_cap()])) == C.INVALID_ARGUMENT
    assert status_of(c.controller.ValidateVolumeCapabilities,
                     V(volume_id=vol.volume_id)) == C.INVALID_ARGUMENT


def test_controller_get_volume(c):
    vol = c.create("pvc-get", 8 * MiB)
    got = c.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(volume_id=vol.volume_id))
    assert got.volume == vol and not got.status.volume_condition.abnormal
    assert status_of(c.controller.ControllerGetVolume,
                     pb.ControllerGetVolumeRequest(volume_id="csi.none")) == C.NOT_FOUND
    assert status_of(c.controller.ControllerGetVolume,
                     pb.ControllerGetVolumeRequest()) == C.INVALID_ARGUMENT


# ------------------------------------------------------------------------------ List, capacity

def _all_volumes(c, per=0):
    out, token = [], ""
    while True:
        resp = c.controller.ListVolumes(pb.ListVolumesRequest(max_entries=per,
                                                              starting_token=token))
        out += [e.volume.volume_id for e in resp.entries]
        token = resp.next_token
        if not token:
            return out


def test_list_volumes_pages_and_survives_a_deletion_between_pages(c):
    made = [c.create(f"pvc-page-{i}", 4 * MiB).volume_id for i in range(5)]
    everything = _all_volumes(c)
    assert _all_volumes(c, per=2) == everything and set(made) <= set(everything)
    first = c.controller.ListVolumes(pb.ListVolumesRequest(max_entries=2))
    assert len(first.entries) == 2 and first.next_token
    c.controller.DeleteVolume(pb.DeleteVolumeRequest(volume_id=first.next_token))
    rest = c.controller.ListVolumes(pb.ListVolumesRequest(starting_token=first.next_token))
    seen = [e.volume.volume_id for e in first.entries] + [e.volume.volume_id for e in rest.entries]
    assert seen == [v for v in everything if v != first.next_token]


def test_list_volumes_bad_token_is_aborted_and_negative_max_invalid(c):
    L = pb.ListVolumesRequest
    assert status_of(c.controller.ListVolumes, L(starting_token="invalid-token")) == C.ABORTED
    assert status_of(c.controller.ListVolumes, L(max_entries=-1)) == C.INVALID_ARGUMENT


def test_get_capacity_is_the_pools_free_space(c, env):
    before = c.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity
    assert 0 < before <= 4 * GiB
    vol = c.create("pvc-capacity", 8 * MiB)
    with NBDDevice(os.path.join(env.dir, "nbd.sock"), vol.volume_id) as dev:
        dev.pwrite(b"\x5a" * (4 * MiB), 0)
        dev.flush()
    after = c.controller.GetCapacity(pb.GetCapacityRequest(
        volume_capabilities=[mount_cap()])).available_capacity
    assert after == before - 4 * MiB
    unsupported = c.controller.GetCapacity(pb.GetCapacityRequest(
        volume_capabilities=[block_cap(Mode.MULTI_NODE_MULTI_WRITER)]))
    assert unsupported.available_capacity == 0


# ------------------------------------------------------------------------------ snapshots

def test_create_snapshot_idempotent_and_errors(c):
    vol = c.create("pvc-snapsrc", 8 * MiB)
    other = c.create("pvc-snapother", 8 * MiB)
    snap = c.snapshot("snap-idem", vol.volume_id)
    assert snap.ready_to_use and snap.size_bytes == 8 * MiB
    assert snap.source_volume_id == vol.volume_id and snap.creation_time.seconds > 0
    assert c.snapshot("snap-idem", vol.volume_id) == snap
    S = pb.CreateSnapshotRequest
    assert status_of(c.controller.CreateSnapshot,
                     S(name="snap-idem", source_volume_id=other.volume_id)) == C.ALREADY_EXISTS
    assert status_of(c.controller.CreateSnapshot,
                     S(name="snap-x", source_volume_id="csi.none")) == C.NOT_FOUND
    assert status_of(c.controller.CreateSnapshot,
                     S(source_volume_id=vol.volume_id)) == C.INVALID_ARGUMENT
    assert status_of(c.controller.CreateSnapshot, S(name="snap-y")) == C.INVALID_ARGUMENT


def test_delete_snapshot_idempotent_in_use_and_missing_id(c, env):
    vol = c.create("pvc-snapdel", 8 * MiB)
    snap = c.snapshot("snap-del", vol.volume_id)
    D = pb.DeleteSnapshotRequest
    with NBDDevice(os.path.join(env.dir, "nbd.sock"), snap.snapshot_id):
        assert status_of(c.controller.DeleteSnapshot,
                         D(snapshot_id=snap.snapshot_id)) == C.FAILED_PRECONDITION
    once_released(c.controller.DeleteSnapshot, D(snapshot_id=snap.snapshot_id))
    c.controller.DeleteSnapshot(D(snapshot_id=snap.snapshot_id))
    c.controller.DeleteSnapshot(D(snapshot_id="never-existed"))
    assert status_of(c.controller.DeleteSnapshot, D()) == C.INVALID_ARGUMENT
    assert c.snapshot("snap-del", vol.volume_id).snapshot_id == snap.snapshot_id


def test_list_snapshots_filters_and_pages(c):
    vol = c.create("pvc-snaplist", 8 * MiB)
    made = [c.snapshot(f"snap-list-{i}", vol.volume_id).snapshot_id for i in range(3)]
    L = pb.ListSnapshotsRequest
    by_source = c.controller.ListSnapshots(L(source_volume_id=vol.volume_id))
    assert [e.snapshot.snapshot_id for e in by_source.entries] == sorted(made)
    one = c.controller.ListSnapshots(L(snapshot_id=made[1]))
    assert [e.snapshot.snapshot_id for e in one.entries] == [made[1]]
    assert not c.controller.ListSnapshots(L(snapshot_id="csi.no@csi.no")).entries
    page1 = c.controller.ListSnapshots(L(source_volume_id=vol.volume_id, max_entries=2))
    page2 = c.controller.ListSnapshots(L(source_volume_id=vol.volume_id,
                                         starting_token=page1.next_token))
    got = [e.snapshot.snapshot_id for e in list(page1.entries) + list(page2.entries)]
    assert got == sorted(made) and not page2.next_token
    assert status_of(c.controller.ListSnapshots, L(starting_token="invalid-token")) == C.ABORTED


# ------------------------------------------------------------------------------ expansion

def test_controller_expand_volume(c):
    vol = c.create("pvc-grow", 16 * MiB)
    E = pb.ControllerExpandVolumeRequest
    grown = c.controller.ControllerExpandVolume(E(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=40 * MiB),
        volume_capability=mount_cap()))
    assert grown.capacity_bytes == 40 * MiB and grown.node_expansion_required
    again = c.controller.ControllerExpandVolume(E(
        volume_id=vol.volume_id, capacity_range=pb.CapacityRange(required_bytes=40 * MiB),
        volume_capability=block_cap()))
    assert again.capacity_bytes == 40 * MiB and not again.node_expansion_required
    assert c.controller.ControllerGetVolume(pb.ControllerGetVolumeRequest(
        volume_id=vol.volume_id)).volume.capacity_bytes == 40 * MiB
    # idempotent by name afterwards: the record holds the new size
    assert c.create("pvc-grow", 16 * MiB).capacity_bytes == 40 * MiB
    assert status_of(c.controller.ControllerExpandVolume, E(
        volume_id=vol.volume_id,
        capacity_range=pb.CapacityRange(required_bytes=8 * MiB, limit_bytes=8 * MiB))) \
        == C.OUT_OF_RANGE
    assert status_of(c.controller.ControllerExpandVolume, E(
        volume_id="csi.none", capacity_range=pb.CapacityRange(required_bytes=MiB))) \
        == C.NOT_FOUND
    assert status_of(c.controller.ControllerExpandVolume,
                     E(volume_id=vol.volume_id)) == C.INVALID_ARGUMENT


# ------------------------------------------------------------------------------ full pool, restart

def test_full_pool_is_resource_exhausted():
    with plugin_env(capacity=16 * MiB) as env:
        c = env.client
        vol = c.create("pvc-filler", 64 * MiB)       # thin: more than the pool holds
        with NBDDevice(os.path.join(env.dir, "nbd.sock"), vol.volume_id) as dev:
            with pytest.raises(Exception):
                for i in range(32):
                    dev.pwrite(b"\x11" * MiB, i * MiB)
        assert c.controller.GetCapacity(pb.GetCapacityRequest()).available_capacity == 0
        assert status_of(c.controller.CreateVolume, create_req("pvc-more")) \
            == C.RESOURCE_EXHAUSTED
        assert status_of(c.controller.CreateSnapshot, pb.CreateSnapshotRequest(
            name="snap-full", source_volume_id=vol.volume_id)) == C.RESOURCE_EXHAUSTED
        once_released(c.controller.DeleteVolume, pb.DeleteVolumeRequest(volume_id=vol.volume_id))
        assert c.create("pvc-more").volume_id == "csi.pvc-more"


def test_overcommit_limits_what_volumes_promise():
    with plugin_env(capacity=64 * MiB) as env:
        c = env.client
        two = {"overcommit": "2"}
        c.create("pvc-oc-1", 100 * MiB, parameters=two)
        assert status_of(c.controller.CreateVolume, create_req(
            "pvc-oc-2", 40 * MiB, parameters=two)) == C.RESOURCE_EXHAUSTED
        assert c.create("pvc-oc-2", 28 * MiB, parameters=two).capacity_bytes == 28 * MiB
        assert c.create("pvc-oc-3", 40 * MiB).capacity_bytes == 40 * MiB   # no limit asked
        for bad in ("0", "-1", "lots", "inf", "nan"):
            assert status_of(c.controller.CreateVolume, create_req(
                "pvc-oc-bad", parameters={"overcommit": bad})) == C.INVALID_ARGUMENT


def test_idempotency_survives_a_restart():
    with plugin_env(capacity=1 * GiB) as env:
        vol = env.client.create("pvc-restart", 24 * MiB, parameters={"overcommit": "2"})
        snap = env.client.snapshot("snap-restart", vol.volume_id)
        env.restart()
        c = env.client
        assert c.create("pvc-restart", 24 * MiB, parameters={"overcommit": "2"}) == vol
        assert status_of(c.controller.CreateVolume, create_req("pvc-restart", 24 * MiB)) \
            == C.ALREADY_EXISTS
        assert c.snapshot("snap-restart", vol.volume_id) == snap


def test_a_damaged_state_file_stops_the_plugin_with_its_name():
    with plugin_env(capacity=1 * GiB) as env:
        env.client.create("pvc-state", 4 * MiB)
        env.stop_plugin()
        path = os.path.join(env.pool_dir, "csi", "state")
        raw = bytearray(open(path, "rb").read())
        raw[-3] ^= 0x20
        open(path, "wb").write(raw)
        with pytest.raises(RuntimeError, match="checksum"):
            env.start()
        assert csi_state.unpack(csi_state.pack({"volumes": {"a": {"id": "csi.a"}}})) \
            == {"volumes": {"a": {"id": "csi.a"}}, "snapshots": {}}
