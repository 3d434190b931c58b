"""Frontends: the services that hand a served pool to someone else (DESIGN §7).

One process owns a pool (its lock).  ``thinstore serve`` opens it, starts the NBD server and
the control socket, and then every frontend it is asked for, in the same process:

    serve --frontend docker          the Docker volume plugin    (thinstore.frontends.docker)
    serve --frontend snapshotter     containerd's snapshotter    (thinstore.frontends.containerd)
    serve --frontend csi             the CSI plugin              (thinstore.frontends.csi)

Each frontend also has a command of its own (``docker-plugin``, ``snapshotter``, ``csi``),
which is ``serve`` with that frontend on.  A frontend is a package of its own that speaks
only the library's public API (:class:`thinstore.Pool`, :class:`thinstore.device.Device`
and the online operations) and the NBD server's socket, never the metadata internals.

A frontend module names its class in :data:`REGISTRY`; the class follows
:class:`Frontend`.  Heavy imports (grpc, an HTTP server) belong in ``start``, so that the
CLI's parser stays cheap to build.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
from dataclasses import dataclass, field

#: frontend name -> (module, class, the command that is ``serve`` with it on)
REGISTRY: dict[str, tuple[str, str, str]] = {
    "docker": ("thinstore.frontends.docker", "DockerVolumeFrontend", "docker-plugin"),
    "snapshotter": ("thinstore.frontends.containerd", "SnapshotterFrontend", "snapshotter"),
    "csi": ("thinstore.frontends.csi", "CSIFrontend", "csi"),
}


#: frontend -> what it calls its devices, for another frontend's messages
CLAIMS = {"csi": "the CSI plugin's (a Kubernetes volume or snapshot, docs/csi.md)",
          "snapshotter": "the containerd snapshotter's (an image layer or a container's "
                         "root file system, docs/containerd.md)"}
_SNAPSHOTTER_NAME = re.compile(r"ctd-(?:[0-9]+|base)")


def claimed_by(name: str) -> str | None:
    """The frontend that manages the device ``name`` by its name alone, or None: the CSI
    plugin's volumes and snapshots (``csi.*``, and ``csi.*@*``) and the containerd
    snapshotter's devices (``ctd-<id>``, ``ctd-<id>@c``, ``ctd-base@fs``). A frontend
    serving beside them leaves them alone (the Docker plugin neither lists nor removes
    them): their owner keeps records of them that would otherwise go stale."""
    volume = name.split("@", 1)[0]
    if volume.startswith("csi."):
        return "csi"
    if _SNAPSHOTTER_NAME.fullmatch(volume):
        return "snapshotter"
    return None


@dataclass
class ServeContext:
    """What a running ``serve`` gives its frontends.

    pool         the open :class:`thinstore.Pool` (this process holds its lock)
    pool_dir     the pool's directory (a frontend's own state may live under it); for a
                 rados:// pool, its local runtime directory (Pool.local_dir, docs/rados.md)
    nbd_socket   absolute path of the NBD server's unix socket; export names are device names
    nbd_server   the :class:`thinstore.nbd.server.NBDServer`
    control      the :class:`thinstore.control.ControlServer`
    """

    pool: object
    pool_dir: str
    nbd_socket: str
    nbd_server: object = None
    control: object = None
    extra: dict = field(default_factory=dict)


class Frontend:
    """The shape every frontend has.

    ``add_arguments(parser)`` (a classmethod) adds the frontend's options; their names must
    not collide with serve's own or another frontend's.  ``__init__(ctx, args)`` takes the
    :class:`ServeContext` and the parsed arguments; ``start()`` begins serving and returns
    (threads of its own); ``stop()`` stops serving and releases what it holds, and must be
    safe to call after a failed ``start``.  ``describe()`` returns lines ``serve`` prints
    once started (where clients reach the frontend).  ``holds(devices)`` (devices: the
    pool's name -> uuid) returns the :class:`thinstore.frontends.holds.Hold` of every
    device its records name, or None when its records are the state file at the default
    place (``holds.RECORDS``), which the control socket then reads itself; ``serve``
    registers it with the control socket while the frontend runs.
    """

    name = "frontend"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        pass

    def __init__(self, ctx: ServeContext, args: argparse.Namespace):
        self.ctx = ctx
        self.args = args

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        pass

    def describe(self) -> list[str]:
        return []

    def holds(self, devices: dict) -> list | None:
        return None


def available() -> dict[str, tuple[str, str, str]]:
    """The registered frontends whose module is installed."""
    return {name: spec for name, spec in REGISTRY.items()
            if importlib.util.find_spec(spec[0]) is not None}


def load(name: str) -> type[Frontend]:
    """The frontend class registered as ``name`` (KeyError if none is)."""
    module, cls, _command = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)
