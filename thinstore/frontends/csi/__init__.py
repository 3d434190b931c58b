"""The Kubernetes CSI plugin frontend: ``thinstore --pool DIR csi --endpoint unix:///PATH``.

Serves the CSI v1 Identity, Controller and Node services and the SnapshotMetadata
service (spec: github.com/container-storage-interface/spec) over grpcio on a unix
socket, in the process that owns the pool (``serve --frontend csi``).  Volumes are pool
volumes, VolumeSnapshots pool snapshots, clones O(map pages) pool clones, and the
changed-block metadata comes from the map diff.  docs/csi.md has the deployment, the
parameters and what each call does.  Modules:

    service.py     Plugin (the gRPC server) and the Identity service
    controller.py  the Controller service          state.py  its crash-safe records
    node.py        the Node service (block devices through thinstore.frontends.attach)
    metadata.py    the SnapshotMetadata service    ids.py    CSI names <-> device names
    caps.py        access modes, file systems, sizes, parameters
    rpc.py         status codes                    csi.proto and its generated modules
"""

from __future__ import annotations

import argparse
import os
import socket

from thinstore.frontends import Frontend, ServeContext


class CSIFrontend(Frontend):
    """Serve the pool as a Kubernetes CSI plugin (Identity, Controller, Node, SnapshotMetadata)."""

    name = "csi"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("CSI plugin")
        group.add_argument("--endpoint", metavar="unix:///PATH",
                           help="the CSI socket (default $CSI_ENDPOINT, else POOL/csi.sock)")
        group.add_argument("--node-id", metavar="ID",
                           help="this node's id in the cluster (default: the host name)")

    def __init__(self, ctx: ServeContext, args: argparse.Namespace):
        super().__init__(ctx, args)
        self.plugin = None
        self.path = None

    def start(self) -> None:
        from .service import Plugin

        endpoint = (getattr(self.args, "endpoint", None) or os.environ.get("CSI_ENDPOINT")
                    or "unix://" + os.path.join(self.ctx.pool_dir, "csi.sock"))
        node_id = getattr(self.args, "node_id", None) or socket.gethostname()
        self.plugin = Plugin(self.ctx.pool, self.ctx.pool_dir, node_id,
                             nbd_server=self.ctx.nbd_server, nbd_socket=self.ctx.nbd_socket)
        self.path = self.plugin.start(endpoint)
        self._hooks = getattr(self.ctx.control, "snapshot_hooks", None)
        if self._hooks is not None and self.plugin.node is not None:
            # `thinstore snapshot csi.X@s` through the control socket freezes a staged
            # file system too, as CreateSnapshot does
            self._hooks.append(self.plugin.node.attacher.snapshot_hook)

    def stop(self) -> None:
        hooks = getattr(self, "_hooks", None)
        if hooks is not None and self.plugin.node is not None:
            hook = self.plugin.node.attacher.snapshot_hook
            if hook in hooks:
                hooks.remove(hook)
        if self.plugin is not None:
            self.plugin.stop()

    def describe(self) -> list[str]:
        if not self.path:
            return []
        return [f"csi: unix://{self.path} (node {self.plugin.node_id})"]
