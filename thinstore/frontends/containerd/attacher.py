"""The snapshotter's use of the shared attach module (thinstore.frontends.attach).

Every active snapshot and view holds one attachment, owned by ``snapshotter``, from
Prepare/View until Commit/Remove; containerd mounts the device itself (the Mounts reply).
The base volume is attached only to make its file system (attach mounts with mkfs on a blank
device, then the unmount detaches).  A device that is still mounted somewhere (a running
container's rootfs) is never detached: DeviceBusy, which containerd sees as
FailedPrecondition.
"""

from __future__ import annotations

import os

from thinstore.errors import DeviceBusy
from thinstore.frontends.attach import Attacher as SharedAttacher
from thinstore.frontends.attach import host

OWNER = "snapshotter"


class Attacher:
    """The three calls snapshotter.py makes, over one shared :class:`SharedAttacher`.

    state_dir holds the attach module's state file (attach.json) and its work dirs.
    """

    def __init__(self, nbd_socket: str, state_dir: str, server=None):
        self.state_dir = state_dir
        self.shared = SharedAttacher(os.path.join(state_dir, "attach.json"), nbd_socket,
                                     server=server)

    def recover(self) -> dict:
        """Tear down what a dead predecessor left attached (attach's own recovery)."""
        return self.shared.recover()

    def make_filesystem(self, name: str, fs_type: str) -> None:
        """Make ``fs_type`` on blank device ``name`` (mount with mkfs, unmount, detach)."""
        target = os.path.join(self.state_dir, "mkfs")
        self.shared.mount(name, target, OWNER, fstype=fs_type, mkfs=True)
        self.shared.unmount(name, OWNER)
        self.shared.detach(name, OWNER)

    def attach(self, name: str, read_only: bool = False) -> str:
        """The block device of pool device ``name`` ("/dev/loopN" or "/dev/nbdN")."""
        return self.shared.attach(name, OWNER, read_only=read_only)

    def attached(self) -> dict[str, str]:
        """Pool device -> block device, of what is attached now."""
        return {name: rec["device"] for name, rec in self.shared.attached().items()
                if rec["device"]}

    def detach(self, name: str) -> None:
        """Release ``name``'s device (its writes reached the pool: the loop device does
        direct I/O); nothing if not attached; DeviceBusy (containerd: FailedPrecondition)
        while a file system on it is mounted in any mount namespace or a device is
        stacked on it."""
        device = self.attached().get(name)
        if device is not None:
            refuse_while_in_use(name, device)
        self.shared.detach(name, OWNER)

    def close(self) -> None:
        self.shared.close()


def refuse_while_in_use(name: str, device: str) -> None:
    """DeviceBusy naming where ``device`` is in use: mounted (found by major:minor in the
    mountinfo of every mount namespace, so a mount made inside a container, a shim or
    ``unshare -m`` counts, whatever path named the device) or held (/sys/block/X/holders)."""
    users = host.mounts_of(device)
    if users:
        where = [m.target + (f" (in the mount namespace of pid {m.pid})" if m.pid else "")
                 for m in users]
        raise DeviceBusy(f"{device} of {name!r} is still mounted on {where[0]}"
                         f"{f' and {len(where) - 1} more' if len(where) > 1 else ''}: "
                         "unmount it (stop the container) first")
    held = host.holders(device)
    if held:
        raise DeviceBusy(f"{device} of {name!r} is held by {', '.join(held)}: remove that "
                         "first")
