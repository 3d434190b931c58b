"""Docker's volume driver verbs over a thinstore pool (no HTTP here: see :mod:`.server`).

Follows Docker's volume plugin protocol (docs.docker.com/engine/extend/plugins_volume/):
each method takes the request's JSON object and returns the response's, without "Err";
a refusal raises :class:`DriverError`, whose message the server sends as a non-empty Err.

Volumes.  A Docker volume NAME is the pool's writable device NAME (a volume or a clone),
so ``thinstore snapshot NAME@SNAP`` and ``thinstore clone`` work on it directly; List
shows every writable device of the pool.  Options of Create (``docker volume create -o``):

    size=SIZE     virtual size (binary suffixes: 512M, 10G); default --docker-default-size
    fs=ext4|xfs   the file system made at the first mount (default ext4); a size too small
                  for it, or whose metadata would not fit the pool, is refused (the
                  attach module's fsbounds)
    from=VOL@SNAP a writable O(1) clone of that snapshot (its file system comes along);
                  with size, the clone is grown to it

Opts is null on auto-create (``docker run -v NAME:/path --volume-driver thinstore``).
Unknown options are refused by name.  Mount attaches the device (kernel NBD or nbdfuse +
loop), makes a file system only on a blank device, and mounts it at MOUNT_ROOT/NAME; it is
counted per mount ID (the container), and the last Unmount unmounts and detaches, after
LINGER_SECONDS in case the next Mount follows (Docker mounts twice per container).  Remove
refuses a mounted volume, a volume with snapshots (naming any clones made from them), and
one with other open NBD clients; nothing is changed by a refused request.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time

from thinstore import names
from thinstore.errors import DeviceBusy, NoSuchDevice, ThinstoreError, UsageError
from thinstore.units import format_size

from thinstore.frontends import CLAIMS, claimed_by
from thinstore.frontends.attach import grow
from thinstore.frontends.attach.fsbounds import probe_fs as _probe_fs

from . import options
from .mountjobs import DEFAULT_WAIT, MountJobs
from .options import DriverError
from .probe import read_only as _read_only

log = logging.getLogger("thinstore.docker")

LINGER_OWNER = "thinstore-docker-linger"
LINGER_SECONDS = 2.0
DESTROY_POLLS = 50             # x 0.1 s: how long Remove waits for the last connection to end


class VolumeDriver:
    """The verbs; ``pool`` is the served Pool, ``attacher`` an Attacher over its server."""

    def __init__(self, pool, attacher, registry, mount_root: str, default_size: int,
                 plugin_name: str = "thinstore", mount_wait: float = DEFAULT_WAIT):
        self.pool, self.attacher, self.registry = pool, attacher, registry
        self.plugin_name = plugin_name            # the driver name in advice to the user
        self.mount_root, self.default_size = os.path.abspath(mount_root), default_size
        self._lock = threading.Lock()
        self._names: dict[str, threading.Lock] = {}
        self._lingers: dict[str, threading.Timer] = {}
        self.jobs = MountJobs(mount_wait)         # mounts that outlast Docker's wait
        for name in attacher.attached():          # a linger a crash cut short
            attacher.detach(name, LINGER_OWNER)   # holds nothing
        grow.forget_holds(attacher)               # and a grow

    def _name_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._names.setdefault(name, threading.Lock())

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _name(request: dict) -> str:
        name = request.get("Name")
        if not isinstance(name, str) or not name:
            raise DriverError("the request names no volume (a \"Name\" string is required)")
        try:
            return names.check_name(name, snapshot=False)
        except UsageError as exc:
            raise DriverError(str(exc)) from None

    def _writable(self, name: str):
        self._not_claimed(name)
        try:
            info = self.pool.info(name)
        except NoSuchDevice:
            raise DriverError(f"no volume {name!r} (create it with "
                              f"'docker volume create -d {self.plugin_name} {name}')") from None
        if info.read_only:
            raise DriverError(f"{name!r} is a snapshot, not a volume")
        return info

    def _not_claimed(self, name: str) -> None:
        """Another frontend's devices in the same pool are not Docker volumes: removing a
        CSI plugin's volume through Docker destroyed a Kubernetes volume."""
        owner = claimed_by(name)
        if owner:
            raise DriverError(f"{name!r} is {CLAIMS[owner]}, not a Docker volume; names "
                              "like it are kept for that frontend: choose another name")

    def _exists(self, name: str) -> bool:
        try:
            self.pool.info(name)
            return True
        except NoSuchDevice:
            return False

    def mountpoint(self, name: str) -> str:
        return os.path.join(self.mount_root, name)

    def _mounted(self, name: str) -> str:
        mount = (self.attacher.attached().get(name) or {}).get("mount")
        return mount["target"] if mount and mount.get("state") == "mounted" else ""

    # ------------------------------------------------------------------ verbs
    def activate(self, request: dict) -> dict:
        return {"Implements": ["VolumeDriver"]}

    def capabilities(self, request: dict) -> dict:
        return {"Capabilities": {"Scope": "local"}}

    def create(self, request: dict) -> dict:
        name = self._name(request)
        opts = self._options(request.get("Opts"))
        self._not_claimed(name)
        with self._name_lock(name):
            devices = self.pool.list()
            if any(d.name == name for d in devices):
                if opts:
                    raise DriverError(f"volume {name!r} exists already; its options cannot "
                                      "change (remove it first, or choose another name)")
                self._adopt(name, self._writable(name))
                return {}
            fs = self._fs_of(opts["from"]) if "from" in opts else opts.get("fs", "ext4")
            # an entry still under this name is of a volume renamed away: it goes along
            self.registry.follow({d.name: d.uuid for d in devices})
            entry = {"fs": fs, "from": opts.get("from")}
            self.registry.put(name, state="creating", uuid=None, **entry)
            try:
                self._make(name, opts)
                uuid = self.pool.info(name).uuid
            except (ThinstoreError, DriverError) as exc:
                self.registry.drop(name)
                raise DriverError(str(exc)) from None
            self.registry.put(name, state="ready", uuid=uuid, **entry)
        return {}

    def _adopt(self, name: str, info) -> None:
        """A Create of a device made outside Docker (``thinstore create``, a clone): Docker
        knows it by this name from now on, so it gets an entry, which is the plugin's
        hold on it (thinstore/frontends/holds.py)."""
        if not self._entry(name, info.uuid):
            self.registry.put(name, fs=self._fs_of(name), state="ready", uuid=info.uuid,
                              **{"from": None})

    def _entry(self, name: str, uuid: str | None = None) -> dict:
        """The options Create recorded for volume ``name`` ({} if none), found by its
        device's uuid: a volume renamed since takes its options along
        (:meth:`.Registry.follow`)."""
        try:
            uuid = uuid or self.pool.info(name).uuid
        except NoSuchDevice:
            return {}
        entry = self.registry.get(name)
        if entry and entry.get("uuid") in (None, uuid):
            return entry
        if not self.registry.known(uuid):
            return {}
        self.registry.follow({d.name: d.uuid for d in self.pool.list()})
        entry = self.registry.get(name)
        return entry if entry and entry.get("uuid") == uuid else {}

    def _options(self, opts) -> dict:
        return options.parse(opts, self.pool, self.plugin_name, self.default_size)

    def _make(self, name: str, opts: dict) -> None:
        if "from" not in opts:
            self.pool.create_volume(name, opts.get("size", self.default_size))
            return
        info = self.pool.clone(opts["from"], name)
        size = opts.get("size")
        if size is not None and size < info.size:
            self.pool.destroy(name)
            raise DriverError(f"option size={format_size(size)} is smaller than snapshot "
                              f"{opts['from']} ({format_size(info.size)}): a clone can "
                              "only grow")
        if size is not None and size > info.size:
            try:
                options.check_fits(self.pool, self._fs_of(opts["from"]), size, info.size)
            except DriverError:
                self.pool.destroy(name)
                raise
            self.pool.resize(name, size)

    def _fs_of(self, name: str) -> str:
        """The file system on device ``name`` (volume or snapshot): the one its super block
        shows, else the one the registry says to make on it, else ext4."""
        return _probe_fs(self.pool, name) or \
            self._entry(name.split("@", 1)[0]).get("fs") or "ext4"

    def remove(self, request: dict) -> dict:
        name = self._name(request)
        with self._name_lock(name):
            uuid = self._writable(name).uuid
            self._entry(name, uuid)               # its entry under this name, if renamed
            self._end_linger(name)
            owners = self.attacher.owners(name)
            if owners:
                raise DriverError(f"volume {name!r} is in use by {_mounts_words(owners)}: "
                                  f"stop the containers using it first (docker ps -a "
                                  f"--filter volume={name})")
            self._refuse_if_snapshots(name)
            self._destroy(name)
            self.registry.drop(name, uuid)
            self.attacher.forget(name)
        return {}

    def _destroy(self, name: str, polls: int = DESTROY_POLLS) -> None:
        """Destroy the volume.  Its NBD connections end a moment after the detach that
        stopped nbdfuse (the server notices the hang-up on its own threads), so a busy
        device is retried every 0.1 s, ``polls`` times, before the refusal stands."""
        for left in range(polls - 1, -1, -1):
            try:
                self.pool.destroy(name)
                return
            except DeviceBusy as exc:
                if not left:
                    raise DriverError(f"volume {name!r} is busy: {exc}") from None
            time.sleep(0.1)

    def _refuse_if_snapshots(self, name: str) -> None:
        """Refuse while the volume has snapshots: destroying them is all that is needed
        (a clone is an independent volume and stays); the clones made from them are
        named, since a user may want to keep the snapshot for them."""
        devices = self.pool.list()
        snaps = [d.name for d in devices if d.kind == "snapshot" and d.name.startswith(name + "@")]
        if not snaps:
            return
        one = len(snaps) == 1
        clones = [f"{d.name} (from {d.origin})" for d in devices
                  if d.kind == "clone" and d.origin in snaps]
        note = ""
        if clones:
            note = (f"; {'its clone' if len(clones) == 1 else 'the clones'} "
                    f"{', '.join(clones)} {'stays' if len(clones) == 1 else 'stay'}: a "
                    "clone is an independent volume")
        raise DriverError(f"volume {name!r} has {'a snapshot' if one else 'snapshots'} "
                          f"{', '.join(snaps)}: destroy {'it' if one else 'them'} first "
                          f"('thinstore destroy {snaps[0]}') so none is lost unseen{note}")

    def mount(self, request: dict) -> dict:
        name, owner = self._name(request), self._owner(request)
        with self._name_lock(name):
            self._writable(name)
            try:
                target = self.jobs.run(name, owner, lambda: self._mount_grown(name, owner),
                                       lambda: self.attacher.unmount(name, owner))
                self._end_linger(name)            # the new owner holds the mount now
            except ThinstoreError as exc:
                raise DriverError(f"cannot mount {name!r}: {exc}") from None
        return {"Mountpoint": target}

    def _mount_grown(self, name: str, owner: str) -> str:
        """Mount for ``owner``; a fresh mount first grows a file system smaller than its
        device (a clone made larger, a resized volume: the attach module's grow)."""
        fs = self._entry(name).get("fs") or "ext4"                 # to make if blank
        attached = self.attacher.attached().get(name) or {}
        if attached.get("device") and set(attached["owners"]) <= {LINGER_OWNER} and \
                grow.device_size(attached["device"]) + grow.SLACK < self.pool.info(name).size:
            self._end_linger(name)      # resized since: mount afresh, at the new size
        return grow.mount_grown(self.attacher, name, self.mountpoint(name), owner, fstype=fs)

    @staticmethod
    def _owner(request: dict) -> str:
        owner = request.get("ID")
        if owner is None:
            return "docker"            # before Docker 1.12 Mount carried no ID
        if not isinstance(owner, str) or not owner:
            raise DriverError("\"ID\" must be a non-empty string (the mount's caller)")
        return owner

    def unmount(self, request: dict) -> dict:
        """Release mount ID ``owner`` whatever happens: Docker never retries an Unmount
        (the container is gone either way), so a hold kept after a failure would keep
        the volume "in use" for ever.  The last owner's mount lingers (see below) if its
        file system writes its data out; when that sync fails (a full pool, a file
        system gone read-only after errors) it is unmounted and detached at once, and
        the Err says what failed, after the owner is released."""
        name, owner = self._name(request), self._owner(request)
        with self._name_lock(name):
            problems = []
            # a volume destroyed under its mount (destroy --force) has nothing to flush
            # to and nothing to linger for: only let go of the mount
            if self._last_mount_owner(name, owner) and LINGER_SECONDS > 0 \
                    and self._exists(name):
                try:
                    self.attacher.flush(name)      # written through, as an unmount would
                    self.attacher.mount(name, self.mountpoint(name), LINGER_OWNER)
                    self._start_linger(name)
                except ThinstoreError as exc:
                    problems.append(f"its file system failed to write its data out "
                                    f"({exc})")
                    try:
                        self._end_linger(name)     # no linger over a failing file system
                    except ThinstoreError as again:
                        problems.append(f"ending its linger failed ({again})")
            try:
                self.attacher.unmount(name, owner)  # releases the owner before unmounting
            except ThinstoreError as exc:
                problems.append(f"tearing down its mount failed ({exc})")
            if problems:
                message = (f"volume {name!r} is released by Docker mount {owner[:12]}, but "
                           f"{'; and '.join(problems)}: data written since the last sync "
                           "may be lost (is the pool full? see 'thinstore status')")
                log.warning("docker plugin: %s", message)
                raise DriverError(message)
        return {}

    # Docker mounts a volume, unmounts it and mounts it again for every container (the
    # first mount looks for image content to copy in): a mount whose last owner leaves
    # is kept for LINGER_SECONDS, held by LINGER_OWNER, so the next Mount finds it ready.
    def _last_mount_owner(self, name: str, owner: str) -> bool:
        owners = self.attacher.owners(name)
        return owner in owners and not set(owners) - {owner, LINGER_OWNER} \
            and bool(self._mounted(name))

    def _start_linger(self, name: str) -> None:
        timer = threading.Timer(LINGER_SECONDS, self._linger_over, (name,))
        timer.daemon = True
        with self._lock:
            old, self._lingers[name] = self._lingers.get(name), timer
        if old is not None:
            old.cancel()
        timer.start()

    def _linger_over(self, name: str) -> None:
        with self._name_lock(name):
            with self._lock:
                if self._lingers.get(name) is not threading.current_thread():
                    return                        # a Mount or Remove ended it meanwhile
                del self._lingers[name]
            try:
                self.attacher.unmount(name, LINGER_OWNER)
            except ThinstoreError as exc:
                log.warning("docker plugin: unmounting %s after its last container: %s",
                            name, exc)

    def _abandon(self, name: str, mounts: list[str]) -> str | None:
        """The volume is destroyed under its mounts: Docker will never unmount it (its
        Get now finds no volume), so drop the mount here, lazily where a container still
        holds it; the containers' I/O on it fails from now on."""
        with self._lock:
            timer = self._lingers.pop(name, None)
        if timer is not None:
            timer.cancel()
        try:
            self.attacher.abandon(name)
        except (ThinstoreError, OSError) as exc:
            log.warning("docker plugin: letting go of destroyed volume %s: %s", name, exc)
        if not mounts:
            return None
        return (f"Docker containers that mount it lost it ({_mounts_words(mounts)}; their "
                f"I/O on it now fails: stop them, docker ps --filter volume={name})")

    def _end_linger(self, name: str) -> None:
        """Release the linger hold now (the caller holds the name's lock)."""
        with self._lock:
            timer = self._lingers.pop(name, None)
        if timer is not None:
            timer.cancel()
        self.attacher.unmount(name, LINGER_OWNER)     # nothing when not held

    def close(self) -> None:
        """Stop the linger timers (the frontend then closes the attacher)."""
        with self._lock:
            timers, self._lingers = list(self._lingers.values()), {}
        for timer in timers:
            timer.cancel()

    def busy_reason(self, name: str, forced: bool = False) -> str | bool | None:
        """A ControlServer ``busy_reasons`` hook (a rollback or destroy found the volume
        busy): the containers' mounts, for a Docker user; True when only the linger held
        it (released now: no container uses it); None when Docker has not mounted it.
        `forced` (a destroy --force has just taken it): let go of its mount and say
        which container mounts lost it, else None."""
        with self._name_lock(name):
            owners = self.attacher.owners(name)
            mounts = [o for o in owners if o != LINGER_OWNER]
            if forced:
                return self._abandon(name, mounts)
            if mounts:
                return (f"volume {name!r} is mounted by Docker ({_mounts_words(mounts)}): "
                        f"stop the container(s) using it first (docker ps --filter "
                        f"volume={name})")
            if LINGER_OWNER not in owners:
                return None
            self._end_linger(name)
            return True

    def snapshot_hook(self, snapshot: str):
        """For ControlServer.snapshot_hooks: the attacher's freeze around the snapshot,
        except for a file system mounted read-only (ext4's errors=remount-ro after a
        failed write, e.g. a full pool): nothing can change it, fsfreeze refuses it
        ("Read-only file system"), and the snapshot is taken as the device holds it (as
        after a crash: the journal replays when a clone of it is mounted)."""
        if isinstance(snapshot, str) and "@" in snapshot:
            volume = snapshot.split("@", 1)[0]
            target = self._mounted(volume)
            if target and _read_only(target):
                log.warning("docker plugin: %s: the file system of %r is read-only (after "
                            "errors?): snapshot taken without a freeze", snapshot, volume)
                return contextlib.nullcontext()
        return self.attacher.snapshot_hook(snapshot)

    def path(self, request: dict) -> dict:
        name = self._name(request)
        self._writable(name)
        return {"Mountpoint": self._mounted(name)}

    def get(self, request: dict) -> dict:
        name = self._name(request)
        return {"Volume": self._describe(self._writable(name), status=True)}

    def list(self, request: dict) -> dict:
        return {"Volumes": [self._describe(d, status=False) for d in self.pool.list()
                            if not d.read_only and not claimed_by(d.name)]}

    def _describe(self, info, status: bool) -> dict:
        out = {"Name": info.name, "Mountpoint": self._mounted(info.name)}
        if status:
            out["CreatedAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(info.created))
            out["Status"] = self._status(info)
        return out

    def _status(self, info) -> dict:
        entry = self._entry(info.name, info.uuid)
        attached = self.attacher.attached().get(info.name) or {}
        mount = attached.get("mount") or {}
        origin = info.origin
        if origin is None and info.kind == "clone":
            origin = "(gone)"                     # its snapshot was destroyed: as list says
        return {"size": info.size, "used": info.used, "exclusive": info.exclusive,
                "shared": info.shared, "kind": info.kind, "origin": origin,
                "fs": mount.get("fstype") or _probe_fs(self.pool, info.name)
                or entry.get("fs") or "ext4",
                "device": attached.get("device"),
                "mounts": len(set(attached.get("owners") or {}) - {LINGER_OWNER, grow.OWNER}),
                "snapshots": [d.name for d in self.pool.list()
                              if d.kind == "snapshot" and d.name.startswith(info.name + "@")]}

    #: protocol path -> method
    ROUTES = {
        "/Plugin.Activate": "activate",
        "/VolumeDriver.Create": "create",
        "/VolumeDriver.Remove": "remove",
        "/VolumeDriver.Mount": "mount",
        "/VolumeDriver.Unmount": "unmount",
        "/VolumeDriver.Path": "path",
        "/VolumeDriver.Get": "get",
        "/VolumeDriver.List": "list",
        "/VolumeDriver.Capabilities": "capabilities",
    }


def _mounts_words(owners) -> str:
    """'1 mount (Docker mount ID 0123456789ab)': the IDs Docker's Mount and Unmount carry
    are its own per-mount IDs, not container IDs (docker ps shows none of them)."""
    ids = sorted(o[:12] for o in owners)
    return (f"{len(ids)} mount{'s' if len(ids) > 1 else ''} (Docker mount "
            f"ID{'s' if len(ids) > 1 else ''} {', '.join(ids)}, not container IDs)")

