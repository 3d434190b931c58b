"""Attach: a served export as a kernel block device, a file system on it, mounted (DESIGN §7).

Shared by the frontends that hand a host a mounted volume (Docker volume plugin,
containerd snapshotter, CSI node service).  Built after os-brick's connectors: one
connector interface with one small class per transport (:mod:`.connectors`), every
privileged step behind one helper that logs and checks it (:mod:`.privileged`).

Transports (chosen once per Attacher by :func:`.connectors.choose`)::

    kernel-nbd     /dev/nbdN via nbd-client -u     when /sys/module/nbd or /dev/nbd0 exists
                                                   and nbd-client is installed
    nbdfuse-loop   nbdfuse DIR/disk URI, then       otherwise (needs /dev/fuse, loop devices)
                   losetup --find --show --direct-io=on DIR/disk

``THINSTORE_ATTACH_TRANSPORT=nbdfuse-loop|kernel-nbd`` forces one.  The kernel-nbd
connector has not run on the machine this was written on (no nbd module there): its
test skips with that reason.

API (all methods thread-safe; one export's steps are serialised, different exports run
in parallel)::

    a = Attacher(state_path, nbd_socket)   # state_path: JSON file of this frontend, e.g.
                                           #   POOL/docker/attach.json; its directory also
                                           #   holds the transports' work dirs (dev/)
    a.recover() -> {export: "adopted"|"cleaned"}   # call once at frontend start
    a.attach(export, owner, read_only=False) -> "/dev/loopN" | "/dev/nbdN"
    a.mount(export, target, owner, fstype="ext4", options=(), read_only=False,
            mkfs=True) -> target           # attaches too; target made if missing
    a.unmount(export, owner)               # drop owner's mount
    a.detach(export, owner)                # drop owner's hold of any kind
    with a.frozen(export): ...             # fsfreeze for a consistent snapshot
    a.flush(export)                        # syncfs: dirty data through to the pool
    a.snapshot_hook                        # for ControlServer.snapshot_hooks
    a.extend(export) -> device             # after Pool.resize; only while not mounted
    a.grow_filesystem(export)              # resize2fs / xfs_growfs, online
    a.attached() -> {export: {"device", "transport", "read_only", "owners", "mount"}}
    a.owners(export) -> {owner: "device"|"mount"}
    a.forget(export)                       # the export is being destroyed: drop its record
    a.close()                              # frontend stop: sync, unmount, detach all

Owners and the mount refcount.  Holds are counted per (export, owner id) as a set: an
owner that attaches or mounts twice holds once; a release by an owner that holds nothing
succeeds (a retried request).  The last mount owner's unmount unmounts; the last owner of
any kind detaches.  ``mount`` on a mounted export adds the owner to the one mount (the
target must match, else DeviceBusy); an export is attached read-only or read-write, not
both (DeviceBusy).

File systems.  Made only on a blank device: blkid -p finds no signature and the first
4 MiB and last 1 MiB read zero; data without a signature is refused, never formatted.
A device that has a file system is mounted as the type found (``fstype`` names only what
to make): ext4 or xfs.  xfs always mounts with ``nouuid`` (clones share their origin's
UUID).

Stopping.  Before a device goes while this process still serves it, its file system is
written through (syncfs through any of its mounts, in any mount namespace, then a flush of
the device); one still mounted after our unmount (a container's bind mount) is shut down
(FS_IOC_SHUTDOWN) so that its later writes fail with EIO instead of being dropped
(docs/attach.md, "A graceful stop").

State and crashes.  The state file (:mod:`.state`, docs/attach.md) is rewritten
atomically, and every host object (FUSE mount, loop or NBD device, mount) is recorded
before it is made.  An attachment lives no longer than the process whose NBD server it
reads through (the server runs in the frontend's process): after a crash or a stop,
:meth:`Attacher.recover` tears down what the dead process left (thaws and unmounts,
lazily when a container's bind mount still holds it; detaches loop devices, which the
kernel then frees at their last close; kills the orphaned nbdfuse so any remaining user
gets I/O errors, never stale data; lazily unmounts the FUSE mount) and sweeps work dirs
and loop devices a crash left before recording them.  Owners survive: after a restart
their unmount succeeds, and the next mount attaches afresh (ext4/xfs replay their
journal).  Attachments this very process still serves are adopted.  A mkfs cut short by a crash
(recorded before it starts, on a device found blank) is made again at the next mount
rather than its partial output being refused as data.

Locks and deadlocks.  The NBD server that answers the loop device's I/O runs in this
process, and mkfs, mount, fsfreeze, umount are subprocesses whose I/O goes through it:
never call into the Attacher while holding the pool lock.  The snapshot hook freezes,
then the control server takes the pool lock for the snapshot, then it thaws.

File-system facts for frontends: :mod:`.grow` (``mount_grown``: a fresh mount grows a
file system smaller than its device first) and :mod:`.fsbounds` (sizes a file system can
be made on, in a pool with how much free space; what a pool device holds).

Errors: :class:`AttachError` (a failed step; the message carries the command and its
stderr), :class:`thinstore.errors.DeviceBusy` (held otherwise), UsageError (bad fstype).
"""

from .attacher import Attacher
from .connectors import Connector, FuseLoopConnector, KernelNBDConnector, choose
from .privileged import AttachError

__all__ = ["Attacher", "AttachError", "Connector", "FuseLoopConnector", "KernelNBDConnector",
           "choose"]
