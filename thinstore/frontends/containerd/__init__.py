"""containerd proxy snapshotter: image and container layers as thin snapshots.

``thinstore --pool DIR snapshotter --address SOCK`` serves containerd's snapshot API
(containerd.services.snapshots.v1.Snapshots) on unix socket SOCK; containerd loads it with::

    [proxy_plugins.thinstore]
      type = "snapshot"
      address = "SOCK"

Layout: service.py (gRPC), snapshotter.py (the API's semantics on the pool), store.py (keys
and records, transactions), filters.py (List's filters), snapshots.proto and its generated
snapshots_pb2.py.  Block devices come from the shared attach module
(thinstore.frontends.attach).  docs/containerd.md describes the whole.
"""

from __future__ import annotations

import argparse
import os

from thinstore.frontends import Frontend
from thinstore.units import parse_size

STATE_DIR = "containerd"            # under the pool directory
DEFAULT_SOCKET = "snapshotter.sock"
#: the ``snapshotter`` command's NBD connection limit: every active snapshot and view is
#: an attached device, and nbdfuse opens up to 4 connections for each (serve's own default,
#: 64, would stop at 16 containers)
SNAPSHOTTER_MAX_CONNECTIONS = 4096


class SnapshotterFrontend(Frontend):
    """containerd proxy snapshotter: layers as thin snapshots over gRPC (docs/containerd.md)."""

    name = "snapshotter"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("containerd snapshotter")
        g.add_argument("--address", metavar="SOCK",
                       help=f"gRPC unix socket (default POOL/{STATE_DIR}/{DEFAULT_SOCKET})")
        g.add_argument("--fs-type", choices=("ext4", "xfs"), default=None,
                       help="file system of the base volume, so of every layer (default: "
                       "the pool's; ext4 for a new one). Fixed when the base is first "
                       "made: another type on an existing pool is refused")
        g.add_argument("--base-size", type=parse_size, default=None, metavar="SIZE",
                       help="size of the base volume, so of every layer (default: the "
                       "pool's; 10G for a new one). Fixed when the base is first made: "
                       "another size on an existing pool is refused")
        if parser.prog.split()[-1] == "snapshotter":    # the command of its own, not serve
            parser.set_defaults(max_connections=SNAPSHOTTER_MAX_CONNECTIONS)

    def __init__(self, ctx, args):
        super().__init__(ctx, args)
        self.state_dir = os.path.join(ctx.pool_dir, STATE_DIR)
        self.address = os.path.abspath(args.address or os.path.join(self.state_dir,
                                                                   DEFAULT_SOCKET))
        self.server = None
        self.attacher = None

    def start(self) -> None:
        from .attacher import Attacher
        from .service import serve
        from .snapshotter import Snapshotter
        from .store import Store

        store = Store(self.state_dir)
        self.attacher = Attacher(self.ctx.nbd_socket, self.state_dir,
                                 server=self.ctx.nbd_server)
        snapshotter = Snapshotter(self.ctx.pool, store, self.attacher,
                                  fs_type=self.args.fs_type, base_size=self.args.base_size)
        snapshotter.start()
        self.server = serve(snapshotter, self.address)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=2).wait()
            self.server = None
            try:
                os.unlink(self.address)
            except OSError:
                pass
        if self.attacher is not None:
            self.attacher.close()

    def describe(self) -> list[str]:
        limit = getattr(self.args, "max_connections", None)
        room = f" (room for about {limit // 4} attached snapshots)" if limit else ""
        return [f"containerd snapshotter: {self.address}{room}"]
