"""On a file system with reflink, a COW copy shares extents instead of copying bytes.

Each test makes a btrfs or xfs image, mounts it on a loop device (root only) and
checks with ``filefrag -v`` that the copied chunk's blocks are the source's blocks,
flagged shared: the copy cost no data I/O and no space.  Both backends run, since
the twin's os.copy_file_range reflinks as well.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from thinstore import Pool, kernels as TWIN, native
from thinstore.storage import FileIO

MiB = 1 << 20
NAT = native.NATIVE
BACKENDS = [pytest.param(TWIN, id="python"),
            pytest.param(NAT, id="native", marks=pytest.mark.skipif(
                NAT is None, reason=f"native kernels unavailable: {native.WHY_NOT_NATIVE}"))]
# mkfs command per file system; xfs needs at least 300 MiB
FILESYSTEMS = {"btrfs": (["mkfs.btrfs", "-q", "-f"], 256), "xfs": (["mkfs.xfs", "-q", "-f", "-m", "reflink=1"], 320)}
EXTENT = re.compile(r"^\s*\d+:\s*(\d+)\.\.\s*(\d+):\s*(\d+)\.\.\s*(\d+):\s*(\d+):\s*(\d*):?\s*(.*)$")


@pytest.fixture(scope="module", params=sorted(FILESYSTEMS))
def mounted(request, tmp_path_factory):
    """A fresh file system of the given type on a loop device; yields its mount point."""
    fstype = request.param
    mkfs, size_mib = FILESYSTEMS[fstype]
    if os.geteuid() != 0:
        pytest.skip("needs root to attach a loop device and mount")
    if not os.path.exists("/dev/loop-control"):
        pytest.skip("no loop device support (/dev/loop-control missing)")
    for tool in (mkfs[0], "filefrag", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed (apt-get install btrfs-progs xfsprogs e2fsprogs)")
    base = tmp_path_factory.mktemp(fstype)
    image, mnt = base / "fs.img", base / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    _run(mkfs + [str(image)])
    res = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot loop-mount a {fstype} image here: {res.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def _run(cmd):
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{cmd}: {res.stderr}"
    return res.stdout


def _extents(path) -> dict[int, tuple[int, str]]:
    """filefrag -v as {logical block: (physical block, flags)}."""
    blocks = {}
    for line in _run(["filefrag", "-v", str(path)]).splitlines():
        m = EXTENT.match(line)
        if m:
            lo, hi, phys = int(m[1]), int(m[2]), int(m[3])
            for i in range(hi - lo + 1):
                blocks[lo + i] = (phys + i, m[7])
    return blocks


def _block_size(path) -> int:
    out = _run(["filefrag", "-v", str(path)])
    return int(re.search(r"blocks of (\d+) bytes", out)[1])


def _assert_shared(path, src, dst, length):
    """The blocks of [dst, dst+length) are those of [src, ...), flagged shared."""
    bs = _block_size(path)
    ext = _extents(path)
    for i in range(length // bs):
        s, d = ext.get(src // bs + i), ext.get(dst // bs + i)
        assert s is not None and d is not None, f"block {i} of the copy is not allocated"
        assert d[0] == s[0], f"block {i}: copy at physical {d[0]}, source at {s[0]}"
        assert "shared" in d[1]


@pytest.mark.parametrize("k", BACKENDS)
def test_cow_copy_of_a_1mib_chunk_shares_extents(mounted, k):
    path = mounted / f"data-{k.__name__ if hasattr(k, '__name__') else 'k'}"
    data = np.random.default_rng(5).integers(0, 256, MiB, np.uint8).tobytes()
    fio = FileIO(str(path), create=True)
    try:
        fio.truncate(8 * MiB)
        fio.pwrite(data, 1 * MiB)
        fio.fsync()
        k.cow_copy(fio, 1 * MiB, 5 * MiB, MiB)
        fio.fsync()
        assert fio.pread(MiB, 5 * MiB) == data
        _assert_shared(path, 1 * MiB, 5 * MiB, MiB)
    finally:
        fio.close()
        os.unlink(path)


@pytest.mark.parametrize("k", BACKENDS)
def test_snapshot_write_reflinks_the_uncovered_part(mounted, k, monkeypatch):
    """Through the volume API: a 4 KiB write into a 1 MiB chunk a snapshot shares
    copies the other 1020 KiB by reflink, not by reading and writing them."""
    import thinstore.pool
    monkeypatch.setattr(thinstore.pool, "K", k)
    monkeypatch.setattr(native, "K", k)
    root = mounted / f"pool-{id(k)}"
    pool = Pool.create(str(root), capacity=64 * MiB, chunk_size=MiB, commit_interval=0)
    try:
        pool.create_volume("v", 8 * MiB)
        with_data = np.random.default_rng(6).integers(0, 256, MiB, np.uint8).tobytes()
        dev = pool.open_device("v")
        dev.pwrite(with_data, 0)
        dev.close()
        pool.snapshot("v@s")
        dev = pool.open_device("v")
        dev.pwrite(b"\xff" * 4096, 0)
        pool.commit()
        assert dev.pread(0, MiB) == b"\xff" * 4096 + with_data[4096:]
        assert pool.counters["chunks_copied"] == 1
        (old, _, _), = [e for e in _chunk_of(pool, "v@s")]
        (new, _, _), = [e for e in _chunk_of(pool, "v")]
        dev.close()
        _assert_shared(root / "data", old + 4096, new + 4096, MiB - 4096)
    finally:
        pool.close()
        shutil.rmtree(root, ignore_errors=True)


def _chunk_of(pool, name):
    """Data-file extents (offset, length, -) of the first chunk of a device."""
    dm = [m for m in pool.md.devices.values() if m.name == name][0]
    out = np.empty((3, 3), np.int64)
    n = native.K.translate(dm.directory.arr, pool.md.maps.pages, pool.md.chunk_shift, 0, MiB, out)
    return [(int(d), int(ln), int(v)) for v, ln, d in out[:n].tolist()]
