"""The three servers fio_compare.py measures, each able to give three kinds of target.

- ``main``: the long-lived export of the base's copy-on-write child (thinstore: a
  clone of a snapshot of a volume holding the data; qemu-nbd: a qcow2 overlay on the
  raw data; nbdkit's file plugin: a raw copy, no COW, the speed of plain I/O);
- ``fresh(tag)``: an empty device where every write allocates (thinstore: a new
  thin volume; qemu-nbd: a new qcow2 with no backing file; nbdkit: a new sparse file);
- ``child(tag)``: another COW child of the base, for a file system to be made on;
- ``chain()``: (root uri, top uri) of a snapshot/clone chain CHAIN_DEPTH levels deep
  over the base, each level having written 64 KiB of its own (thinstore: a clone of a
  snapshot of a clone ... of the base volume; qemu-nbd: CHAIN_DEPTH qcow2 overlays
  stacked on the overlay of the base). The root is where the chain starts (thinstore's
  base volume, qemu's overlay of the raw data), so top/root is the cost of the depth.
  nbdkit's file plugin has no snapshots: None. Built once, kept until stop().

Each target but chain's is (uri, cleanup); cleanup stops whatever was started for it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHAIN_DEPTH = 100
CHAIN_STEP = 2 << 20            # level i writes 64 KiB at i * CHAIN_STEP (mod the size)


def wait_for_socket(path: str) -> None:
    for _ in range(400):
        if os.path.exists(path):
            return
        time.sleep(0.05)
    raise SystemExit(f"server socket {path} did not appear")


def _stop(proc) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def stop_all(servers: dict, work: str, keep: bool) -> None:
    """The end of a benchmark run: stop every server in `servers` (name -> target), then
    remove the run's work directory unless the caller named it (`keep`)."""
    for server in servers.values():
        server.stop()
    if not keep:
        shutil.rmtree(work, ignore_errors=True)


class Thinstore:
    name = "thinstore"

    def __init__(self, work: str, base: str, size: int, capacity: int, workers: int,
                 chain: bool = False):
        from thinstore import Pool
        self.pool_dir = os.path.join(work, "pool")
        self.size = size
        with Pool.create(self.pool_dir, capacity) as pool:
            pool.create_volume("base", size)
            with pool.open_device("base") as dev, open(base, "rb") as f:
                for offset in range(0, size, 8 << 20):
                    dev.pwrite(f.read(8 << 20), offset)
            pool.snapshot("base@golden")
            pool.clone("base@golden", "bench")
            if chain:
                _thin_chain(pool, size)
        self.sock = os.path.join(work, "thinstore.sock")
        self.env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinstore", "--pool", self.pool_dir, "serve", "--socket",
             self.sock, "--workers", str(workers)], stdout=subprocess.PIPE, env=self.env, text=True)
        self.proc.stdout.readline()
        self.main = self.uri("bench")

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.sock}"

    def _cli(self, *args) -> None:
        subprocess.run([sys.executable, "-m", "thinstore", "--pool", self.pool_dir, *args],
                       check=True, env=self.env, stdout=subprocess.DEVNULL)

    def fresh(self, tag: str, size: int):
        self._cli("create", "--size", str(size), tag)
        return self.uri(tag), lambda: self._cli("destroy", "--force", tag)

    def child(self, tag: str):
        self._cli("clone", "base@golden", tag)
        return self.uri(tag), lambda: self._cli("destroy", "--force", tag)

    def chain(self):
        return self.uri("base"), self.uri(f"level{CHAIN_DEPTH}")

    def stop(self) -> None:
        _stop(self.proc)


def _thin_chain(pool, size: int) -> None:
    """base@l0 -> level1 -> level1@l1 -> level2 ... level{CHAIN_DEPTH}, each level
    writing 64 KiB of its own; one commit for the lot."""
    with pool.batch():
        parent = "base"
        for i in range(1, CHAIN_DEPTH + 1):
            pool.snapshot(f"{parent}@l{i - 1}")
            pool.clone(f"{parent}@l{i - 1}", f"level{i}")
            with pool.open_device(f"level{i}") as dev:
                dev.pwrite(os.urandom(64 << 10), (i * CHAIN_STEP) % (size - (64 << 10)))
            parent = f"level{i}"


