"""The CSI Node service (spec.md "Node Service RPC") on top of the shared attach module.

    NodeStageVolume      mount access: attach the volume's NBD export as a kernel block
                         device and mount it at the staging path (a file system is made
                         only on a blank device: thinstore.frontends.attach; one smaller
                         than its device -- a clone made larger than its snapshot, a
                         volume expanded since -- is grown to fill it: attach.grow);
                         block access: attach only.
    NodePublishVolume    mount: bind-mount the staging path on the target (read-only when
                         asked); block: bind-mount the device node on a file at the target.
    NodeUnpublishVolume  unmount the target and remove it (the SP made it).
    NodeUnstageVolume    unmount the staging path and detach.
    NodeGetVolumeStats   statvfs of the path: bytes and inodes (block: the device's bytes).
    NodeExpandVolume     grow the mounted file system if it does not fill its device yet
                         (resize2fs / xfs_growfs; expansion is OFFLINE, so the stage
                         before has usually grown it already).

Every stage and publish is recorded (state.py's layout, ``POOL/csi/node``) before it is
made and dropped after it is undone, so each call is idempotent, and across restarts of
the plugin too: the NBD server that answers a staged device lives in this process, so a
stop or a crash ends every attachment (the attach module tears down what a dead process
left); :meth:`Node.recover` stages and publishes each recorded volume again, at the same
paths.  Workloads that held the old mounts open see I/O errors until they reopen.
"""

from __future__ import annotations

import os
import threading

from thinstore.frontends.attach import Attacher, AttachError, grow, host
from thinstore.frontends.attach.privileged import attempt, run

from . import caps
from . import csi_pb2 as pb
from . import csi_pb2_grpc as pbg
from .rpc import Code, RPCError, handler, log, require
from .state import State

OWNER = "csi-stage"                       # the attach module's owner id of a staged volume
RPC = pb.NodeServiceCapability.RPC.Type
CAPABILITIES = [RPC.STAGE_UNSTAGE_VOLUME, RPC.GET_VOLUME_STATS, RPC.EXPAND_VOLUME,
                RPC.SINGLE_NODE_MULTI_WRITER, RPC.VOLUME_CONDITION]
Mode = caps.Mode


