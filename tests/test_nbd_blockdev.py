"""The block-device path: nbdfuse turns an export into a file, losetup into a kernel
block device; ext4 on a volume, its snapshot and a clone of the snapshot.

Needs root, /dev/fuse and loop devices; skips with the reason otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time

import pytest

from nbd_helpers import MiB, need_loop_over_nbd, run, served


def require_block_path() -> None:
    need_loop_over_nbd("fsck.ext4")


@contextlib.contextmanager
def block_device(uri: str, readonly: bool = False):
    """nbdfuse + losetup: yields /dev/loopN backed by the export; always cleans up."""
    fusedir = tempfile.mkdtemp(prefix="tsfuse", dir="/tmp")
    image = os.path.join(fusedir, "disk")
    fuse = subprocess.Popen(["nbdfuse", *(["-r"] if readonly else []), image, uri],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    loop = None
    try:
        _wait_for_file(image, fuse)
        loop = run(["losetup", "-f", "--show", *(["-r"] if readonly else []), image]).stdout.strip()
        yield loop
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], capture_output=True)
        subprocess.run(["fusermount3", "-u", fusedir], capture_output=True)
        try:
            fuse.wait(timeout=20)
        except subprocess.TimeoutExpired:
            fuse.kill()
            fuse.wait()
        os.rmdir(fusedir)


def _wait_for_file(path: str, proc: subprocess.Popen) -> None:
    for _ in range(600):            # bounded: 60 s
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            pytest.skip(f"nbdfuse could not mount: {proc.stdout.read().decode()[-300:]}")
        time.sleep(0.1)
    pytest.fail("nbdfuse did not expose the export")


@contextlib.contextmanager
def mounted(device: str, options: str = "rw"):
    where = tempfile.mkdtemp(prefix="tsmnt", dir="/tmp")
    run(["mount", "-o", options, device, where])
    try:
        yield where
    finally:
        run(["umount", where], check=False)
        os.rmdir(where)


def read_tree(root: str) -> dict[str, bytes]:
    out = {}
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out


def test_ext4_on_volume_snapshot_and_clone():
    require_block_path()
    files = {f"file{i}.bin": os.urandom(200_000 + i) for i in range(5)}
    with served() as s:
        s.pool.create_volume("disk", 256 * MiB)
        with block_device(s.uri("disk")) as dev:
            run(["mkfs.ext4", "-q", "-F", dev])
            with mounted(dev) as root:
                for name, data in files.items():
                    with open(os.path.join(root, name), "wb") as f:
                        f.write(data)
            assert run(["fsck.ext4", "-n", dev]).returncode == 0
        s.pool.snapshot("disk@fs")
        s.pool.clone("disk@fs", "disk-clone")

        with block_device(s.uri("disk-clone")) as dev:
            with mounted(dev) as root:
                assert read_tree(root) == files, "the clone shows the same files"
                os.unlink(os.path.join(root, "file0.bin"))
                with open(os.path.join(root, "clone-only.txt"), "wb") as f:
                    f.write(b"written in the clone")
            assert run(["fsck.ext4", "-n", dev]).returncode == 0

        with block_device(s.uri("disk"), readonly=True) as dev:
            with mounted(dev, "ro,noload") as root:
                assert read_tree(root) == files, "changes in the clone did not reach the volume"
        with block_device(s.uri("disk@fs"), readonly=True) as dev:
            assert run(["fsck.ext4", "-n", dev]).returncode == 0
