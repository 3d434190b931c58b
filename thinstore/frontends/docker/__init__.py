"""The Docker volume plugin: thin volumes with O(1) clones as Docker volumes (docs/docker.md).

``thinstore --pool DIR docker-plugin`` (= ``serve --frontend docker``) serves the pool
over NBD and answers Docker's volume plugin protocol on a unix socket (default
/run/docker/plugins/thinstore.sock, where dockerd discovers a plugin named "thinstore").
It runs in the serve process: the NBD server that the mounted volumes' block devices read
through is the same process's.

    driver.py     the verbs (Create, Remove, Mount, Unmount, Path, Get, List, Capabilities)
    options.py    Create's options, checked before anything is made
    server.py     HTTP over the unix socket (the standard library's http.server)
    registry.py   the options the pool does not keep (file system type, origin)
    probe.py      a mounted file system that stopped writing after errors

Which sizes a file system can be made on (Create's refusals) and the grow of a file
system to its device at a fresh mount are the attach module's (``attach/fsbounds.py``,
``attach/grow.py``), shared with the CSI plugin.

State, under POOL/docker/ (``--docker-state-dir``): ``volumes.json`` (the registry),
``attach.json`` (mounts and their owners, :mod:`thinstore.frontends.attach`), ``dev/``
(FUSE work dirs), and by default ``mnt/NAME`` (mount points, ``--docker-mount-root``).
At start, :meth:`Attacher.recover` and :meth:`Registry.settle` clean or adopt whatever a
killed plugin left.
"""

from __future__ import annotations

import argparse
import logging
import os

from thinstore.frontends import Frontend

log = logging.getLogger("thinstore.docker")

DEFAULT_SOCKET = "/run/docker/plugins/thinstore.sock"
DEFAULT_SIZE = "10G"


def plugin_name_of(socket_path: str) -> str:
    """The driver name dockerd gives a plugin found by its socket: the file's name
    without ``.sock`` (/run/docker/plugins/NAME.sock -> NAME)."""
    base = os.path.basename(socket_path)
    return base[:-len(".sock")] if base.endswith(".sock") and len(base) > 5 else base


class DockerVolumeFrontend(Frontend):
    """Docker volume plugin: thin volumes, snapshots and O(1) clones as Docker volumes."""

    name = "docker"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("docker volume plugin")
        group.add_argument("--plugin-socket", metavar="PATH", default=DEFAULT_SOCKET,
                           help=f"the plugin's unix socket (default {DEFAULT_SOCKET}; "
                           "dockerd names the plugin after the file)")
        group.add_argument("--plugin-name", metavar="NAME",
                           help="the driver name Docker knows the plugin by, used in its "
                           "messages (default: the socket's file name without .sock, as "
                           "dockerd names it; give the NAME of a NAME.spec file)")
        group.add_argument("--docker-state-dir", metavar="DIR",
                           help="the plugin's state (default POOL/docker)")
        group.add_argument("--docker-mount-root", metavar="DIR",
                           help="where volumes are mounted (default STATE_DIR/mnt)")
        group.add_argument("--docker-default-size", metavar="SIZE", default=DEFAULT_SIZE,
                           help=f"size of a volume created without -o size (default "
                           f"{DEFAULT_SIZE}; thin: space is taken as it is written)")
        group.add_argument("--docker-mount-wait", metavar="SECONDS", type=float,
                           help="answer a Mount within this many seconds (default 100; "
                           "dockerd waits 120): a mount still making or growing its file "
                           "system goes on in the background, and the Mount gets an error "
                           "saying to start the container again shortly")

    def __init__(self, ctx, args):
        super().__init__(ctx, args)
        self.server = self.attacher = self.driver = None
        self.state_dir = os.path.abspath(getattr(args, "docker_state_dir", None)
                                         or os.path.join(ctx.pool_dir, "docker"))
        self.mount_root = os.path.abspath(getattr(args, "docker_mount_root", None)
                                          or os.path.join(self.state_dir, "mnt"))
        self.socket_path = os.path.abspath(getattr(args, "plugin_socket", None)
                                           or DEFAULT_SOCKET)
        self.plugin_name = getattr(args, "plugin_name", None) \
            or plugin_name_of(self.socket_path)

    def start(self) -> None:
        from thinstore.frontends.attach import Attacher
        from thinstore.units import parse_size

        from .driver import VolumeDriver
        from .registry import Registry
        from .server import PluginServer

        if getattr(self.args, "verbose", False):       # -v: every request and privileged step
            for name in ("thinstore.docker", "thinstore.attach"):
                logging.getLogger(name).setLevel(logging.INFO)
        size = parse_size(getattr(self.args, "docker_default_size", None) or DEFAULT_SIZE)
        registry = Registry(os.path.join(self.state_dir, "volumes.json"))
        self.attacher = Attacher(os.path.join(self.state_dir, "attach.json"),
                                 self.ctx.nbd_socket, server=self.ctx.nbd_server)
        for export, outcome in self.attacher.recover().items():
            log.warning("docker plugin: %s: %s what the previous run left", export, outcome)
        registry.settle({d.name: d.uuid for d in self.ctx.pool.list()})
        driver = VolumeDriver(self.ctx.pool, self.attacher, registry, self.mount_root, size,
                              plugin_name=self.plugin_name,
                              mount_wait=self._mount_wait())
        self.driver = driver
        if self.ctx.control is not None:
            self.ctx.control.snapshot_hooks.append(driver.snapshot_hook)
            self.ctx.control.busy_reasons.append(driver.busy_reason)
        self.server = PluginServer(self.socket_path, driver)
        self.server.start()

    def _mount_wait(self) -> float:
        from thinstore.errors import UsageError

        from .mountjobs import DEFAULT_WAIT

        wait = getattr(self.args, "docker_mount_wait", None)
        if wait is None:
            return DEFAULT_WAIT
        if not wait > 0:
            raise UsageError(f"--docker-mount-wait {wait:g}: give a number of seconds above 0")
        return wait

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.driver is not None:
            reasons = getattr(self.ctx.control, "busy_reasons", [])
            if self.driver.busy_reason in reasons:
                reasons.remove(self.driver.busy_reason)
            hooks = getattr(self.ctx.control, "snapshot_hooks", [])
            if self.driver.snapshot_hook in hooks:
                hooks.remove(self.driver.snapshot_hook)
            self.driver.close()
            self.driver = None
        if self.attacher is not None:
            self.attacher.close()
            self.attacher = None

    def holds(self, devices: dict) -> list | None:
        """The volumes Docker created, from the registry this plugin runs with (its
        state directory may be elsewhere than the default, which the control socket
        would read)."""
        from thinstore.frontends.holds import docker_holds
        if self.driver is None:
            return []
        return docker_holds(self.driver.registry.snapshot(), devices)

    def describe(self) -> list[str]:
        return [f"docker volume plugin {self.plugin_name!r}: unix://{self.socket_path} "
                "(dockerd names the driver after the socket in /run/docker/plugins or a "
                ".spec file in /etc/docker/plugins)"]
