"""Shared pieces of the NBD tests: a served pool, a raw protocol client, tool runners.

The raw client speaks the wire format from :mod:`thinstore.nbd.protocol` over a
plain socket so hostile and simple-reply cases can say exactly what they send.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from thinstore import Pool
from thinstore.nbd import protocol as P
from thinstore.nbd.server import NBDServer, ServerConfig

MiB = 1 << 20
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYSTEM_PYTHON = "/usr/bin/python3"


def need(*tools: str) -> None:
    """Skip the test, naming the tool, when one is not installed."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


def need_loop_over_nbd(*tools: str) -> None:
    """Skip (with the reason) where a kernel block device over NBD cannot be made here
    (nbdfuse + a loop device, as root, with /dev/fuse); `tools` are also needed."""
    need("nbdfuse", "fusermount3", "losetup", "mkfs.ext4", "mount", "umount", *tools)
    if os.geteuid() != 0:
        pytest.skip("loop devices and mounts need root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is not available")
    if subprocess.run(["losetup", "-f"], capture_output=True).returncode:
        pytest.skip("no free loop device")


def need_libnbd_python() -> None:
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import nbd"], capture_output=True)
    if probe.returncode:
        pytest.skip("the system python3 has no nbd module (python3-libnbd)")


def short_tmpdir() -> str:
    """A directory whose socket paths fit the 108-byte sun_path limit."""
    return tempfile.mkdtemp(prefix="tsnbd", dir="/tmp")


def uri(sock: str, name: str = "") -> str:
    return f"nbd+unix:///{name}?socket={sock}"


class Served:
    """A pool in a temp dir, served in-process on a unix socket."""

    def __init__(self, capacity: int = 1 << 30, chunk_size: int = 64 << 10,
                 backend: str = "dir", **config):
        import backends
        self.dir = short_tmpdir()
        self.location = backends.location(backend, self.dir)
        self.pool = Pool.create(self.location, capacity, chunk_size, commit_interval=0)
        self.server = NBDServer(self.pool, ServerConfig(**config))
        self.sock = self.server.listen_unix(os.path.join(self.dir, "nbd.sock"))
        self.server.start()

    def uri(self, name: str = "") -> str:
        return uri(self.sock, name)

    def close(self) -> None:
        import backends
        self.server.shutdown()
        self.pool.close()
        backends.remove(self.location)
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def served(**kwargs):
    s = Served(**kwargs)
    try:
        yield s
    finally:
        s.close()


