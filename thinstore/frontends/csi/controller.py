"""The CSI Controller service over a pool (spec.md "Controller Service RPC").

Volumes and snapshots are pool devices named by ids.py; their CSI parameters live in
state.py's records, written before a device is made and dropped after it is destroyed.
What each call does to the pool:

    CreateVolume            create_volume (empty), or clone of a snapshot, or, for a volume
                            source, snapshot -> clone -> destroy the transient snapshot;
                            then resize up to the requested size.  O(map pages), no data.
    DeleteVolume            destroy (its snapshots stay whole: no device depends on another)
    CreateSnapshot          snapshot VOLUME@csi.NAME (shares every map page; commits)
    DeleteSnapshot          destroy the snapshot
    ControllerExpandVolume  resize up (offline: refused while an NBD client has it open)
    GetCapacity             the pool's free bytes

Every create is idempotent by name: the record says what the name was created with; the
same request finds it and finishes whatever a crash left undone (:meth:`_ensure_volume`),
another request under that name is ALREADY_EXISTS.
"""

from __future__ import annotations

import threading
import time

from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import Int64Value

from thinstore.errors import UsageError
from thinstore.frontends.attach import fsbounds
from thinstore.units import max_device_size

from . import caps, ids
from . import csi_pb2 as pb
from . import csi_pb2_grpc as pbg
from .rpc import Code, RPCError, crash_point, handler, log, page, require

RPC = pb.ControllerServiceCapability.RPC.Type
CAPABILITIES = [RPC.CREATE_DELETE_VOLUME, RPC.LIST_VOLUMES, RPC.GET_CAPACITY,
                RPC.CREATE_DELETE_SNAPSHOT, RPC.LIST_SNAPSHOTS, RPC.CLONE_VOLUME,
                RPC.EXPAND_VOLUME, RPC.GET_VOLUME, RPC.LIST_VOLUMES_PUBLISHED_NODES,
                RPC.SINGLE_NODE_MULTI_WRITER]


