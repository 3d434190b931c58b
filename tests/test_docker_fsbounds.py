"""Which sizes the Docker plugin accepts: mkfs's footprint in a thin pool, and Create's
refusals of a volume too large for its pool or too small for its file system.

No dockerd and no root: mkfs runs on sparse files (counted in chunks, as the pool would
allocate them), and the driver answers in-process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import pytest

from thinstore import Pool
from thinstore.frontends.attach import Attacher
from thinstore.frontends.attach.filesystem import MKFS
from thinstore.frontends.attach import fsbounds
from thinstore.frontends.docker.driver import DriverError, VolumeDriver
from thinstore.frontends.docker.registry import Registry
from thinstore.reclaim import _extents     # the data extents of a sparse file

MiB, GiB, TiB = 1 << 20, 1 << 30, 1 << 40


def chunks_written(path: str, chunk: int) -> int:
    """Bytes of the chunks of ``chunk`` bytes that hold data in a sparse file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        seen = set()
        for data, hole in _extents(fd):
            seen.update(range(data // chunk, (hole - 1) // chunk + 1))
        return len(seen) * chunk
    finally:
        os.close(fd)


def zero_range_unmaps(path: str) -> bool:
    """fallocate(ZERO_RANGE) on ``path`` keeps it sparse, as the pool keeps a zeroed range
    unmapped (mkfs.xfs zeroes its log so)."""
    done = subprocess.run(["fallocate", "-z", "-o", "0", "-l", str(MiB), path],
                          capture_output=True)
    return not done.returncode and chunks_written(path, 4096) == 0


@pytest.mark.parametrize("fstype,size", [
    ("ext4", 2 * MiB), ("ext4", GiB), ("ext4", 256 * GiB), ("ext4", 4 * TiB),
    ("xfs", 300 * MiB), ("xfs", 256 * GiB), ("xfs", 4 * TiB)])
def test_the_mkfs_footprint_estimate_is_an_upper_bound_close_to_mkfs(fstype, size):
    """The plugin's mkfs options on a sparse file: what the estimate says a thin volume
    takes is at least what mkfs wrote, and not wildly more (else Create would refuse
    sizes that fit)."""
    tool = MKFS[fstype][0]
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")
    where = tempfile.mkdtemp(prefix="tsfsb")
    image = os.path.join(where, "disk")
    try:
        try:
            with open(image, "wb") as f:
                f.truncate(size)
        except OSError as exc:
            pytest.skip(f"this file system holds no sparse file of {size} bytes: {exc}")
        if fstype == "xfs" and not zero_range_unmaps(image):
            pytest.skip("fallocate ZERO_RANGE does not leave a hole here: mkfs.xfs's zeroed "
                        "log would count as written (the pool unmaps it)")
        subprocess.run([*MKFS[fstype], "-F" if fstype == "ext4" else "-f", image],
                       check=True, capture_output=True)
        for chunk in (4096, 64 << 10, 1 << 20):
            written = chunks_written(image, chunk)
            estimate = fsbounds.mkfs_footprint(fstype, size, chunk)
            assert written <= estimate <= written * 1.25 + 24 * MiB, (chunk, written, estimate)
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def driver():
    where = tempfile.mkdtemp(prefix="tsfsd", dir="/tmp")
    pool = Pool.create(os.path.join(where, "pool"), 4 * GiB, 64 << 10, commit_interval=0)
    attacher = Attacher(os.path.join(where, "attach.json"), os.path.join(where, "nbd.sock"))
    try:
        yield VolumeDriver(pool, attacher, Registry(os.path.join(where, "volumes.json")),
                           os.path.join(where, "mnt"), 10 * GiB, plugin_name="ts")
    finally:
        attacher.close()
        pool.close()
        shutil.rmtree(where, ignore_errors=True)


def create(driver, name: str, **opts) -> str:
    try:
        driver.create({"Name": name, "Opts": opts})
        return ""
    except DriverError as exc:
        return str(exc)


def test_a_volume_whose_mkfs_would_fill_the_pool_is_refused_at_create(driver):
    """size=1P on a 4 GiB pool: ext4's metadata alone is tens of GiB."""
    err = create(driver, "huge", size="1P")
    assert "1P" in err and "metadata" in err and "free" in err and "thinstore grow" in err, err
    assert create(driver, "hugex", size="1P", fs="xfs") == ""   # ~140 MiB (log unmapped)
    assert create(driver, "big", size="100T") != "", "100T of ext4 writes ~4.5G here"
    assert create(driver, "fine", size="1T") == ""              # ~45 MiB: fits
    assert sorted(d.name for d in driver.pool.list()) == ["fine", "hugex"], \
        "a refused Create made a volume"


def test_a_volume_too_small_for_its_file_system_is_refused_at_create(driver):
    assert "ext4 needs at least 2M" in create(driver, "tiny", size="1")
    assert "xfs needs at least 300M" in create(driver, "tinyx", size="64M", fs="xfs")
    assert create(driver, "small", size="2M") == ""
    assert [d.name for d in driver.pool.list()] == ["small"]


def test_a_clone_grown_beyond_what_its_metadata_fits_is_refused(driver):
    assert create(driver, "base", size="1G") == ""
    driver.pool.snapshot("base@s")
    err = create(driver, "grown", **{"from": "base@s", "size": "1P"})
    assert "when it grows" in err, err
    assert "grown" not in [d.name for d in driver.pool.list()]