def run(cmd, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run a tool; on failure the assertion shows its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check:
        assert proc.returncode == 0, f"{cmd} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def system_python(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run a libnbd script with /usr/bin/python3 (the project's python lacks nbd)."""
    return run([SYSTEM_PYTHON, "-c", script, *args], timeout=timeout)


def cli(*args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return run([sys.executable, "-m", "thinstore", *args], timeout=timeout, check=check, env=env)


# == a raw protocol client =================================================
class RawClient:
    """Just enough of a client to say exactly what hostile cases send."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def close(self) -> None:
        self.sock.close()

    def recv(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            part = self.sock.recv(n - len(buf))
            if not part:
                raise ConnectionError(f"server closed after {len(buf)} of {n} bytes")
            buf += part
        return buf

    def closed_by_server(self) -> bool:
        """True when the server ends the connection (EOF or reset) without sending more."""
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True

    # -- handshake ------------------------------------------------------------
    def greet(self, flags: int = P.CLIENT_FLAG_FIXED_NEWSTYLE | P.CLIENT_FLAG_NO_ZEROES) -> int:
        magic, opt, hflags = P.GREETING.unpack(self.recv(P.GREETING.size))
        assert (magic, opt) == (P.NBDMAGIC, P.IHAVEOPT)
        self.sock.sendall(P.CLIENT_FLAGS.pack(flags))
        return hflags

    def send_option(self, option: int, data: bytes = b"", length: int | None = None) -> None:
        n = len(data) if length is None else length
        self.sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, option, n) + data)

    def reply(self) -> tuple[int, int, bytes]:
        magic, option, kind, n = P.OPTION_REPLY.unpack(self.recv(P.OPTION_REPLY.size))
        assert magic == P.OPTION_REPLY_MAGIC
        return option, kind, self.recv(n)

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        """Send an option; collect replies up to the final (ACK or error)."""
        self.send_option(option, data)
        replies = []
        while True:
            got, kind, payload = self.reply()
            assert got == option
            replies.append((kind, payload))
            if kind == P.Rep.ACK or kind & (1 << 31):
                return replies

    def go(self, name: str, structured: bool = True, meta: bool = True) -> tuple[int, int]:
        """Negotiate and enter transmission; returns (size, transmission flags)."""
        if structured:
            assert self.option(P.Opt.STRUCTURED_REPLY)[-1][0] == P.Rep.ACK
            if meta:
                self.option(P.Opt.SET_META_CONTEXT, meta_request(name, [P.BASE_ALLOCATION]))
        replies = self.option(P.Opt.GO, info_request(name))
        assert replies[-1][0] == P.Rep.ACK, replies
        for kind, payload in replies:
            if kind == P.Rep.INFO and payload[:2] == b"\0\0":
                _, size, flags = P.INFO_EXPORT.unpack(payload)
                return size, flags
        raise AssertionError("no NBD_INFO_EXPORT")

    # -- transmission -----------------------------------------------------------
    def request(self, kind: int, offset: int = 0, length: int = 0, flags: int = 0,
                cookie: int = 1, data: bytes = b"") -> None:
        self.sock.sendall(P.encode_request(flags, kind, cookie, offset, length) + data)

    def simple_reply(self, data_length: int = 0) -> tuple[int, int, bytes]:
        magic, error, cookie = P.SIMPLE_REPLY.unpack(self.recv(P.SIMPLE_REPLY.size))
        assert magic == P.SIMPLE_REPLY_MAGIC, hex(magic)
        data = self.recv(data_length) if data_length and not error else b""
        return cookie, error, data

    def chunk(self) -> tuple[int, int, int, bytes]:
        """One structured chunk (or a simple reply, type -1): (cookie, type, flags, payload)."""
        magic = int.from_bytes(self.recv(4), "big")
        if magic == P.SIMPLE_REPLY_MAGIC:
            error, cookie = int.from_bytes(self.recv(4), "big"), int.from_bytes(self.recv(8), "big")
            return cookie, -1, P.REPLY_FLAG_DONE, error.to_bytes(4, "big")
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, kind, cookie, n = P.STRUCTURED_HEADER.unpack(magic.to_bytes(4, "big") + self.recv(16))[1:]
        return cookie, kind, flags, self.recv(n)

    def structured_reply(self) -> tuple[int, list[tuple[int, bytes]]]:
        """All chunks of one reply, up to DONE: (cookie, [(type, payload)])."""
        chunks = []
        while True:
            cookie, kind, flags, payload = self.chunk()
            chunks.append((kind, payload))
            if flags & P.REPLY_FLAG_DONE:
                return cookie, chunks


def writer_and_flusher(pool_dir: str, name: str):
    """Two raw clients in transmission on export `name` of the pool's own socket (one
    writes, the other FLUSHes: the multi-connection durability tests), and the
    transmission flags each was given."""
    sock = os.path.join(pool_dir, "nbd.sock")
    clients, flags = (RawClient(sock), RawClient(sock)), []
    for c in clients:
        c.greet()
        flags.append(c.go(name)[1])
    return clients, flags


def reply_error(chunks) -> int:
    """The error of a reply's chunks (0 when none)."""
    for kind, payload in chunks:
        if kind == -1 or kind & (1 << 15):
            return int.from_bytes(payload[:4], "big")
    return 0


def info_request(name: str, requests=(P.Info.NAME, P.Info.DESCRIPTION, P.Info.BLOCK_SIZE)) -> bytes:
    raw = name.encode()
    body = P.U32.pack(len(raw)) + raw + P.U16.pack(len(requests))
    return body + b"".join(P.U16.pack(r) for r in requests)


def meta_request(name: str, queries) -> bytes:
    raw = name.encode()
    body = P.U32.pack(len(raw)) + raw + P.U32.pack(len(queries))
    for q in queries:
        body += P.U32.pack(len(q.encode())) + q.encode()
    return body


def wait_for(predicate, timeout: float = 30.0, what: str = "condition") -> None:
    """Poll a condition (bounded): for state that other threads reach eventually."""
    for _ in range(max(1, int(timeout / 0.02))):    # a bounded number of polls
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"gave up waiting for {what}")


@contextlib.contextmanager
def new_pool_dir(capacity: str = "1G"):
    """A pool made by ``thinstore init`` in a short temp dir; removed afterwards."""
    d = short_tmpdir()
    path = os.path.join(d, "pool")
    cli("--pool", path, "init", "--capacity", capacity)
    try:
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


class ServeProcess:
    """``thinstore --pool DIR serve ARGS`` in the background, stopped on close()."""

    def __init__(self, pool: str, *args: str):
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", pool, "serve",
                                      *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        self.lines = []
        while not any(line.startswith("control socket:") for line in self.lines):
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve exited: {self.proc.stderr.read()}")
            self.lines.append(line.strip())

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=30)
        finally:
            self.proc.stdout.close()
            self.proc.stderr.close()