class Controller(pbg.ControllerServicer):
    """Controller RPCs; ``plugin`` (service.py) gives the pool, state, node and topology."""

    def __init__(self, plugin):
        self.plugin = plugin
        self.pool = plugin.pool
        self.state = plugin.state
        self.lock = threading.RLock()    # one controller operation at a time

    # ------------------------------------------------------------------ volumes
    @handler
    def CreateVolume(self, req, context):
        name = self.plugin.csi_name(req.name)
        caps.check_capabilities(req.volume_capabilities)
        params = caps.check_parameters(req.parameters)
        required, limit = caps.check_range(req.capacity_range)
        source = _source_of(req)
        self._need_this_node(req)
        with self.lock:
            rec = self.state.get("volumes", name)
            if rec is not None:
                self._same_volume(name, rec, required, limit, params, source)
            else:
                rec = self._new_volume_record(name, required, limit, params, source)
                self._need_fs_room(rec["size"], source, req.volume_capabilities)
                self.state.put("volumes", name, rec)
                crash_point("volume-recorded")
            try:
                self._ensure_volume(rec)
            except BaseException:
                if not self._exists(rec["id"]):    # nothing made: the name is free again
                    self.state.drop("volumes", name)
                raise
            crash_point("volume-made")
            return pb.CreateVolumeResponse(volume=self._volume(rec))

    def _need_this_node(self, req) -> None:
        """RESOURCE_EXHAUSTED when the requisite topologies all exclude this node (the
        pool lives here; spec.md CreateVolume, "Unable to provision in topology")."""
        requisite = req.accessibility_requirements.requisite
        mine = self.plugin.topology()[0].segments
        if requisite and not any(all(mine.get(k) == v for k, v in t.segments.items())
                                 for t in requisite):
            raise RPCError(Code.RESOURCE_EXHAUSTED, f"this plugin's pool is on node "
                           f"{self.plugin.node_id!r}, which no requisite topology allows")

    def _same_volume(self, name, rec, required, limit, params, source) -> None:
        why = None
        if rec["params"] != params:
            why = "other parameters"
        elif rec["source"] != source:
            why = "another content source"
        elif not caps.fits(rec["size"], required, limit):
            why = f"a size of {rec['size']} bytes, outside the requested range"
        if why:
            raise RPCError(Code.ALREADY_EXISTS, f"volume {name!r} exists with {why}")

    def _new_volume_record(self, name, required, limit, params, source) -> dict:
        floor = self._source_size(source) if source else 0
        size = caps.choose_size(required, limit, self.pool.chunk_size, floor)
        if size > max_device_size(self.pool.chunk_size):
            raise RPCError(Code.OUT_OF_RANGE, f"{size} bytes is more than this pool's "
                           f"largest volume ({max_device_size(self.pool.chunk_size)})")
        self._need_room(size, caps.overcommit(params))
        return {"id": ids.volume_device(name), "size": size, "params": params,
                "source": source, "created": time.time()}

    def _need_room(self, size: int, ratio: float | None) -> None:
        """RESOURCE_EXHAUSTED when the pool is full, or when the new volume would make the
        plugin's volumes promise more than ``ratio`` times the pool's capacity."""
        status = self.pool.status()
        if status["free"] <= 0:
            raise RPCError(Code.RESOURCE_EXHAUSTED, "the pool has no free chunk left")
        if ratio is not None:
            promised = sum(self._sizes("volumes").values()) + size
            if promised > ratio * status["capacity"]:
                raise RPCError(Code.RESOURCE_EXHAUSTED, f"volumes would promise {promised} "
                               f"bytes, more than overcommit {ratio:g} x the pool's "
                               f"{status['capacity']} bytes")

    def _need_fs_room(self, size: int, source: dict | None, capabilities) -> None:
        """The file system a mount capability makes on the volume (or the one its source
        holds, grown at its first stage) must fit: OUT_OF_RANGE for a size below what
        mkfs takes (spec.md CreateVolume, "Unsupported capacity_range"), and
        RESOURCE_EXHAUSTED when the metadata mkfs or the grow writes would not fit the
        pool's free space (as for a full pool: attach.fsbounds)."""
        wanted = {caps.fs_type(c) for c in capabilities
                  if c.WhichOneof("access_type") == "mount"}
        if not wanted:
            return                                # block access: no file system made
        sid = next(iter(source.values())) if source else None
        made = fsbounds.probe_fs(self.pool, sid) if sid else None
        base = self.plugin.size_of(sid) if made else 0
        types = {made} if made else wanted
        status = self.pool.status()
        for fs in sorted(types):
            why = None if made else fsbounds.too_small(fs, size)
            if why:
                raise RPCError(Code.OUT_OF_RANGE, f"a volume of {size} bytes: {why}")
            why = fsbounds.too_large(status, fs, size, base)
            if why:
                raise RPCError(Code.RESOURCE_EXHAUSTED, f"a volume of {size} bytes: {why}")

    def _source_size(self, source: dict) -> int:
        (kind, sid), = source.items()
        valid = ids.is_snapshot_id(sid) if kind == "snapshot" else ids.is_volume_id(sid)
        if not valid or not self._exists(sid):
            raise RPCError(Code.NOT_FOUND, f"source {kind} {sid!r} does not exist")
        return self.plugin.size_of(sid)

    def _ensure_volume(self, rec: dict) -> None:
        """Make the pool hold what ``rec`` describes; each step is skipped when done, so
        a retry (or the start after a crash) finishes a create cut short anywhere."""
        dev = rec["id"]
        if not self._exists(dev):
            source = rec["source"] or {}
            if "snapshot" in source:
                self.pool.clone(self._existing(source["snapshot"]), dev)
            elif "volume" in source:
                self._clone_volume(self._existing(source["volume"]), dev)
            else:
                self.pool.create_volume(dev, rec["size"])
        if self.plugin.size_of(dev) < rec["size"]:
            self.pool.resize(dev, rec["size"])

    def _clone_volume(self, src: str, dev: str) -> None:
        temp = ids.clone_temp(src, dev)
        if not self._exists(temp):
            with self.plugin.frozen(src):          # a staged source: a consistent clone
                self.pool.snapshot(temp)
        crash_point("clone-snapshotted")
        self.pool.clone(temp, dev)
        crash_point("clone-made")
        self.pool.destroy(temp)

    def _existing(self, device: str) -> str:
        if not self._exists(device):
            raise RPCError(Code.NOT_FOUND, f"source {device!r} no longer exists")
        return device

    @handler
    def DeleteVolume(self, req, context):
        vid = require(req.volume_id, "volume_id")
        with self.lock:
            if self.plugin.staged(vid):
                raise RPCError(Code.FAILED_PRECONDITION, f"volume {vid!r} is staged on "
                               "this node; unstage it first")
            if ids.is_volume_id(vid) and self._exists(vid):
                self.pool.destroy(vid)        # DeviceBusy -> FAILED_PRECONDITION
            found = self.state.by_id("volumes", vid)
            if found:
                self.state.drop("volumes", found[0])
            return pb.DeleteVolumeResponse()

    @handler
    def ValidateVolumeCapabilities(self, req, context):
        vid = require(req.volume_id, "volume_id")
        require(req.volume_capabilities, "volume_capabilities")
        with self.lock:
            _name, rec = self._volume_record(vid)
        for cap in req.volume_capabilities:
            why = caps.problem(cap)
            if why:
                return pb.ValidateVolumeCapabilitiesResponse(message=why)
        if req.parameters and dict(req.parameters) != rec["params"]:
            return pb.ValidateVolumeCapabilitiesResponse(
                message="the parameters differ from the ones the volume was created with")
        confirmed = pb.ValidateVolumeCapabilitiesResponse.Confirmed(
            volume_context=req.volume_context, volume_capabilities=req.volume_capabilities,
            parameters=req.parameters)
        return pb.ValidateVolumeCapabilitiesResponse(confirmed=confirmed)

    @handler
    def ListVolumes(self, req, context):
        with self.lock:
            sizes = self._sizes("volumes")
            recs = {r["id"]: r for _, r in self.state.items("volumes") if r["id"] in sizes}
            chosen, token = page(list(recs), req.starting_token, req.max_entries)
            entries = [pb.ListVolumesResponse.Entry(
                volume=self._volume(recs[i], sizes[i]),
                status=pb.ListVolumesResponse.VolumeStatus(
                    published_node_ids=self.plugin.published_nodes(i))) for i in chosen]
        return pb.ListVolumesResponse(entries=entries, next_token=token)

    @handler
    def ControllerGetVolume(self, req, context):
        vid = require(req.volume_id, "volume_id")
        with self.lock:
            _name, rec = self._volume_record(vid)
            status = pb.ControllerGetVolumeResponse.VolumeStatus(
                published_node_ids=self.plugin.published_nodes(vid),
                volume_condition=pb.VolumeCondition(abnormal=False, message="ok"))
            return pb.ControllerGetVolumeResponse(volume=self._volume(rec), status=status)

    @handler
    def GetCapacity(self, req, context):
        for cap in req.volume_capabilities:
            if caps.problem(cap):
                return pb.GetCapacityResponse(available_capacity=0)
        status = self.pool.status()
        return pb.GetCapacityResponse(
            available_capacity=status["free"],
            maximum_volume_size=Int64Value(value=max_device_size(self.pool.chunk_size)),
            minimum_volume_size=Int64Value(value=caps.ALIGN))

    @handler
    def ControllerExpandVolume(self, req, context):
        vid = require(req.volume_id, "volume_id")
        if not req.HasField("capacity_range"):
            raise RPCError(Code.INVALID_ARGUMENT, "capacity_range is required")
        required, limit = caps.check_range(req.capacity_range)
        if req.HasField("volume_capability"):
            caps.check_capabilities([req.volume_capability])
        with self.lock:
            name, rec = self._volume_record(vid)
            size = self.plugin.size_of(vid)
            if size < required:
                size = self._grow(vid, required, limit)
                rec = dict(rec, size=size)
                self.state.put("volumes", name, rec)
            elif limit and size > limit:
                raise RPCError(Code.OUT_OF_RANGE, f"volume is {size} bytes, more than "
                               f"limit_bytes {limit}; volumes do not shrink")
        block = req.volume_capability.WhichOneof("access_type") == "block"
        return pb.ControllerExpandVolumeResponse(capacity_bytes=size,
                                                 node_expansion_required=not block)

    def _grow(self, vid: str, required: int, limit: int) -> int:
        if self.plugin.in_use(vid):
            raise RPCError(Code.FAILED_PRECONDITION, f"volume {vid!r} is attached; thinstore "
                           "expands volumes offline (unpublish and unstage it first)")
        size = caps.choose_size(required, limit, self.pool.chunk_size)
        try:
            self.pool.resize(vid, size)
        except UsageError as err:
            raise RPCError(Code.OUT_OF_RANGE, str(err)) from None
        return size

    @handler
    def ControllerGetCapabilities(self, req, context):
        return pb.ControllerGetCapabilitiesResponse(capabilities=[
            pb.ControllerServiceCapability(rpc=pb.ControllerServiceCapability.RPC(type=t))
            for t in CAPABILITIES])

    # ------------------------------------------------------------------ snapshots
    @handler
    def CreateSnapshot(self, req, context):
        name = self.plugin.csi_name(req.name)
        vid = require(req.source_volume_id, "source_volume_id")
        params = dict(req.parameters)
        with self.lock:
            rec = self.state.get("snapshots", name)
            if rec is not None and (rec["source"] != vid or rec["params"] != params):
                raise RPCError(Code.ALREADY_EXISTS, f"snapshot {name!r} exists, of volume "
                               f"{rec['source']!r}")
            if rec is None:
                if not (ids.is_volume_id(vid) and self._exists(vid)):
                    raise RPCError(Code.NOT_FOUND, f"volume {vid!r} does not exist")
                if self.pool.status()["free"] <= 0:
                    raise RPCError(Code.RESOURCE_EXHAUSTED, "the pool has no free chunk left")
                rec = {"id": ids.snapshot_device(vid, name), "source": vid, "params": params,
                       "created": time.time()}
                self.state.put("snapshots", name, rec)
            try:
                if not self._exists(rec["id"]):
                    with self.plugin.frozen(vid):     # a staged file system, consistent
                        self.pool.snapshot(rec["id"])
            except BaseException:
                if not self._exists(rec["id"]):
                    self.state.drop("snapshots", name)
                raise
            crash_point("snapshot-made")
            return pb.CreateSnapshotResponse(snapshot=self._snapshot(rec))

    @handler
    def DeleteSnapshot(self, req, context):
        sid = require(req.snapshot_id, "snapshot_id")
        with self.lock:
            if ids.is_snapshot_id(sid) and self._exists(sid):
                self.pool.destroy(sid)        # DeviceBusy -> FAILED_PRECONDITION
            found = self.state.by_id("snapshots", sid)
            if found:
                self.state.drop("snapshots", found[0])
            return pb.DeleteSnapshotResponse()

    @handler
    def ListSnapshots(self, req, context):
        with self.lock:
            sizes = self._sizes("snapshots")
            recs = {r["id"]: r for _, r in self.state.items("snapshots") if r["id"] in sizes}
            if req.snapshot_id:
                recs = {k: v for k, v in recs.items() if k == req.snapshot_id}
            if req.source_volume_id:
                recs = {k: v for k, v in recs.items() if v["source"] == req.source_volume_id}
            chosen, token = page(list(recs), req.starting_token, req.max_entries)
            entries = [pb.ListSnapshotsResponse.Entry(snapshot=self._snapshot(recs[i], sizes[i]))
                       for i in chosen]
        return pb.ListSnapshotsResponse(entries=entries, next_token=token)

    # ------------------------------------------------------------------ helpers
    def _exists(self, device: str) -> bool:
        return self.plugin.exists(device)

    def _sizes(self, kind: str) -> dict[str, int]:
        """device -> size of the records' devices that exist (O(records), no map pages)."""
        sizes = {r["id"]: self.plugin.size_of(r["id"]) for _, r in self.state.items(kind)}
        return {k: v for k, v in sizes.items() if v is not None}

    def _volume_record(self, vid: str) -> tuple[str, dict]:
        found = self.state.by_id("volumes", vid) if ids.is_volume_id(vid) else None
        if found is None or not self._exists(vid):
            raise RPCError(Code.NOT_FOUND, f"volume {vid!r} does not exist")
        return found

    def _volume(self, rec: dict, size: int | None = None) -> pb.Volume:
        vol = pb.Volume(volume_id=rec["id"],
                        capacity_bytes=size if size is not None else self.plugin.size_of(rec["id"]),
                        accessible_topology=self.plugin.topology())
        source = rec["source"] or {}
        if "snapshot" in source:
            vol.content_source.snapshot.snapshot_id = source["snapshot"]
        elif "volume" in source:
            vol.content_source.volume.volume_id = source["volume"]
        return vol

    def _snapshot(self, rec: dict, size: int | None = None) -> pb.Snapshot:
        created = Timestamp()
        created.FromNanoseconds(int(rec["created"] * 1e9))
        size = size if size is not None else self.plugin.size_of(rec["id"])
        return pb.Snapshot(snapshot_id=rec["id"], source_volume_id=rec["source"],
                           size_bytes=size, creation_time=created, ready_to_use=True)

    # ------------------------------------------------------------------ start
    def recover(self) -> None:
        """At start: remove transient clone snapshots, drop records whose device a crash
        kept from being made, and finish every volume a crash left smaller than asked."""
        with self.lock:
            for _name, rec in list(self.state.items("volumes")):
                source = (rec["source"] or {}).get("volume")
                temp = ids.clone_temp(source, rec["id"]) if source else None
                if temp and self._exists(temp):
                    log.warning("removing %s, left by a clone a crash interrupted", temp)
                    self.pool.destroy(temp, force=True)
            for name in self.state.reconcile(self._exists):
                log.warning("dropped the record of %r: its create never finished", name)
            for _name, rec in list(self.state.items("volumes")):
                self._ensure_volume(rec)


def _source_of(req) -> dict | None:
    kind = req.volume_content_source.WhichOneof("type") \
        if req.HasField("volume_content_source") else None
    if kind == "snapshot":
        return {"snapshot": require(req.volume_content_source.snapshot.snapshot_id,
                                    "volume_content_source.snapshot.snapshot_id")}
    if kind == "volume":
        return {"volume": require(req.volume_content_source.volume.volume_id,
                                  "volume_content_source.volume.volume_id")}
    return None