class Node(pbg.NodeServicer):
    """Node RPCs of one node; ``plugin`` (service.py) gives the pool, node id, topology."""

    def __init__(self, plugin, attacher: Attacher | None = None):
        self.plugin = plugin
        self.state = State(plugin.state.dir, "node", ("stages", "publishes"))
        self.attacher = attacher or Attacher(os.path.join(plugin.state.dir, "attach.json"),
                                             plugin.nbd_socket,
                                             server=getattr(plugin, "nbd_server", None))
        self.lock = threading.RLock()     # one node operation at a time

    # ------------------------------------------------------------------ queries
    def staged(self, volume_id: str) -> bool:
        return self.state.get("stages", volume_id) is not None

    def publishes_of(self, volume_id: str) -> dict[str, dict]:
        return {t: r for t, r in self.state.items("publishes") if r["volume"] == volume_id}

    # ------------------------------------------------------------------ stage
    @handler
    def NodeStageVolume(self, req, context):
        vid = require(req.volume_id, "volume_id")
        path = os.path.abspath(require(req.staging_target_path, "staging_target_path"))
        cap = _capability(req, "volume_capability")
        with self.lock:
            self._need_volume(vid)
            rec = _stage_record(path, cap)
            old = self.state.get("stages", vid)
            if old is not None and old != rec:
                raise RPCError(Code.ALREADY_EXISTS, f"volume {vid!r} is staged at "
                               f"{old['path']} as {old['kind']}, not as asked")
            self.state.put("stages", vid, rec)
            try:
                self._stage(vid, rec)
            except BaseException:
                if old is None:
                    self._unstage(vid, rec)
                    self.state.drop("stages", vid)
                raise
        return pb.NodeStageVolumeResponse()

    def _stage(self, vid: str, rec: dict) -> None:
        if rec["kind"] == "block":
            rec_device = self.attacher.attach(vid, OWNER, read_only=rec["read_only"])
            os.makedirs(rec["path"], exist_ok=True)
            log.info("staged %s as block device %s", vid, rec_device)
            return
        grow.mount_grown(self.attacher, vid, rec["path"], OWNER, fstype=rec["fs"],
                         options=rec["flags"], read_only=rec["read_only"])

    @handler
    def NodeUnstageVolume(self, req, context):
        vid = require(req.volume_id, "volume_id")
        path = os.path.abspath(require(req.staging_target_path, "staging_target_path"))
        with self.lock:
            rec = self.state.get("stages", vid)
            if rec is None:
                return pb.NodeUnstageVolumeResponse()      # never staged, or done before
            if rec["path"] != path:
                raise RPCError(Code.NOT_FOUND, f"volume {vid!r} is staged at {rec['path']}, "
                               f"not at {path}")
            if self.publishes_of(vid):
                raise RPCError(Code.FAILED_PRECONDITION, f"volume {vid!r} is still published "
                               f"at {', '.join(sorted(self.publishes_of(vid)))}")
            self._unstage(vid, rec)
            self.state.drop("stages", vid)    # the attacher waited for the hang-up
        return pb.NodeUnstageVolumeResponse()

    def _unstage(self, vid: str, rec: dict) -> None:
        if rec["kind"] == "block":
            self.attacher.detach(vid, OWNER)
        else:
            self.attacher.unmount(vid, OWNER)

    # ------------------------------------------------------------------ publish
    @handler
    def NodePublishVolume(self, req, context):
        vid = require(req.volume_id, "volume_id")
        target = os.path.abspath(require(req.target_path, "target_path"))
        cap = _capability(req, "volume_capability")
        if not req.staging_target_path:
            raise RPCError(Code.FAILED_PRECONDITION, "staging_target_path is required: "
                           "this plugin stages volumes (STAGE_UNSTAGE_VOLUME)")
        with self.lock:
            self._need_volume(vid)
            stage = self.state.get("stages", vid)
            if stage is None or stage["path"] != os.path.abspath(req.staging_target_path):
                raise RPCError(Code.FAILED_PRECONDITION, f"volume {vid!r} is not staged at "
                               f"{req.staging_target_path}; call NodeStageVolume first")
            asked = cap.WhichOneof("access_type")
            if asked != stage["kind"]:      # a device node where a directory was asked
                raise RPCError(Code.INVALID_ARGUMENT, f"volume {vid!r} is staged as "
                               f"{stage['kind']}, so it cannot be published as {asked}")
            rec = {"volume": vid, "kind": stage["kind"],
                   "read_only": bool(req.readonly or stage["read_only"]),
                   "mode": cap.access_mode.mode}
            self._check_publish(vid, target, rec, cap)
            self.state.put("publishes", target, rec)
            try:
                self._publish(vid, stage, target, rec)
            except BaseException:
                self._unpublish(target, rec)
                self.state.drop("publishes", target)
                raise
        return pb.NodePublishVolumeResponse()

    def _check_publish(self, vid, target, rec, cap) -> None:
        old = self.state.get("publishes", target)
        if old is not None and old != rec:
            raise RPCError(Code.ALREADY_EXISTS, f"{target} is published already, with "
                           "another volume or other options")
        others = [t for t in self.publishes_of(vid) if t != target]
        if others and cap.access_mode.mode == Mode.SINGLE_NODE_SINGLE_WRITER:
            raise RPCError(Code.FAILED_PRECONDITION, f"volume {vid!r} is "
                           f"SINGLE_NODE_SINGLE_WRITER and published at {others[0]} already")

    def _publish(self, vid: str, stage: dict, target: str, rec: dict) -> None:
        if rec["kind"] == "block":
            source = self.attacher.attach(vid, OWNER, read_only=stage["read_only"])
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if not os.path.exists(target):
                open(target, "a").close()
        else:
            source = stage["path"]
            os.makedirs(target, exist_ok=True)
        mounted = host.mount_at(target)
        if mounted is not None and _bound_from(target, source):
            return                                            # done before: idempotent
        run(["mount", "--bind", source, target], what=f"publish {vid} at {target}")
        if rec["read_only"]:
            run(["mount", "-o", "remount,bind,ro", target], what=f"make {target} read-only")

    @handler
    def NodeUnpublishVolume(self, req, context):
        vid = require(req.volume_id, "volume_id")
        target = os.path.abspath(require(req.target_path, "target_path"))
        with self.lock:
            rec = self.state.get("publishes", target)
            if rec is not None and rec["volume"] != vid:
                raise RPCError(Code.NOT_FOUND, f"{target} publishes {rec['volume']!r}, "
                               f"not {vid!r}")
            self._unpublish(target, rec)
            self.state.drop("publishes", target)
        return pb.NodeUnpublishVolumeResponse()

    def _unpublish(self, target: str, rec: dict | None, lazy: bool = False) -> None:
        while host.mount_at(target) is not None:
            if not attempt(["umount", target], what=f"unpublish {target}"):
                run(["umount", "-l", target], what=f"lazily unpublish {target}")
        if lazy:
            return
        if os.path.isdir(target) and not os.path.islink(target):
            os.rmdir(target)
        elif os.path.lexists(target):
            os.unlink(target)

    # ------------------------------------------------------------------ stats, expand
    @handler
    def NodeGetVolumeStats(self, req, context):
        vid = require(req.volume_id, "volume_id")
        path = os.path.abspath(require(req.volume_path, "volume_path"))
        with self.lock:
            kind = self._kind_at(vid, path)
        if kind == "block":
            size = self.plugin.size_of(vid)
            usage = [pb.VolumeUsage(unit=pb.VolumeUsage.BYTES, total=size)]
        else:
            st = os.statvfs(path)
            usage = [pb.VolumeUsage(unit=pb.VolumeUsage.BYTES, total=st.f_blocks * st.f_frsize,
                                    available=st.f_bavail * st.f_frsize,
                                    used=(st.f_blocks - st.f_bfree) * st.f_frsize),
                     pb.VolumeUsage(unit=pb.VolumeUsage.INODES, total=st.f_files,
                                    available=st.f_favail, used=st.f_files - st.f_ffree)]
        healthy = host.mount_at(path) is not None
        condition = pb.VolumeCondition(abnormal=not healthy,
                                       message="mounted" if healthy else f"{path} is not mounted")
        return pb.NodeGetVolumeStatsResponse(usage=usage, volume_condition=condition)

    def _kind_at(self, vid: str, path: str) -> str:
        """'mount' or 'block' when ``path`` is where ``vid`` is staged or published."""
        self._need_volume(vid)
        stage = self.state.get("stages", vid)
        pub = self.state.get("publishes", path)
        if pub is not None and pub["volume"] == vid:
            return pub["kind"]
        if stage is not None and stage["path"] == path:
            return stage["kind"]
        raise RPCError(Code.NOT_FOUND, f"volume {vid!r} is not staged or published at {path}")

    @handler
    def NodeExpandVolume(self, req, context):
        vid = require(req.volume_id, "volume_id")
        path = os.path.abspath(require(req.volume_path, "volume_path"))
        if req.HasField("volume_capability"):
            caps.check_capabilities([req.volume_capability])
        with self.lock:
            kind = self._kind_at(vid, path)
            size = self.plugin.size_of(vid)
            required, limit = caps.check_range(req.capacity_range)
            if limit and size > limit:
                raise RPCError(Code.OUT_OF_RANGE, f"volume is {size} bytes, more than "
                               f"limit_bytes {limit}")
            if kind == "mount" and not grow.fits_device(self.attacher, vid):
                self.attacher.grow_filesystem(vid)
        return pb.NodeExpandVolumeResponse(capacity_bytes=size)

    # ------------------------------------------------------------------ info
    @handler
    def NodeGetCapabilities(self, req, context):
        return pb.NodeGetCapabilitiesResponse(capabilities=[
            pb.NodeServiceCapability(rpc=pb.NodeServiceCapability.RPC(type=t))
            for t in CAPABILITIES])

    @handler
    def NodeGetInfo(self, req, context):
        return pb.NodeGetInfoResponse(node_id=self.plugin.node_id,
                                      accessible_topology=self.plugin.topology()[0])

    # ------------------------------------------------------------------ helpers
    def _need_volume(self, vid: str) -> None:
        from . import ids
        if not ids.is_volume_id(vid) or not self.plugin.exists(vid):
            raise RPCError(Code.NOT_FOUND, f"volume {vid!r} does not exist")

    # ------------------------------------------------------------------ start, stop
    def recover(self) -> None:
        """Tear down what a previous process left, then stage and publish every recorded
        volume again (the previous process's NBD server, and with it every device it
        served, is gone)."""
        self.attacher.recover()
        grow.forget_holds(self.attacher)
        with self.lock:
            for target, rec in list(self.state.items("publishes")):
                self._unpublish(target, rec, lazy=True)
            for vid, rec in list(self.state.items("stages")):
                try:
                    self._stage(vid, rec)
                except (AttachError, OSError, RPCError) as err:
                    log.error("could not stage %s again at %s: %s", vid, rec["path"], err)
            for target, rec in list(self.state.items("publishes")):
                stage = self.state.get("stages", rec["volume"])
                try:
                    self._publish(rec["volume"], stage, target, rec)
                except (AttachError, OSError, TypeError) as err:
                    log.error("could not publish %s again at %s: %s", rec["volume"], target, err)

    def close(self) -> None:
        """Plugin stop: unmount the published targets (kept recorded: recover() binds them
        again) before the attach module unmounts and detaches, while the server lives."""
        with self.lock:
            for target, rec in list(self.state.items("publishes")):
                try:
                    self._unpublish(target, rec, lazy=True)
                except AttachError as err:
                    log.error("%s", err)
        self.attacher.close()


def _capability(req, field: str):
    if not req.HasField(field):
        raise RPCError(Code.INVALID_ARGUMENT, f"{field} is required")
    cap = getattr(req, field)
    why = caps.problem(cap)
    if why:
        malformed = cap.WhichOneof("access_type") is None or cap.access_mode.mode == Mode.UNKNOWN
        raise RPCError(Code.INVALID_ARGUMENT if malformed else Code.FAILED_PRECONDITION, why)
    return cap


def _stage_record(path: str, cap) -> dict:
    kind = cap.WhichOneof("access_type")
    return {"path": path, "kind": kind,
            "fs": caps.fs_type(cap) if kind == "mount" else None,
            "flags": list(cap.mount.mount_flags) if kind == "mount" else [],
            "read_only": cap.access_mode.mode in caps.READ_ONLY_MODES}


def _bound_from(target: str, source: str) -> bool:
    """Whether ``target`` is a bind mount of ``source`` (same device and inode)."""
    try:
        a, b = os.stat(target), os.stat(source)
    except OSError:
        return False
    if os.path.isdir(source):
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    return a.st_rdev == b.st_rdev
