"""The CSI plugin: one gRPC server on a unix socket with the Identity, Controller, Node
and SnapshotMetadata services over one pool (spec.md "RPC Interface").

:class:`Plugin` owns what the services share: the pool, the controller's records
(state.py, under ``POOL/csi/``), the node id and the topology that ties every volume to
the node whose pool holds it.  Controller and node run in the one process that owns
the pool, so a volume is usable only on this node (VOLUME_ACCESSIBILITY_CONSTRAINTS,
key :data:`TOPOLOGY_KEY`), the way local-volume CSI drivers are deployed (docs/csi.md).
"""

from __future__ import annotations

import contextlib
import os
import socket
from concurrent import futures

import grpc
from google.protobuf.wrappers_pb2 import BoolValue

from thinstore import __version__
from thinstore.errors import NoSuchDevice, UsageError

from . import csi_pb2 as pb
from . import csi_pb2_grpc as pbg
from . import ids
from .controller import Controller
from .metadata import SnapshotMetadata
from .node import Node
from .rpc import Code, RPCError, handler
from .state import State

PLUGIN_NAME = "csi.thinstore.dev"
TOPOLOGY_KEY = "topology.csi.thinstore.dev/node"
WORKERS = 8


class Plugin:
    """Shared state of the services; ``start``/``stop`` run the gRPC server."""

    def __init__(self, pool, pool_dir: str, node_id: str, nbd_server=None,
                 nbd_socket: str | None = None):
        self.pool = pool
        self.pool_dir = pool_dir
        self.node_id = node_id
        self.nbd_server = nbd_server
        self.nbd_socket = nbd_socket
        self.state = State(os.path.join(pool_dir, "csi"))
        self.controller = Controller(self)
        self.node = Node(self) if nbd_socket else None     # block devices need the NBD socket
        self.server = None
        self.endpoint = None

    # -- what the services ask of each other
    def csi_name(self, name: str) -> str:
        try:
            return ids.check_csi_name(name)
        except ids.BadName as err:
            raise RPCError(Code.INVALID_ARGUMENT, str(err)) from None

    def size_of(self, device: str) -> int | None:
        """The device's size in bytes, None when there is no such device.  O(1): through a
        handle, not Pool.info, which counts the device's mapped chunks (reads its pages)."""
        try:
            with self.pool.open_device(device) as dev:
                return dev.size
        except (NoSuchDevice, UsageError):
            return None

    def exists(self, device: str) -> bool:
        return self.size_of(device) is not None

    def topology(self) -> list:
        return [pb.Topology(segments={TOPOLOGY_KEY: self.node_id})]

    def staged(self, volume_id: str) -> bool:
        return self.node is not None and self.node.staged(volume_id)

    def in_use(self, volume_id: str) -> bool:
        """Staged here, or open by any NBD client of the pool."""
        busy = self.nbd_server is not None and self.nbd_server.connections(volume_id) > 0
        return busy or self.staged(volume_id)

    def frozen(self, volume_id: str):
        """fsfreeze the volume's staged file system for a snapshot (a no-op when it is
        not mounted here); never entered with the pool lock held."""
        if self.node is None:
            return contextlib.nullcontext()
        return self.node.attacher.frozen(volume_id)

    def published_nodes(self, volume_id: str) -> list[str]:
        return [self.node_id] if self.in_use(volume_id) else []

    # -- serving
    def start(self, endpoint: str) -> str:
        """Recover, then listen on ``endpoint`` (``unix:///PATH``); returns the socket path."""
        self.controller.recover()
        if self.node is not None:
            self.node.recover()
        path = socket_path(endpoint)
        _remove_stale(path)
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=WORKERS,
                                                             thread_name_prefix="csi"))
        pbg.add_IdentityServicer_to_server(Identity(self), self.server)
        pbg.add_ControllerServicer_to_server(self.controller, self.server)
        pbg.add_SnapshotMetadataServicer_to_server(SnapshotMetadata(self), self.server)
        if self.node is not None:
            pbg.add_NodeServicer_to_server(self.node, self.server)
        if not self.server.add_insecure_port(f"unix:{path}"):
            raise OSError(f"cannot listen on {path}")
        self.server.start()
        os.chmod(path, 0o600)
        self.endpoint = path
        return path

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=2).wait()
            self.server = None
        if self.node is not None:
            self.node.close()


class Identity(pbg.IdentityServicer):
    """GetPluginInfo, GetPluginCapabilities, Probe (spec.md "Identity Service RPC")."""

    def __init__(self, plugin: Plugin):
        self.plugin = plugin

    @handler
    def GetPluginInfo(self, req, context):
        return pb.GetPluginInfoResponse(name=PLUGIN_NAME, vendor_version=__version__,
                                        manifest={"pool": self.plugin.pool.uuid})

    @handler
    def GetPluginCapabilities(self, req, context):
        svc = pb.PluginCapability.Service.Type
        out = [pb.PluginCapability(service=pb.PluginCapability.Service(type=t))
               for t in (svc.CONTROLLER_SERVICE, svc.VOLUME_ACCESSIBILITY_CONSTRAINTS,
                         svc.SNAPSHOT_METADATA_SERVICE)]
        out.append(pb.PluginCapability(volume_expansion=pb.PluginCapability.VolumeExpansion(
            type=pb.PluginCapability.VolumeExpansion.Type.OFFLINE)))
        return pb.GetPluginCapabilitiesResponse(capabilities=out)

    @handler
    def Probe(self, req, context):
        try:
            self.plugin.pool.status()
        except Exception as err:       # a closed or failed pool: not healthy
            raise RPCError(Code.FAILED_PRECONDITION, f"pool unavailable: {err}") from None
        return pb.ProbeResponse(ready=BoolValue(value=True))


def socket_path(endpoint: str) -> str:
    """The path of a ``unix://`` endpoint (spec.md "CSI_ENDPOINT"); a bare path too."""
    if endpoint.startswith("unix://"):
        path = endpoint[len("unix://"):]
    elif endpoint.startswith("unix:"):
        path = endpoint[len("unix:"):]
    elif "://" in endpoint:
        raise UsageError(f"endpoint {endpoint!r}: the CSI plugin listens on unix sockets "
                         "only (unix:///PATH)")
    else:
        path = endpoint
    if not path:
        raise UsageError(f"endpoint {endpoint!r} names no socket path")
    return os.path.abspath(path)


def _remove_stale(path: str) -> None:
    """Remove a socket a dead plugin left; refuse to steal one a live plugin answers on."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise UsageError(f"{path}: another process is serving there")
