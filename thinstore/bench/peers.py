"""The servers thinstore is compared with, each serving a copy of the same data.

- ``qemu-nbd``: a qcow2 overlay whose backing file is a raw copy of the device,
  the same copy-on-write role as a thinstore clone of a snapshot;
- ``nbdkit``: its ``file`` plugin on a raw copy (no copy on write: the speed of
  plain file I/O).

Each peer listens on a unix socket in a work directory; :func:`start` returns a
:class:`Peer` with the NBD URI and the process, which :meth:`Peer.stop` ends.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import time

from thinstore.errors import ThinstoreError, UsageError

PEERS = ("qemu-nbd", "nbdkit")
COPY_BLOCK = 4 << 20


@dataclasses.dataclass
class Peer:
    name: str
    socket: str
    export: str
    proc: subprocess.Popen

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def parse_peers(text: str) -> list[str]:
    """``qemu-nbd,nbdkit`` -> names, each known and installed (else a UsageError)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in PEERS:
            raise UsageError(f"unknown --compare peer {name!r}: use {', '.join(PEERS)}")
        if shutil.which(name) is None:
            raise UsageError(f"--compare {name}: {name} is not installed")
    return list(dict.fromkeys(names))


def raw_copy(handle, size: int, path: str) -> None:
    """Write the device behind ``handle`` to a sparse raw file: mapped extents only."""
    with open(path, "wb") as out:
        out.truncate(size)
        buf = bytearray(COPY_BLOCK)
        for offset, length, mapped in handle.extents(0, size):
            if not mapped:
                continue
            for pos in range(offset, offset + length, COPY_BLOCK):
                n = min(COPY_BLOCK, offset + length - pos)
                view = memoryview(buf)[:n]
                handle.readinto(view, pos)
                out.seek(pos)
                out.write(view)


def start(name: str, work: str, raw: str) -> Peer:
    """Start peer ``name`` serving (a view of) ``raw`` from ``work``."""
    sock = os.path.join(work, f"{name}.sock")
    if name == "qemu-nbd":
        overlay = os.path.join(work, "overlay.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", raw, "-F", "raw",
                        overlay], check=True)
        proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--socket", sock, "-x", "bench",
                                 "--persistent", "--shared=64", "--cache=writeback", overlay])
        return _ready(Peer(name, sock, "bench", proc))
    copy = os.path.join(work, "nbdkit.raw")
    subprocess.run(["cp", "--reflink=auto", "--sparse=always", raw, copy], check=True)
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", copy])
    return _ready(Peer(name, sock, "", proc))


def _ready(peer: Peer) -> Peer:
    for _ in range(400):
        if os.path.exists(peer.socket):
            return peer
        if peer.proc.poll() is not None:
            break
        time.sleep(0.025)
    peer.stop()
    raise ThinstoreError(f"{peer.name} did not start serving on {peer.socket}")