class QemuNbd:
    name = "qemu-nbd"

    def __init__(self, work: str, base: str):
        self.work, self.base = work, base
        self.main, self._main_stop = self._serve("overlay", ["-b", base, "-F", "raw"])
        self._chain = None

    def _serve(self, tag: str, create_args: list, size: int | None = None):
        image = os.path.join(self.work, f"{tag}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *create_args, image,
                        *([str(size)] if size else [])], check=True)
        uri, stop = self._serve_image(tag, image)

        def cleanup():
            stop()
            if os.path.exists(image):
                os.unlink(image)
        return uri, cleanup

    def _serve_image(self, tag: str, image: str, read_only: bool = False):
        sock = os.path.join(self.work, f"qemu-{tag}.sock")
        proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--socket", sock, "-x", "bench",
                                 "--persistent", "--shared=8", "--cache=writeback",
                                 *(["--read-only"] if read_only else []), image])
        wait_for_socket(sock)

        def cleanup():
            _stop(proc)
            if os.path.exists(sock):
                os.unlink(sock)
        return f"nbd+unix:///bench?socket={sock}", cleanup

    def fresh(self, tag: str, size: int):
        return self._serve(tag, [], size)

    def child(self, tag: str):
        return self._serve(tag, ["-b", self.base, "-F", "raw"])

    def chain(self):
        """chain0 (an overlay of the raw data, like the main one but written by nothing
        else) under CHAIN_DEPTH overlays; root and top each served read-only."""
        if self._chain is None:
            size = os.path.getsize(self.base)
            below, fmt = self.base, "raw"
            for i in range(CHAIN_DEPTH + 1):
                image = os.path.join(self.work, f"chain{i}.qcow2")
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", below,
                                "-F", fmt, image], check=True)
                if i:
                    off = (i * CHAIN_STEP) % (size - (64 << 10))
                    subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                    f"write -P {i % 256} {off} 64k", image],
                                   check=True, stdout=subprocess.DEVNULL)
                below, fmt = image, "qcow2"
            root = self._serve_image("chain-root", os.path.join(self.work, "chain0.qcow2"),
                                     read_only=True)
            top = self._serve_image("chain-top", below, read_only=True)
            self._chain = (root, top)
        return self._chain[0][0], self._chain[1][0]

    def stop(self) -> None:
        if self._chain is not None:
            for _, cleanup in self._chain:
                cleanup()
        self._main_stop()


class NbdkitFile:
    name = "nbdkit-file"

    def __init__(self, work: str, base: str):
        self.work, self.base = work, base
        self.main, self._main_stop = self._serve("main", copy=True)

    def _serve(self, tag: str, copy: bool, size: int = 0):
        raw = os.path.join(self.work, f"nbdkit-{tag}.raw")
        if copy:
            subprocess.run(["cp", "--reflink=auto", "--sparse=never", self.base, raw], check=True)
        else:
            with open(raw, "wb") as f:
                f.truncate(size)
        sock = os.path.join(self.work, f"nbdkit-{tag}.sock")
        proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "file", raw])
        wait_for_socket(sock)

        def cleanup():
            _stop(proc)
            for f in (raw, sock):
                if os.path.exists(f):
                    os.unlink(f)
        return f"nbd+unix:///?socket={sock}", cleanup

    def fresh(self, tag: str, size: int):
        return self._serve(tag, False, size)

    def chain(self):
        return None

    def child(self, tag: str):
        return self._serve(tag, True)

    def stop(self) -> None:
        self._main_stop()


class NbdkitNull:
    """nbdkit's null plugin: every write and FLUSH answered at once, nothing stored. Its
    QD1 rate is what the client and the socket alone allow on this machine, the part of
    a durable write's cycle that no server can remove (fio_compare.py's floor)."""
    name = "nbdkit-null"

    def __init__(self, work: str, size: int):
        self._sock = os.path.join(work, "nbdkit-null.sock")
        self._proc = subprocess.Popen(["nbdkit", "-f", "-U", self._sock, "null", f"size={size}"])
        wait_for_socket(self._sock)
        self.main = f"nbd+unix:///?socket={self._sock}"

    def stop(self) -> None:
        _stop(self._proc)
        if os.path.exists(self._sock):
            os.unlink(self._sock)
