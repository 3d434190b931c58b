"""Which volume sizes a file system can be made on, in a pool with how much free space.

File-system facts every frontend that formats a thin volume needs (the Docker plugin's
Create, CSI's CreateVolume): a thin volume takes pool space only where it is written,
but mkfs writes its metadata at the first mount, and that grows with the volume's
*virtual* size: ext4 writes a copy of every block group's descriptor into each backup
group and a bitmap block per flex group (xfs writes a few blocks per allocation group;
it zeroes its log, up to 2 GiB, with write-zeroes requests, which the pool answers by
unmapping: measured through the Docker plugin, a 4 TiB xfs takes 2 MiB of the pool, a
4 TiB ext4 177 MiB).  A 1 PiB ext4 writes ~15 GiB (45 GiB in 64 KiB chunks): on a small
pool, the first mount would run mkfs until the pool is full.  A frontend refuses such a
size when the volume is created (:func:`too_large`), and a size below :data:`MINIMUM`
(:func:`too_small`), which mkfs would refuse at the first mount, after the volume was
accepted.

:func:`mkfs_footprint` estimates the pool bytes mkfs takes (an upper bound for the mkfs
options of :mod:`.filesystem`: ext4 with lazy inode table and journal initialisation,
no discard; xfs with no discard).  Sources: the ext4 disk layout (kernel.org,
Documentation/filesystems/ext4: block groups of 32768 4 KiB blocks, 64-byte group
descriptors with 64bit, backups in groups 1 and powers of 3, 5 and 7 with sparse_super,
flex_bg of 16 groups, e2fsprogs' mke2fs.conf defaults); mkfs.xfs(8) (allocation groups
of at most 1 TiB, at least 4).  Checked against mkfs on sparse files counted in chunks
(tests/test_docker_fsbounds.py).

:func:`probe_fs` reads which of the two a pool device holds, without attaching it.
"""

from __future__ import annotations

from thinstore.errors import ThinstoreError
from thinstore.units import format_size

MiB = 1 << 20
GiB = 1 << 30
TiB = 1 << 40

#: the smallest volume each file system is made on: below 2 MiB mkfs.ext4 makes no
#: journal (so a crash needs a full fsck) or fails; mkfs.xfs refuses below 300 MiB
MINIMUM = {"ext4": 2 * MiB, "xfs": 300 * MiB}

EXT4_BLOCK = 4096
EXT4_GROUP = 32768 * EXT4_BLOCK        # bytes per block group
EXT4_DESC = 64                         # bytes per group descriptor (64bit feature)
EXT4_FLEX = 16                         # groups per flex group
XFS_AG_MAX = TiB
SLACK = 8 * MiB                        # the journal's and root's blocks, small file systems


def _roundup(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _ext4_backup_groups(groups: int) -> int:
    """Groups holding a backup superblock and descriptors (sparse_super): 1, 3^k, 5^k, 7^k."""
    found = set()
    for base in (3, 5, 7):
        g = 1
        while g < groups:
            found.add(g)
            g *= base
    return len(found)


def mkfs_footprint(fstype: str, size: int, chunk_size: int) -> int:
    """Pool bytes (whole chunks of ``chunk_size``) that mkfs of ``fstype`` writes on a blank
    thin volume of ``size`` bytes: an estimate erring high."""
    chunk = max(chunk_size, EXT4_BLOCK)
    if fstype == "xfs":
        groups = max(4, -(-size // XFS_AG_MAX))      # the log: zeroed, so unmapped
        return chunk + groups * 2 * chunk + SLACK
    groups = -(-size // EXT4_GROUP)
    copies = 1 + _ext4_backup_groups(groups)
    descriptors = EXT4_BLOCK + _roundup(groups * EXT4_DESC, EXT4_BLOCK)
    flex = -(-groups // EXT4_FLEX)
    return copies * (_roundup(descriptors, chunk) + chunk) + flex * chunk + 8 * chunk + SLACK


def too_small(fstype: str, size: int) -> str | None:
    """Why ``fstype`` cannot be made on a volume of ``size`` bytes (below
    :data:`MINIMUM`), or None."""
    least = MINIMUM.get(fstype, 0)
    if size >= least:
        return None
    return (f"{fstype} needs at least {format_size(least)} (a volume of "
            f"{format_size(size)} is too small for it)")


def too_large(status: dict, fstype: str, size: int, base: int = 0) -> str | None:
    """Why the metadata mkfs writes at the first mount (or the grow from ``base`` bytes,
    for a clone made larger) would not fit the free space of a pool whose
    ``Pool.status()`` is ``status``; None when it fits.  For the frontend to refuse
    when the volume is created: at its first mount (Docker gives a Mount 60 s) a mkfs
    filling the pool fails every volume's writes."""
    chunk = status["chunk_size"]
    need = mkfs_footprint(fstype, size, chunk) - \
        (mkfs_footprint(fstype, base, chunk) if base else 0)
    if need <= status["free"]:
        return None
    return (f"{fstype} on a volume this large writes about {format_size(need)} of metadata "
            f"{'when it grows' if base else 'at its first mount'}, more than the pool's "
            f"{format_size(status['free'])} free (choose a smaller size, or grow the pool: "
            "'thinstore grow')")


EXT4_MAGIC = (1024 + 56, b"\x53\xef")       # s_magic 0xEF53, little-endian, in the super block
XFS_MAGIC = (0, b"XFSB")                     # sb_magicnum at byte 0


def probe_fs(pool, name: str) -> str | None:
    """"ext4" or "xfs" by the super block's magic, read from the pool's device (no attach;
    what a clone or a renamed volume really holds); None when it has neither."""
    try:
        with pool.open_device(name) as dev:
            for fstype, (offset, magic) in (("xfs", XFS_MAGIC), ("ext4", EXT4_MAGIC)):
                if offset + len(magic) <= dev.size and dev.pread(offset, len(magic)) == magic:
                    return fstype
    except (ThinstoreError, OSError):
        pass
    return None
