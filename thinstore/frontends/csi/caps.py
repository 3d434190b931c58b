"""What a thinstore volume can be: access modes, access types, sizes, parameters.

Every volume lives in one node's pool and reaches that node's kernel as a block device
(NBD), so it can be used by one node at a time; on that node, by any number of
workloads (SINGLE_NODE_MULTI_WRITER: bind mounts of one staged file system).  Both
access types are served: ``block`` (the device node itself) and ``mount`` with
:data:`FS_TYPES`.
"""

from __future__ import annotations

import shutil

from . import csi_pb2 as pb
from .rpc import Code, RPCError

Mode = pb.VolumeCapability.AccessMode.Mode

#: the access modes a node-local block device can honour
MODES = {Mode.SINGLE_NODE_WRITER, Mode.SINGLE_NODE_READER_ONLY,
         Mode.SINGLE_NODE_SINGLE_WRITER, Mode.SINGLE_NODE_MULTI_WRITER}
READ_ONLY_MODES = {Mode.SINGLE_NODE_READER_ONLY, Mode.MULTI_NODE_READER_ONLY}
#: file systems the plugin makes and grows (the mkfs and grow tools they need)
FS_TYPES = {"ext4": ("mkfs.ext4", "resize2fs"),
            "xfs": ("mkfs.xfs", "xfs_growfs")}
DEFAULT_FS = "ext4"
DEFAULT_SIZE = 1 << 30          # a CreateVolume without a capacity range gets 1 GiB
ALIGN = 4096                    # sizes are whole 4 KiB blocks (loop and NBD devices need it)

#: StorageClass parameters the plugin understands (docs/csi.md, "Parameters"):
#: overcommit  how many times the pool's capacity the plugin's volumes may promise in
#:             total, counting the new one (a positive number; unset: no limit)
PARAMETERS = {"overcommit"}
#: keys the Kubernetes sidecars may add (--extra-create-metadata); recorded, not used
PASSED_PREFIX = "csi.storage.k8s.io/"


def fs_type(cap) -> str:
    return cap.mount.fs_type or DEFAULT_FS


def problem(cap) -> str | None:
    """Why this VolumeCapability cannot be served, or None."""
    kind = cap.WhichOneof("access_type")
    if kind is None:
        return "a volume capability needs an access type (block or mount)"
    if not cap.HasField("access_mode") or cap.access_mode.mode == Mode.UNKNOWN:
        return "a volume capability needs an access mode"
    if cap.access_mode.mode not in MODES:
        name = Mode.Name(cap.access_mode.mode)
        return f"access mode {name} is not served: a thinstore volume is attached to one node"
    if kind == "mount" and fs_type(cap) not in FS_TYPES:
        return (f"file system {cap.mount.fs_type!r} is not served; use one of "
                f"{', '.join(sorted(FS_TYPES))}")
    if kind == "mount" and not shutil.which(FS_TYPES[fs_type(cap)][0]):
        return f"{FS_TYPES[fs_type(cap)][0]} is not installed on this node"
    return None


def check_capabilities(caps, required: bool = True) -> None:
    """INVALID_ARGUMENT unless every capability is served (CreateVolume's rule)."""
    if required and not caps:
        raise RPCError(Code.INVALID_ARGUMENT, "volume_capabilities is required")
    for cap in caps:
        why = problem(cap)
        if why:
            raise RPCError(Code.INVALID_ARGUMENT, why)


def check_parameters(params) -> dict:
    """The parameters as a plain dict; INVALID_ARGUMENT for a key the plugin does not know."""
    unknown = [k for k in params if k not in PARAMETERS and not k.startswith(PASSED_PREFIX)]
    if unknown:
        raise RPCError(Code.INVALID_ARGUMENT,
                       f"unknown parameter(s) {', '.join(sorted(unknown))}; thinstore takes "
                       f"{', '.join(sorted(PARAMETERS))}")
    if "overcommit" in params:
        overcommit(params)
    return dict(params)


def overcommit(params) -> float | None:
    """The ``overcommit`` ratio of the parameters (None: unlimited); INVALID_ARGUMENT."""
    text = params.get("overcommit")
    if text is None:
        return None
    try:
        ratio = float(text)
    except ValueError:
        ratio = 0.0
    if not ratio > 0 or ratio == float("inf"):
        raise RPCError(Code.INVALID_ARGUMENT, f"overcommit {text!r} is not a positive number")
    return ratio


def check_range(rng) -> tuple[int, int]:
    """(required, limit) in bytes, 0 meaning unset; INVALID_ARGUMENT / OUT_OF_RANGE."""
    required, limit = rng.required_bytes, rng.limit_bytes
    if required < 0 or limit < 0:
        raise RPCError(Code.INVALID_ARGUMENT, "capacity_range bytes must not be negative")
    if limit and required > limit:
        raise RPCError(Code.OUT_OF_RANGE, f"required_bytes {required} exceeds limit_bytes "
                       f"{limit}")
    return required, limit


def choose_size(required: int, limit: int, chunk_size: int, floor: int = 0) -> int:
    """The size a new volume gets: ``required`` (or ``floor``, the size of its content
    source, or :data:`DEFAULT_SIZE`) rounded up to a chunk, kept under ``limit`` by
    rounding to 4 KiB instead.  OUT_OF_RANGE when no such size fits, or when the range
    would shrink the source."""
    if limit and floor > limit:
        raise RPCError(Code.OUT_OF_RANGE, f"the source holds {floor} bytes, more than "
                       f"limit_bytes {limit}")
    want = max(required, floor) or (min(DEFAULT_SIZE, limit) if limit else DEFAULT_SIZE)
    size = -(-want // chunk_size) * chunk_size
    if limit and size > limit:
        size = -(-want // ALIGN) * ALIGN
    if size == 0 or (limit and size > limit):
        raise RPCError(Code.OUT_OF_RANGE, f"no size of whole 4 KiB blocks lies in "
                       f"[{required}, {limit or 'unlimited'}] bytes")
    return size


def fits(size: int, required: int, limit: int) -> bool:
    """Whether an existing volume of ``size`` bytes answers the range (idempotent create)."""
    return size >= required and (not limit or size <= limit)
