"""The CSI SnapshotMetadata service: allocated and changed ranges of snapshots, streamed.

Both calls come from the pool's map diff (thinstore/diff.py via
:func:`thinstore.replication.diff`): two snapshots of one volume share every map page
the volume did not write between them, and a shared page is skipped without reading
it, so GetMetadataDelta costs the change, not the volume.  GetMetadataAllocated is
the diff against nothing: every mapped range.  Ranges are VARIABLE_LENGTH extents of
whole chunks (coalesced), ascending and disjoint (spec.md "Metadata Format"); a
request's ``starting_offset`` clips the first range that reaches past it.
"""

from __future__ import annotations

from thinstore import replication

from . import csi_pb2 as pb
from . import csi_pb2_grpc as pbg
from . import ids
from .rpc import Code, RPCError, require, streaming

DEFAULT_RESULTS = 1024        # ranges per message when the request leaves it to us


class SnapshotMetadata(pbg.SnapshotMetadataServicer):

    def __init__(self, plugin):
        self.plugin = plugin
        self.pool = plugin.pool

    @streaming
    def GetMetadataAllocated(self, req, context):
        sid = self._snapshot(req.snapshot_id, "snapshot_id")
        size = self.plugin.size_of(sid)
        start = _start(req.starting_offset, size)
        per = _per_message(req.max_results)
        ranges = replication.diff(self.pool, sid).ranges
        yield from _stream(pb.GetMetadataAllocatedResponse, ranges, start, size, per)

    @streaming
    def GetMetadataDelta(self, req, context):
        base = self._snapshot(req.base_snapshot_id, "base_snapshot_id")
        target = self._snapshot(req.target_snapshot_id, "target_snapshot_id")
        if base.partition("@")[0] != target.partition("@")[0]:
            raise RPCError(Code.INVALID_ARGUMENT, f"{base!r} and {target!r} are snapshots of "
                           "different volumes")
        size = self.plugin.size_of(target)
        start = _start(req.starting_offset, size)
        per = _per_message(req.max_results)
        ranges = replication.diff(self.pool, target, base).ranges
        yield from _stream(pb.GetMetadataDeltaResponse, ranges, start, size, per)

    def _snapshot(self, sid: str, what: str) -> str:
        require(sid, what)
        if not ids.is_snapshot_id(sid) or not self.plugin.exists(sid):
            raise RPCError(Code.NOT_FOUND, f"snapshot {sid!r} does not exist")
        return sid


def _start(offset: int, size: int) -> int:
    if offset < 0 or offset > size:
        raise RPCError(Code.OUT_OF_RANGE, f"starting_offset {offset} lies outside the "
                       f"snapshot (0..{size})")
    return offset


def _per_message(max_results: int) -> int:
    if max_results < 0:
        raise RPCError(Code.INVALID_ARGUMENT, f"max_results {max_results} is negative")
    return max_results or DEFAULT_RESULTS


def _stream(response, ranges, start: int, size: int, per: int):
    """Responses of at most ``per`` ranges each, from ``start`` on; at least one message,
    so that the CO learns the capacity even of a snapshot with nothing in range."""
    batch, sent = [], False
    for r in ranges:
        end = r.offset + r.length
        if end <= start:
            continue
        lo = max(r.offset, start)
        batch.append(pb.BlockMetadata(byte_offset=lo, size_bytes=end - lo))
        if len(batch) == per:
            yield _message(response, batch, size)
            batch, sent = [], True
    if batch or not sent:
        yield _message(response, batch, size)


def _message(response, batch, size):
    return response(block_metadata_type=pb.VARIABLE_LENGTH, volume_capacity_bytes=size,
                    block_metadata=batch)
