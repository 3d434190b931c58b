"""Which volume sizes a file system can be made on, in a pool with how much free space.

A thin volume takes pool space only where it is written, but mkfs writes its metadata at
the first Mount, and that grows with the volume's *virtual* size: ext4 writes a copy of
every block group's descriptor into each backup group and a bitmap block per flex group
(xfs writes a few blocks per allocation group; it zeroes its log, up to 2 GiB, with
write-zeroes requests, which the pool answers by unmapping: measured through the plugin,
a 4 TiB xfs takes 2 MiB of the pool, a 4 TiB ext4 177 MiB).  A 1 PiB ext4 writes ~15 GiB (45 GiB in 64 KiB chunks): on a
small pool, the first Mount would run mkfs until the pool is full.  Create refuses such a
size up front (:meth:`VolumeDriver._check_fits`), and a size below :data:`MINIMUM` (which
mkfs would refuse at the first Mount, after Docker had accepted the volume).

:func:`mkfs_footprint` estimates the pool bytes mkfs takes (an upper bound for the mkfs
options of :mod:`thinstore.frontends.attach.filesystem`: ext4 with lazy inode table and
journal initialisation, no discard; xfs with no discard).  Sources: the ext4 disk layout
(kernel.org, Documentation/filesystems/ext4: block groups of 32768 4 KiB blocks, 64-byte
group descriptors with 64bit, backups in groups 1 and powers of 3, 5 and 7 with
sparse_super, flex_bg of 16 groups, e2fsprogs' mke2fs.conf defaults); mkfs.xfs(8)
(allocation groups of at most 1 TiB, at least 4).  Checked against mkfs on sparse files counted in
chunks (tests/test_docker_fsbounds.py).
"""

from __future__ import annotations

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


def too_large(status: dict, fstype: str, size: int, base: int = 0) -> str | None:
    """Why the metadata mkfs writes at the first Mount (or the grow from ``base`` bytes,
    for a clone made larger) would not fit the free space of a pool whose
    ``Pool.status()`` is ``status``; None when it fits.  Refused at Create because
    Docker gives a Mount 60 s, and a mkfs filling the pool fails every volume's writes;
    a warning on the plugin's stderr would reach no Docker user."""
    from thinstore.units import format_size

    chunk = status["chunk_size"]
    need = mkfs_footprint(fstype, size, chunk) - \
        (mkfs_footprint(fstype, base, chunk) if base else 0)
    if need <= status["free"]:
        return None
    return (f"{fstype} on a volume this large writes about {format_size(need)} of metadata "
            f"{'when it grows' if base else 'at its first mount'}, more than the pool's "
            f"{format_size(status['free'])} free (choose a smaller size, or grow the pool: "
            "'thinstore grow')")
