"""The committed csi_pb2.py / csi_pb2_grpc.py match csi.proto (regenerate them with
tools/gen_csi_proto.sh), and csi.proto carries the spec's wire names and numbers."""

from __future__ import annotations

import os

import grpc
import pytest

from thinstore.frontends.csi import csi_pb2, csi_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROTO = "thinstore/frontends/csi/csi.proto"


def test_generated_modules_match_the_proto(tmp_path):
    protoc = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools is not installed")
    from google.protobuf import descriptor_pb2

    out = tmp_path / "csi.desc"
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    rc = protoc.main(["protoc", f"-I{ROOT}", f"-I{include}", f"--descriptor_set_out={out}",
                      os.path.join(ROOT, PROTO)])
    assert rc == 0
    compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
    _drop_json_names(compiled.message_type)      # the Python generator leaves them out
    committed = descriptor_pb2.FileDescriptorProto.FromString(csi_pb2.DESCRIPTOR.serialized_pb)
    assert compiled == committed, "csi_pb2.py is stale: run tools/gen_csi_proto.sh"
    channel = grpc.insecure_channel(f"unix:{tmp_path}/nothing.sock")   # never connects
    for service in compiled.service:
        servicer = getattr(csi_pb2_grpc, f"{service.name}Servicer")
        stub = getattr(csi_pb2_grpc, f"{service.name}Stub")(channel)
        for method in service.method:
            assert hasattr(servicer, method.name), f"csi_pb2_grpc.py lacks {method.name}"
            assert hasattr(stub, method.name), f"csi_pb2_grpc.py lacks {method.name}"
    channel.close()


def _drop_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


# (message, field) -> number, as the CSI spec publishes them (spec.md / csi.proto v1.x)
WIRE = {
    ("CreateVolumeRequest", "name"): 1, ("CreateVolumeRequest", "volume_capabilities"): 3,
    ("CreateVolumeRequest", "parameters"): 4, ("CreateVolumeRequest", "volume_content_source"): 6,
    ("Volume", "capacity_bytes"): 1, ("Volume", "volume_id"): 2,
    ("Volume", "accessible_topology"): 5, ("Snapshot", "ready_to_use"): 5,
    ("ListVolumesRequest", "starting_token"): 2, ("ListSnapshotsRequest", "snapshot_id"): 4,
    ("NodePublishVolumeRequest", "target_path"): 4, ("NodePublishVolumeRequest", "readonly"): 6,
    ("NodeStageVolumeRequest", "volume_capability"): 4, ("VolumeUsage", "unit"): 4,
    ("GetMetadataDeltaRequest", "starting_offset"): 3, ("GetMetadataDeltaRequest", "max_results"): 4,
    ("GetMetadataAllocatedResponse", "block_metadata"): 3, ("GetPluginCapabilitiesResponse",
                                                              "capabilities"): 1,
}


def test_wire_numbers_and_names_follow_the_spec():
    for (message, field), number in WIRE.items():
        desc = csi_pb2.DESCRIPTOR.message_types_by_name[message]
        assert desc.fields_by_name[field].number == number, (message, field)
    assert csi_pb2.DESCRIPTOR.package == "csi.v1"
    assert set(csi_pb2.DESCRIPTOR.services_by_name) == {"Identity", "Controller", "Node",
                                                        "SnapshotMetadata"}
    svc = csi_pb2.PluginCapability.Service.Type
    assert svc.SNAPSHOT_METADATA_SERVICE == 4 and svc.CONTROLLER_SERVICE == 1
    rpc = csi_pb2.ControllerServiceCapability.RPC.Type
    assert (rpc.CLONE_VOLUME, rpc.EXPAND_VOLUME, rpc.GET_VOLUME) == (7, 9, 12)
