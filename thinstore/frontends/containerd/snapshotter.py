"""containerd's snapshotter semantics on a thin pool (the gRPC layer is service.py).

The mapping follows containerd's devmapper snapshotter (snapshots/devmapper in containerd):

    base            volume ctd-base holding an empty file system (``base_size``, 10 GiB by
                    default, like dm.basesize), snapshotted once as ctd-base@fs
    Prepare(k, p)   ctd-<id> = a writable clone of p's ctd-<pid>@c (of ctd-base@fs without
                    a parent), attached as a block device; the mount is that device
    View(k, p)      the same clone, attached and mounted read-only
    Commit(n, k)    ctd-<id>@c = a snapshot of the active ctd-<id> (after it is detached and
                    flushed); then ctd-<id> is destroyed.  n names the committed snapshot
    Remove(k)       detach, destroy the device: only the chunks no other device maps are freed
    Usage(k)        the device's exclusive bytes from the pool's accounting (no file walk)

Every change is intent, act, record (store.py); :meth:`Snapshotter.recover`, run at start,
undoes the acts of unfinished intents and destroys any ``ctd-`` device no record names, so
a crash (kill -9 in Prepare or Commit) leaves neither a half-made snapshot visible nor an
orphan device.

Errors are the package's own: NoSuchDevice (containerd's NotFound), DeviceExists
(AlreadyExists), DeviceBusy (FailedPrecondition), UsageError (InvalidArgument).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time

from thinstore.errors import DeviceBusy, DeviceExists, NoSuchDevice, UsageError
from thinstore.frontends.attach import fsbounds
from thinstore.units import format_size

from .filters import compile_filters
from .store import Store

log = logging.getLogger("thinstore.snapshotter")

PREFIX = "ctd-"
BASE = "ctd-base"
BASE_SNAPSHOT = "ctd-base@fs"
#: the only device names the snapshotter makes: a user's own "ctd-backup" is not its own
_OWN = re.compile(r"ctd-(?:[0-9]+(?:@c)?|base(?:@fs)?)")
DEFAULT_BASE_SIZE = 10 << 30
FS_TYPES = ("ext4", "xfs")
MAX_LABEL_BYTES = 4096      # containerd's limit on one label's key + value


#: named points where THINSTORE_SNAPSHOTTER_CRASH=POINT kills the process (SIGKILL), for
#: the crash tests: each sits between two steps of intent, act, record
CRASH_POINTS = ("prepare-intent", "prepare-clone", "prepare-attach",
                "commit-intent", "commit-snapshot", "commit-record")


def crash_point(name: str) -> None:
    if os.environ.get("THINSTORE_SNAPSHOTTER_CRASH") == name:
        log.warning("crash point %s: killing the process", name)
        os.kill(os.getpid(), signal.SIGKILL)


def active_device(sid: int) -> str:
    return f"{PREFIX}{sid}"


def committed_device(sid: int) -> str:
    return f"{PREFIX}{sid}@c"


def own_device(name: str) -> bool:
    """Whether a pool device has a name the snapshotter gives (ctd-<id>, ctd-<id>@c, the
    base): recovery and Cleanup destroy such devices when no record names them, and must
    never take a volume a user named ctd-something for one of them."""
    return _OWN.fullmatch(name) is not None


class Snapshotter:
    """The snapshots of one containerd proxy plugin over ``pool``.

    pool      an open :class:`thinstore.Pool` (this process holds it)
    store     the :class:`~.store.Store` of keys and records
    attacher  an :class:`~.attacher.Attacher`: pool device -> kernel block device
              (``attach``, ``detach``, ``attached``, ``make_filesystem``, ``recover``)
    fs_type   "ext4" or "xfs" (xfs mounts with nouuid: every clone has the base's UUID);
              None: the pool's, ext4 for a new pool
    base_size bytes, the base volume's (so every layer's) virtual size; None: the pool's,
              DEFAULT_BASE_SIZE for a new pool.  Both are fixed when the base is made:
              :meth:`start` refuses (UsageError) a value that differs from the pool's
    """

    def __init__(self, pool, store: Store, attacher, *, fs_type: str | None = None,
                 base_size: int | None = None):
        if fs_type is not None and fs_type not in FS_TYPES:
            raise UsageError(f"file system {fs_type!r} is not supported: use ext4 or xfs")
        self.pool = pool
        self.store = store
        self.attacher = attacher
        self.fs_type = fs_type
        self.base_size = base_size
        self.lock = store.lock

    # ------------------------------------------------------------ start
    def start(self) -> None:
        """Recover from a crash, then make the base file system if there is none."""
        with self.lock:
            self.attacher.recover()
            self.recover()
            self._ensure_base()
            self._reattach()

    def _pool_names(self) -> set[str]:
        return {d.name for d in self.pool.list()}

    def recover(self) -> None:
        """Roll back unfinished intents and destroy the ``ctd-`` devices no record names."""
        self._refuse_records_kept_elsewhere()
        body = self.store.body
        for intent in body["intents"]:
            log.warning("rolling back an unfinished %s of %r", intent["op"], intent["key"])
        if body["intents"]:
            with self.store.transaction() as new:
                new["intents"] = []
        keep = self.store.devices() | {BASE_SNAPSHOT}
        for name in sorted(self._pool_names()):
            if own_device(name) and name not in keep:
                self._destroy(name)
        missing = [k for k, r in self.store.body["snapshots"].items()
                   if r["device"] not in self._pool_names()]
        if missing:     # only a damaged pool gets here: keep List honest about it
            log.error("snapshots without a device, dropped: %s", ", ".join(missing))
            with self.store.transaction() as new:
                for key in missing:
                    del new["snapshots"][key]

    def _refuse_records_kept_elsewhere(self) -> None:
        """Every ``ctd-<id>`` device is made after an intent is written to the records, so
        a pool holding one while the records file never existed here had its records kept
        elsewhere: another state directory, a rados:// pool's runtime directory on the host
        that served it before (or one cleaned away), or a file removed. Recovery would
        destroy every such device (every image layer) as an orphan: refuse instead."""
        if not self.store.fresh:
            return
        layers = sorted(n for n in self._pool_names()
                        if own_device(n) and n not in (BASE, BASE_SNAPSHOT))
        if layers:
            shown = ", ".join(layers[:3]) + (f", ... ({len(layers)} in all)"
                                             if len(layers) > 3 else "")
            raise UsageError(
                f"this pool holds containerd snapshot devices ({shown}) but "
                f"{self.store.path} does not exist: the records that name them are kept "
                "elsewhere (a rados:// pool keeps them in the runtime directory of the host "
                "that served it) or were removed, and starting without them would destroy "
                "every one of these devices as an orphan; put the records file back, or "
                "destroy the devices ('thinstore destroy NAME') to start afresh")

    def _destroy(self, name: str) -> None:
        self.attacher.detach(name)
        try:
            self.pool.destroy(name, force=True)
            log.info("destroyed %s", name)
        except NoSuchDevice:
            pass

    def _ensure_base(self) -> None:
        made = self.store.body.get("fs_type")
        if made and self.fs_type not in (None, made):
            raise UsageError(f"this pool's layers are {made}, not {self.fs_type}: start the "
                             f"snapshotter with --fs-type {made} or without --fs-type (or "
                             "use another pool)")
        self.fs_type = made or self.fs_type or "ext4"
        base = {d.name: d for d in self.pool.list()}.get(BASE_SNAPSHOT)
        if base is not None:
            if self.base_size not in (None, base.size):
                raise UsageError(
                    f"this pool's layers are {format_size(base.size)} "
                    f"({base.size} bytes), not {format_size(self.base_size)}: the base size "
                    "is fixed when the base is first made; start the snapshotter with "
                    f"--base-size {base.size} or without --base-size (or use another pool)")
            self.base_size = base.size
            return
        self.base_size = self.base_size or DEFAULT_BASE_SIZE
        why = fsbounds.too_small(self.fs_type, self.base_size) or \
            fsbounds.too_large(self.pool.status(), self.fs_type, self.base_size)
        if why:                             # before mkfs fails, or fills the pool
            raise UsageError(f"--base-size {format_size(self.base_size)}: {why}")
        if BASE in self._pool_names():      # a crash while the file system was being made
            self._destroy(BASE)
        self.pool.create_volume(BASE, self.base_size)
        self.attacher.make_filesystem(BASE, self.fs_type)
        self.pool.snapshot(BASE_SNAPSHOT)
        self._destroy(BASE)     # its NBD client may still be hanging up: forced
        with self.store.transaction() as body:
            body["fs_type"] = self.fs_type

    def _reattach(self) -> None:
        """Active snapshots and views have a block device while they exist.  One that
        cannot be attached now (no free loop device) is logged: Mounts tries again."""
        for key, rec in self.store.body["snapshots"].items():
            if rec["kind"] != "committed":
                try:
                    self.attacher.attach(rec["device"], read_only=rec["kind"] == "view")
                except Exception as err:    # noqa: BLE001 - one snapshot; serve the rest
                    log.error("cannot attach %r (%s) again: %s", key, rec["device"], err)

    # ------------------------------------------------------------ create
    def prepare(self, key: str, parent: str, labels: dict) -> list[dict]:
        """Make active snapshot ``key`` from committed ``parent`` ("" = the empty base)."""
        return self._create("active", key, parent, labels)

    def view(self, key: str, parent: str, labels: dict) -> list[dict]:
        """Make read-only view ``key`` of committed ``parent``."""
        return self._create("view", key, parent, labels)

    def _create(self, kind: str, key: str, parent: str, labels: dict) -> list[dict]:
        check_key(key)
        check_labels(labels)
        with self.lock:
            if self.store.get(key) is not None:
                raise DeviceExists(f"snapshot {key!r} already exists")
            source = self._committed_source(parent)
            with self.store.transaction() as body:      # the intent takes the id
                sid = body["next_id"]
                body["next_id"] += 1
                body["intents"].append({"op": "prepare", "key": key, "id": sid})
            crash_point("prepare-intent")
            device = active_device(sid)
            try:
                self.pool.clone(source, device)
                crash_point("prepare-clone")
                path = self.attacher.attach(device, read_only=kind == "view")
            except BaseException:
                self._abandon(sid, device)
                raise
            crash_point("prepare-attach")
            self._record(sid, key, kind, parent, device, labels)
            return self._mounts(kind, path)

    def _intend(self, **intent) -> None:
        with self.store.transaction() as body:
            body["intents"].append(intent)

    def _record(self, sid: int, key: str, kind: str, parent: str, device: str, labels: dict,
                replaces: str | None = None) -> None:
        """The act is done: record ``key`` (instead of ``replaces``), drop the intent."""
        now = time.time_ns()
        with self.store.transaction() as body:
            body["intents"] = [i for i in body["intents"] if i["id"] != sid]
            if replaces is not None:
                del body["snapshots"][replaces]
            body["snapshots"][key] = {"id": sid, "kind": kind, "parent": parent,
                                      "device": device, "labels": dict(labels),
                                      "created": now, "updated": now}

    def _abandon(self, sid: int, *devices: str) -> None:
        """Undo an intent whose act failed (the same as recovery does after a crash)."""
        for name in devices:
            self._destroy(name)
        with self.store.transaction() as body:
            body["intents"] = [i for i in body["intents"] if i["id"] != sid]

    def _committed_source(self, parent: str) -> str:
        if not parent:
            return BASE_SNAPSHOT
        rec = self.store.get(parent)
        if rec is None:
            raise NoSuchDevice(f"parent snapshot {parent!r} does not exist")
        if rec["kind"] != "committed":
            raise UsageError(f"parent {parent!r} is {rec['kind']}, not committed")
        return rec["device"]

    def _mounts(self, kind: str, path: str) -> list[dict]:
        if kind == "view":
            options = ["ro", "noload"] if self.fs_type == "ext4" else ["ro", "norecovery"]
        else:
            options = ["rw"]
        if self.fs_type == "xfs":
            options.append("nouuid")
        return [{"type": self.fs_type, "source": path, "target": "", "options": options}]

    def mounts(self, key: str) -> list[dict]:
        with self.lock:
            rec = self._need(key)
            if rec["kind"] == "committed":
                raise UsageError(f"snapshot {key!r} is committed: only active snapshots and "
                                 "views have mounts (make a view of it)")
            path = self.attacher.attached().get(rec["device"])
            if path is None:
                path = self.attacher.attach(rec["device"], read_only=rec["kind"] == "view")
            return self._mounts(rec["kind"], path)

    # ------------------------------------------------------------ commit, remove
    def commit(self, name: str, key: str, labels: dict) -> None:
        """Turn active ``key`` into committed ``name``: a read-only snapshot of it."""
        check_key(name)
        check_labels(labels)
        with self.lock:
            rec = self._need(key)
            if rec["kind"] != "active":
                raise UsageError(f"snapshot {key!r} is {rec['kind']}; only an active one "
                                 "can be committed")
            if self.store.get(name) is not None:
                raise DeviceExists(f"snapshot {name!r} already exists")
            self.attacher.detach(rec["device"])       # flushed; DeviceBusy while mounted
            sid, device = rec["id"], committed_device(rec["id"])
            self._intend(op="commit", key=key, name=name, id=sid)
            crash_point("commit-intent")
            try:
                self.pool.snapshot(device)
            except BaseException:
                self._abandon(sid, device)
                self.attacher.attach(rec["device"], read_only=False)
                raise
            crash_point("commit-snapshot")
            self._record(sid, name, "committed", rec["parent"], device, labels, replaces=key)
            crash_point("commit-record")
            self._destroy(rec["device"])

    def remove(self, key: str) -> None:
        """Remove ``key`` (not while it has children); its device's own chunks are freed."""
        with self.lock:
            rec = self._need(key)
            kids = self.store.children(key)
            if kids:
                which = f"a child ({kids[0]!r}): remove it" if len(kids) == 1 else \
                    f"{len(kids)} children (e.g. {kids[0]!r}): remove them"
                raise DeviceBusy(f"snapshot {key!r} has {which} first")
            self.attacher.detach(rec["device"])       # DeviceBusy while mounted
            with self.store.transaction() as body:
                del body["snapshots"][key]
            self._destroy(rec["device"])               # after a crash here: an orphan, swept

    def cleanup(self) -> int:
        """Release every ``ctd-`` device and attachment no record names; the count freed."""
        with self.lock:
            keep = self.store.devices() | {BASE_SNAPSHOT}
            gone = [n for n in self.attacher.attached() if n not in keep]
            gone += [n for n in self._pool_names()
                     if own_device(n) and n not in keep and n not in gone]
            for name in gone:
                self._destroy(name)
            return len(gone)

    # ------------------------------------------------------------ queries
    def _need(self, key: str) -> dict:
        rec = self.store.get(key)
        if rec is None:
            raise NoSuchDevice(f"snapshot {key!r} does not exist")
        return rec

    def stat(self, key: str) -> dict:
        with self.lock:
            return info_of(key, self._need(key))

    def update(self, info: dict, paths: list[str]) -> dict:
        """Change labels (the only mutable field): ``paths`` as in containerd's
        UpdateSnapshotRequest.update_mask ("labels", "labels.KEY"; empty = all)."""
        key = info["name"]
        new_labels = info.get("labels", {})
        check_labels(new_labels)
        with self.lock:
            self._need(key)
            with self.store.transaction() as body:
                rec = body["snapshots"][key]
                rec["labels"] = _apply_mask(rec["labels"], new_labels, paths)
                rec["updated"] = time.time_ns()
            return info_of(key, self.store.get(key))

    def list(self, filters: list[str]) -> list[dict]:
        match = compile_filters(filters)
        with self.lock:
            infos = [info_of(k, r) for k, r in self.store.body["snapshots"].items()]
        return [i for i in sorted(infos, key=lambda i: i["name"]) if match(i)]

    def usage(self, key: str) -> tuple[int, int]:
        """(bytes only this snapshot's device maps, inodes: 0 = not counted)."""
        with self.lock:
            rec = self._need(key)
            return self.pool.info(rec["device"]).exclusive, 0


def info_of(key: str, rec: dict) -> dict:
    return {"name": key, "parent": rec["parent"], "kind": rec["kind"],
            "created": rec["created"], "updated": rec["updated"],
            "labels": dict(rec["labels"])}


def _apply_mask(old: dict, new: dict, paths: list[str]) -> dict:
    if not paths or "labels" in paths:
        return dict(new)
    out = dict(old)
    for path in paths:
        field, _, label = path.partition(".")
        if field != "labels" or not label:
            raise UsageError(f"cannot update {path!r}: only labels are mutable")
        if label in new:
            out[label] = new[label]
        else:
            out.pop(label, None)
    return out


def check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise UsageError("a snapshot key must not be empty")
    if len(key.encode()) > 4096:
        raise UsageError(f"snapshot key is {len(key.encode())} bytes; the limit is 4096")


def check_labels(labels: dict) -> None:
    for k, v in labels.items():
        if len(k.encode()) + len(v.encode()) > MAX_LABEL_BYTES:
            raise UsageError(f"label {k[:40]!r} is longer than {MAX_LABEL_BYTES} bytes "
                             "(key and value together)")
