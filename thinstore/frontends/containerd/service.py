"""The gRPC service containerd calls: containerd.services.snapshots.v1.Snapshots.

grpcio carries the transport (HTTP/2 on a unix socket) and protobuf the messages
(snapshots_pb2, generated from snapshots.proto beside it): gRPC framing is outside
thinstore's purpose, and these are the libraries containerd's own Python clients use.
The handlers are registered by hand (no generated *_pb2_grpc stubs), which ties the code to
grpcio's stable handler API rather than to the version of grpcio-tools that made the stubs.

Each handler turns the request into a call of :class:`~.snapshotter.Snapshotter` and its
errors into gRPC status codes, the ones containerd's errdefs understands:

    NoSuchDevice -> NOT_FOUND          DeviceExists -> ALREADY_EXISTS
    DeviceBusy   -> FAILED_PRECONDITION UsageError  -> INVALID_ARGUMENT
    PoolFull     -> RESOURCE_EXHAUSTED  any other   -> INTERNAL (logged)

A bad request never stops the server: the error goes back to that caller only.
"""

from __future__ import annotations

import logging
import os
from concurrent import futures

import grpc
from google.protobuf import empty_pb2

from thinstore.errors import DeviceBusy, DeviceExists, NoSuchDevice, PoolFull, UsageError

from . import snapshots_pb2 as pb

log = logging.getLogger("thinstore.snapshotter")

SERVICE = "containerd.services.snapshots.v1.Snapshots"

_CODES = ((NoSuchDevice, grpc.StatusCode.NOT_FOUND),
          (DeviceExists, grpc.StatusCode.ALREADY_EXISTS),
          (DeviceBusy, grpc.StatusCode.FAILED_PRECONDITION),
          (UsageError, grpc.StatusCode.INVALID_ARGUMENT),
          (PoolFull, grpc.StatusCode.RESOURCE_EXHAUSTED))

_KINDS = {"view": pb.VIEW, "active": pb.ACTIVE, "committed": pb.COMMITTED}


def _guarded(method):
    """Run a handler; answer the package's errors with their status code."""
    def handler(request, context):
        try:
            return method(request)
        except Exception as err:    # noqa: BLE001 - every failure goes back to the caller
            for cls, code in _CODES:
                if isinstance(err, cls):
                    context.abort(code, str(err))
            log.exception("%s failed", method.__name__)
            context.abort(grpc.StatusCode.INTERNAL, f"{type(err).__name__}: {err}")
    handler.__name__ = method.__name__
    return handler


def _mounts(mounts: list[dict]) -> list:
    return [pb.Mount(type=m["type"], source=m["source"], target=m["target"],
                     options=m["options"]) for m in mounts]


def _info(info: dict):
    msg = pb.Info(name=info["name"], parent=info["parent"], kind=_KINDS[info["kind"]],
                  labels=info["labels"])
    msg.created_at.FromNanoseconds(info["created"])
    msg.updated_at.FromNanoseconds(info["updated"])
    return msg


class SnapshotsService:
    """The handlers of the Snapshots service over one :class:`~.snapshotter.Snapshotter`."""

    def __init__(self, snapshotter):
        self.sn = snapshotter

    def Prepare(self, req):
        return pb.PrepareSnapshotResponse(
            mounts=_mounts(self.sn.prepare(req.key, req.parent, dict(req.labels))))

    def View(self, req):
        return pb.ViewSnapshotResponse(
            mounts=_mounts(self.sn.view(req.key, req.parent, dict(req.labels))))

    def Mounts(self, req):
        return pb.MountsResponse(mounts=_mounts(self.sn.mounts(req.key)))

    def Commit(self, req):
        self.sn.commit(req.name, req.key, dict(req.labels))
        return empty_pb2.Empty()

    def Remove(self, req):
        self.sn.remove(req.key)
        return empty_pb2.Empty()

    def Stat(self, req):
        return pb.StatSnapshotResponse(info=_info(self.sn.stat(req.key)))

    def Update(self, req):
        info = {"name": req.info.name, "labels": dict(req.info.labels)}
        return pb.UpdateSnapshotResponse(
            info=_info(self.sn.update(info, list(req.update_mask.paths))))

    def List(self, req):
        infos = [_info(i) for i in self.sn.list(list(req.filters))]
        # containerd's own server sends batches of 100; one message each keeps them small
        return iter([pb.ListSnapshotsResponse(info=infos[i:i + 100])
                     for i in range(0, len(infos), 100)])

    def Usage(self, req):
        size, inodes = self.sn.usage(req.key)
        return pb.UsageResponse(size=size, inodes=inodes)

    def Cleanup(self, req):
        self.sn.cleanup()
        return empty_pb2.Empty()

    def handler(self) -> grpc.GenericRpcHandler:
        unary = {"Prepare": pb.PrepareSnapshotRequest, "View": pb.ViewSnapshotRequest,
                 "Mounts": pb.MountsRequest, "Commit": pb.CommitSnapshotRequest,
                 "Remove": pb.RemoveSnapshotRequest, "Stat": pb.StatSnapshotRequest,
                 "Update": pb.UpdateSnapshotRequest, "Usage": pb.UsageRequest,
                 "Cleanup": pb.CleanupRequest}
        methods = {name: grpc.unary_unary_rpc_method_handler(
                       _guarded(getattr(self, name)), request_deserializer=cls.FromString,
                       response_serializer=lambda m: m.SerializeToString())
                   for name, cls in unary.items()}
        methods["List"] = grpc.unary_stream_rpc_method_handler(
            _guarded(self.List), request_deserializer=pb.ListSnapshotsRequest.FromString,
            response_serializer=lambda m: m.SerializeToString())
        return grpc.method_handlers_generic_handler(SERVICE, methods)


def serve(snapshotter, address: str, workers: int = 8) -> grpc.Server:
    """Start a gRPC server for ``snapshotter`` on unix socket ``address`` (mode 0600)."""
    if os.path.exists(address):
        os.unlink(address)      # a socket left by a killed predecessor
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers,
                                                    thread_name_prefix="snapshotter"))
    server.add_generic_rpc_handlers((SnapshotsService(snapshotter).handler(),))
    if server.add_insecure_port(f"unix://{address}") == 0:
        raise OSError(f"cannot listen on {address}")
    server.start()
    os.chmod(address, 0o600)
    return server
