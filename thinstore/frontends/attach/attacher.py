"""The Attacher: exports -> block devices -> mounts, counted per owner, recorded, recovered.

See the package docstring (:mod:`thinstore.frontends.attach`) for the contract.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import threading
import time

from thinstore.errors import DeviceBusy, UsageError

from . import connectors, filesystem, host
from .privileged import AttachError, attempt, log
from .state import Attachment, StateFile

#: export -> state path of the Attacher holding it: two frontends of one process must not
#: both attach (and mount) one export, which would mount one file system twice
_CLAIMS: dict[str, str] = {}
_CLAIMS_LOCK = threading.Lock()

#: how long a detach waits for the NBD server to see its client's connections end: they end
#: within milliseconds of the client's exit on an idle host; the bound is for a loaded one
HANG_UP_SECONDS = 30.0


class Attacher:
    """Attach exports of one NBD server as kernel block devices and mount them."""

    def __init__(self, state_path: str, nbd_socket: str,
                 connector: connectors.Connector | None = None, server=None):
        self.state = StateFile(state_path)
        self.server = server         # the NBDServer at nbd_socket when in this process
        root = os.path.join(os.path.dirname(self.state.path), "dev")
        self.connector = connector or connectors.choose(nbd_socket, root)
        self.records: dict[str, Attachment] = self.state.load()
        self._lock = threading.Lock()              # records and the state file
        self._export_locks: dict[str, threading.Lock] = {}

    # ------------------------------------------------------------------ helpers
    def _export_lock(self, export: str) -> threading.Lock:
        with self._lock:
            return self._export_locks.setdefault(export, threading.Lock())

    def _save(self) -> None:
        with self._lock:
            live = {k: r for k, r in self.records.items()
                    if r.owners or r.device or r.workdir or r.mount or r.unfinished_mkfs}
            self.records = live
            self.state.save(live)

    def _connector(self, rec: Attachment) -> connectors.Connector:
        if rec.transport in (None, self.connector.transport):
            return self.connector
        return connectors.CONNECTORS[rec.transport](self.connector.nbd_socket,
                                                    self.connector.root)

    def _claim(self, export: str) -> None:
        with _CLAIMS_LOCK:
            holder = _CLAIMS.setdefault(export, self.state.path)
        if holder != self.state.path:
            raise DeviceBusy(f"{export!r} is attached by another frontend of this server "
                             f"(state {holder}); detach it there first")

    def _unclaim(self, export: str) -> None:
        with _CLAIMS_LOCK:
            if _CLAIMS.get(export) == self.state.path:
                del _CLAIMS[export]

    # ------------------------------------------------------------------ attach / detach
    def attach(self, export: str, owner: str, read_only: bool = False) -> str:
        """Attach ``export`` for ``owner`` (kept until :meth:`detach`); the device path."""
        with self._export_lock(export):
            return self._attach(export, owner, "device", read_only)

    def _attach(self, export: str, owner: str, kind: str, read_only: bool) -> str:
        if not owner:
            raise UsageError("an attach needs an owner id")
        rec = self.records.get(export) or Attachment(export=export)
        if rec.device and rec.read_only != read_only and rec.owners:
            raise DeviceBusy(f"{export!r} is attached {'read-only' if rec.read_only else 'read-write'} "
                             f"for {', '.join(sorted(rec.owners))}; it cannot also be attached "
                             f"{'read-only' if read_only else 'read-write'}")
        if not rec.device:
            self._claim(export)
            self._connect(rec, read_only)
        if rec.owners.get(owner) != "mount":
            rec.owners[owner] = kind
        self._save()
        return rec.device

    def _connect(self, rec: Attachment, read_only: bool) -> None:
        connector = self.connector
        rec.transport, rec.read_only = connector.transport, read_only
        rec.server = host.process_identity()
        rec.workdir = os.path.join(connector.root, f"{rec.export}.{secrets.token_hex(4)}")
        with self._lock:
            self.records[rec.export] = rec
        self._save()                                   # the intent, before anything is made
        try:
            connector.connect(rec, self._save)
        except BaseException:
            connector.disconnect(rec)
            rec.transport = rec.workdir = rec.server = None
            self._save()
            self._unclaim(rec.export)
            raise

    def detach(self, export: str, owner: str) -> None:
        """Drop ``owner``'s hold of any kind: the last mount owner's release unmounts, the
        last owner's detaches.  An owner that holds nothing is not an error (a retry).

        The release is saved before anything is undone, so the state file always says
        what was asked: when the unmount or detach then fails (a busy mount), the error
        is raised, the owner stays released (on disk too: a restart does not bring it
        back), and the mount or device stays as it is until the next detach of the
        export (by any owner, a retry included) or the frontend's stop tries again."""
        with self._export_lock(export):
            rec = self.records.get(export)
            if rec is None:
                return
            if rec.owners.pop(owner, None) is not None:
                self._save()
            self._release(rec)

    def _release(self, rec: Attachment) -> None:
        """Undo what no owner holds any more: the mount once no mount owner is left, the
        device once no owner is; each step saved as it is done."""
        if rec.mount and not rec.mount_owners():
            filesystem.unmount(rec.mount["target"])
            rec.mount = None
            self._save()
        if not rec.owners and (rec.device or rec.workdir):
            self._teardown(rec, dead=False)
            self._save()

    def _teardown(self, rec: Attachment, dead: bool) -> None:
        """Unmount and disconnect, recording each step; dead: unmount lazily when busy.
        While this process still serves the device, its file system is first written
        through to the pool (:meth:`_settle`)."""
        if rec.device and rec.server == host.process_identity():
            dead = self._settle(rec) or dead
        if rec.mount:
            target = rec.mount["target"]
            (filesystem.unmount_dead if dead else filesystem.unmount)(target)
            rec.mount = None
            self._save()
        ours, client = rec.server == host.process_identity(), rec.helper_pid
        self._connector(rec).disconnect(rec)
        rec.transport = rec.workdir = rec.server = None
        self._unclaim(rec.export)
        if ours:
            self._wait_hung_up(rec.export, client)

    def _wait_hung_up(self, export: str, client: int | None) -> None:
        """The transport's NBD client process has exited, but the server sees its connections
        end a moment later, once its connection threads have run (on a loaded host: after
        the detach returned): wait for that, bounded, so that what the detach allowed (a
        rename, rollback, destroy or resize of the export right after it) does not find the
        export still open by this very client.  Only ``client``'s connections are waited
        for (the server knows each unix-socket client's pid), never another NBD client's.
        Needs ``server`` (this process's NBDServer) and the client's pid (nbdfuse-loop)."""
        if self.server is None or not client:
            return
        deadline = time.monotonic() + HANG_UP_SECONDS
        while self.server.connections(export, pid=client):
            if time.monotonic() > deadline:
                log.warning("attach: %s: the NBD server still counts %d connection(s) of its "
                            "client (pid %d) %.0f s after it exited", export,
                            self.server.connections(export, pid=client), client, HANG_UP_SECONDS)
                return
            time.sleep(0.01)

    def _settle(self, rec: Attachment) -> bool:
        """Before rec's device goes: every write acknowledged so far into the pool, and no
        write accepted after.  syncfs its file system through any of its mounts (in any
        mount namespace: containerd's and containers' count), unmount our own mount; one
        still mounted after that (a container's bind mount) would outlive the device and
        drop its later writes: it is shut down (the kernel syncs it again in the same
        step), so that they fail with EIO instead.  Then flush the device.  True when it
        was shut down (the caller's unmount must then be lazy)."""
        own = rec.mount["target"] if rec.mount else None
        if own and host.mount_at(own) is not None:
            filesystem.thaw(own, quiet=True)
        users = host.mounts_of(rec.device)
        if users:
            self._written_through(rec, filesystem.sync, users[0].path)
        if own and host.mount_at(own) is not None:
            attempt(["umount", own], what=f"unmount {own}")
        left = host.mounts_of(rec.device)
        if left:
            log.warning("attach: %s (%s) is still mounted on %s as its device goes: shutting "
                        "its file system down", rec.export, rec.device,
                        ", ".join(m.target + (f" (pid {m.pid}'s namespace)" if m.pid else "")
                                  for m in left))
            filesystem.shut_down(left[0].path)
        self._written_through(rec, filesystem.flush_device, rec.device)
        return bool(left)

    @staticmethod
    def _written_through(rec: Attachment, step, path: str) -> None:
        try:
            step(path)
        except AttachError as exc:
            log.warning("attach: %s: writing it through before the device goes: %s",
                        rec.export, exc)

    # ------------------------------------------------------------------ mount / unmount
    def mount(self, export: str, target: str, owner: str, fstype: str = "ext4",
              options=(), read_only: bool = False, mkfs: bool = True) -> str:
        """Attach and mount ``export`` on ``target`` for ``owner``; returns target.

        A blank device gets ``fstype`` (if ``mkfs``); a device with a file system is mounted
        as the type found (``fstype`` only names what to make).  A second owner shares the
        one mount; another target while mounted is refused (DeviceBusy).
        """
        target = os.path.abspath(target)
        with self._export_lock(export):
            rec = self.records.get(export)
            if rec and rec.mounted:
                if rec.mount["target"] != target:
                    raise DeviceBusy(f"{export!r} is mounted on {rec.mount['target']} already")
                self._attach(export, owner, "mount", read_only)
                return target
            device = self._attach(export, owner, "mount", read_only)
            try:
                self._mount(self.records[export], device, target, fstype, options,
                            read_only, mkfs)
            except BaseException:
                self._undo_owner(export, owner)
                raise
            return target

    def _mount(self, rec, device, target, fstype, options, read_only, mkfs) -> None:
        if rec.unfinished_mkfs:                        # a crash cut mkfs short: it wrote
            found, fstype = None, rec.unfinished_mkfs  # all there is; make it again
            log.warning("attach: %s: making the file system a crash interrupted again",
                        rec.export)
        else:
            found = filesystem.existing_fstype(device)
        if found is None:
            if read_only or not mkfs:
                raise AttachError(f"{rec.export!r} has no file system (and may not get one "
                                  "here: read-only or mkfs off)")
            if fstype not in filesystem.FSTYPES:
                raise UsageError(f"file system {fstype!r} is not supported "
                                 f"(use {', '.join(filesystem.FSTYPES)})")
        rec.mount = {"target": target, "fstype": found or fstype, "options": list(options),
                     "read_only": read_only, "state": "mounting"}
        self._save()                                   # the intent, before mkfs and mount
        if found is None:
            rec.unfinished_mkfs = fstype
            self._save()
            filesystem.make(device, fstype)
            rec.unfinished_mkfs = None
            self._save()
        filesystem.mount(device, target, rec.mount["fstype"], options, read_only)
        rec.mount["state"] = "mounted"
        self._save()

    def forget(self, export: str) -> None:
        """Drop what is remembered of an export that holds nothing (its device is being
        destroyed): a later export of the same name starts afresh.  DeviceBusy if held."""
        with self._export_lock(export):
            rec = self.records.get(export)
            if rec is None:
                return
            if rec.owners or rec.device or rec.mount:
                raise DeviceBusy(f"{export!r} is attached or mounted here")
            with self._lock:
                self.records.pop(export, None)
            self._save()

    def abandon(self, export: str) -> None:
        """Let go of an export destroyed under its owners (destroy --force): every hold
        goes, the mount lazily where a container's bind mount still holds the file system
        (it goes with that), the connection, and the record."""
        with self._export_lock(export):
            rec = self.records.get(export)
            if rec is None:
                return
            rec.owners.clear()
            self._save()                               # released, whatever follows
            self._teardown(rec, dead=True)
            with self._lock:
                self.records.pop(export, None)
            self._save()

    def _undo_owner(self, export: str, owner: str) -> None:
        rec = self.records.get(export)
        if rec is None:
            return
        rec.owners.pop(owner, None)
        self._save()                                   # released, whatever follows
        if rec.mount and rec.mount.get("state") == "mounting":
            filesystem.unmount_dead(rec.mount["target"])
            rec.mount = None
            self._save()
        self._release(rec)

    def unmount(self, export: str, owner: str) -> None:
        """Drop ``owner``'s mount (the same as :meth:`detach`: an owner holds once)."""
        self.detach(export, owner)

    # ------------------------------------------------------------------ snapshots / resize
    @contextlib.contextmanager
    def frozen(self, export: str):
        """Freeze ``export``'s mounted file system for the body (a consistent snapshot);
        a no-op when it is not mounted read-write here.  Mount and unmount of the export
        wait meanwhile.  Never enter it holding the pool lock: the freeze writes through
        this process's NBD server."""
        with self._export_lock(export):
            rec = self.records.get(export)
            target = rec.mount["target"] if rec and rec.mounted and not rec.read_only else None
            if target is None or not self._connector(rec).alive(rec):
                yield None
                return
            filesystem.freeze(target)
            try:
                yield target
            finally:
                filesystem.thaw(target)

    def flush(self, export: str) -> None:
        """Write the mounted file system's dirty data through to the pool (syncfs)."""
        with self._export_lock(export):
            rec = self.records.get(export)
            if rec is not None and rec.mounted:
                filesystem.sync(rec.mount["target"])

    def snapshot_hook(self, snapshot: str):
        """For ControlServer.snapshot_hooks: ``VOL@SNAP`` -> ``frozen(VOL)``."""
        if not isinstance(snapshot, str) or "@" not in snapshot:
            return contextlib.nullcontext()       # the pool refuses the name itself
        return self.frozen(snapshot.split("@", 1)[0])

    def extend(self, export: str) -> str:
        """Make the attached device show the export's new size (after Pool.resize).  Both
        transports learn the size at connect, so this reconnects: refused while mounted
        (unmount, extend, mount, then :meth:`grow_filesystem`).  Returns the device path."""
        with self._export_lock(export):
            rec = self.records.get(export)
            if rec is None or not rec.device:
                raise AttachError(f"{export!r} is not attached")
            if rec.mount:
                raise DeviceBusy(f"{export!r} is mounted on {rec.mount['target']}: "
                                 f"{rec.transport} cannot change a device's size under a "
                                 "mounted file system; unmount it first")
            device = self._connector(rec).extend(rec, self._save)
            self._save()
            return device

    def grow_filesystem(self, export: str) -> None:
        """Grow the mounted file system of ``export`` to fill its device (online)."""
        with self._export_lock(export):
            rec = self.records.get(export)
            if rec is None or not rec.mounted:
                raise AttachError(f"{export!r} is not mounted")
            filesystem.grow(rec.device, rec.mount["target"], rec.mount["fstype"])

    # ------------------------------------------------------------------ queries / recovery
    def attached(self) -> dict[str, dict]:
        """export -> {"device", "transport", "read_only", "owners", "mount"}: a copy."""
        with self._lock:
            return {name: {"device": r.device, "transport": r.transport,
                           "read_only": r.read_only, "owners": dict(r.owners),
                           "mount": dict(r.mount) if r.mount else None}
                    for name, r in self.records.items()}

    def owners(self, export: str) -> dict[str, str]:
        with self._lock:
            rec = self.records.get(export)
            return dict(rec.owners) if rec else {}

    def recover(self) -> dict[str, str]:
        """At frontend start: adopt attachments this process's server still serves,
        tear down the rest (kept owners are remembered: their unmount still succeeds and
        a new mount attaches afresh); clean host objects a crash left unrecorded.
        Returns export -> "adopted" | "cleaned"."""
        result = {}
        for export in sorted(self.records):
            with self._export_lock(export):
                rec = self.records[export]
                if rec.device and self._connector(rec).alive(rec) and \
                        (not rec.mount or _mounted_from(rec)):
                    self._claim(export)
                    result[export] = "adopted"
                    continue
                if rec.device or rec.workdir or rec.mount:
                    log.warning("attach: %s was attached by a process that is gone: "
                                "cleaning up %s", export, rec.device or rec.workdir)
                    self._teardown(rec, dead=True)
                    result[export] = "cleaned"
                self._save()
        known = {r.workdir for r in self.records.values() if r.workdir}
        self.connector.sweep(known)
        return result

    def close(self) -> None:
        """Frontend stop, before the NBD server goes: write every file system through to
        the pool, shut down any that stays mounted elsewhere (:meth:`_settle`), unmount
        (lazily if busy) and detach everything; the owners stay recorded, so that their
        unmount after the restart succeeds and a volume in use is not removable."""
        for export in sorted(self.records):
            with self._export_lock(export):
                rec = self.records[export]
                if rec.device or rec.workdir or rec.mount:
                    self._teardown(rec, dead=True)
                self._save()


def _mounted_from(rec: Attachment) -> bool:
    mount = host.mount_at(rec.mount["target"])
    return mount is not None and os.path.realpath(mount.source) == os.path.realpath(rec.device)
