"""Pools on Ceph RADOS against a real cluster: the README's walk-through, SIGKILLs, a fenced
takeover and a refused second open (docs/rados.md).

The cluster comes from CI's ceph service (THINSTORE_TEST_CEPH_CONF) or is started for the
session by tools/ceph_cluster.py; without Ceph installed every case here skips and says so.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

import backends
from nbd_helpers import ROOT, ServeProcess, need, run, short_tmpdir
from thinstore import Pool
from thinstore.check import check_path
from thinstore.errors import PoolLocked
from thinstore.nbd.client import NBDDevice
from thinstore.rados_store import OBJECT_SIZE, RadosStore

pytestmark = pytest.mark.integration
MiB = 1 << 20


@pytest.fixture
def work(monkeypatch):
    d = short_tmpdir()
    monkeypatch.setenv("THINSTORE_RUNTIME_DIR", os.path.join(d, "run"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def rpool(work):
    loc = backends.location("rados", work, "it")
    yield loc
    backends.remove(loc)


def ts(*args: str, stdin=None, check: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    res = subprocess.run([sys.executable, "-m", "thinstore", *args], input=stdin,
                         capture_output=True, timeout=120, env=env)
    if check:
        assert res.returncode == 0, (args, res.stderr.decode())
    return res


def leaked_objects(loc: str, refs=None, chunk_shift: int = 16) -> list[str]:
    """Objects of the pool that its committed metadata does not reach (`refs`: the
    chunk refcounts of a closed pool, read here when not given)."""
    if refs is None:
        with Pool.open(loc, commit_interval=0) as pool:
            refs, chunk_shift = pool.md.space.refs.arr.copy(), pool.md.chunk_shift
    unit = OBJECT_SIZE >> chunk_shift
    sizes = {}
    store = RadosStore(loc)
    try:
        leaked = []
        for obj in store.object_names():
            file, _, index = obj.split(".", 1)[1].rpartition(".")
            if not file:
                continue
            if file not in sizes:
                sizes[file] = store.file_size(file)
            i = int(index, 16)
            if sizes[file] is None or i * OBJECT_SIZE >= sizes[file] or \
                    (file == "data" and not refs[i * unit:(i + 1) * unit].any()):
                leaked.append(obj)
        return leaked
    finally:
        store.close()


def test_readme_walk_through_on_a_rados_pool(rpool, work):
    """The README's 'Using it' commands, each as written but for --pool rados://..."""
    need("qemu-img")
    disk = os.path.join(work, "disk.raw")
    image = np.random.default_rng(1).integers(0, 256, 8 * MiB, dtype=np.uint8).tobytes()
    with open(disk, "wb") as f:
        f.write(image)
    p = ("--pool", rpool)
    ts(*p, "init", "--capacity", "1G", "--chunk-size", "64K")
    ts(*p, "create", "scratch", "--size", "64M")
    ts(*p, "import", "vm1", disk)
    ts(*p, "snapshot", "vm1@monday")
    ts(*p, "clone", "vm1@monday", "vm1-test")
    listing = ts(*p, "list").stdout.decode()
    assert "vm1@monday" in listing and "vm1-test" in listing
    sock = os.path.join(work, "nbd.sock")
    server = ServeProcess(rpool, "--socket", sock)
    try:
        info = run(["qemu-img", "info", "--output=json",
                    f"nbd+unix:///vm1@monday?socket={sock}"]).stdout
        assert '"virtual-size": 8388608' in info
        with NBDDevice(sock, "vm1-test") as dev:
            dev.pwrite(b"T" * 4096, 0)
            dev.flush()
        assert "vm1-test" in ts(*p, "list").stdout.decode()   # the CLI works while served
    finally:
        assert server.stop() == 0
    ts(*p, "rollback", "vm1@monday")
    out = os.path.join(work, "out.raw")
    ts(*p, "export", "vm1@monday", out)
    assert open(out, "rb").read() == image
    ts(*p, "export", "vm1-test", out)
    assert open(out, "rb").read() == b"T" * 4096 + image[4096:]
    assert b"storage:        rados" in ts(*p, "status").stdout
    backup = os.path.join(work, "backup")          # send a rados pool into a directory pool
    ts("--pool", backup, "init", "--capacity", "1G")
    stream = ts(*p, "send", "vm1@monday").stdout
    ts("--pool", backup, "receive", "vm1", stdin=stream)
    ts("--pool", backup, "export", "vm1", out)
    assert open(out, "rb").read() == image
    assert b"clean" in ts(*p, "check").stdout.lower() or ts(*p, "check").returncode == 0
    ts(*p, "scrub")
    assert check_path(rpool).problems == []


def test_sigkill_during_writes_and_commits_keeps_flushed_writes_and_leaks_nothing(rpool, work):
    """30 rounds: serve, write and flush from a client, SIGKILL at a random moment (often
    inside a FLUSH's commit); reopen: every byte flushed reads back, check is clean and
    every object is reached by the metadata."""
    size, cs = 16 * MiB, 64 << 10
    ts("--pool", rpool, "init", "--capacity", "256M", "--chunk-size", "64K")
    ts("--pool", rpool, "create", "vol", "--size", "16M")
    flushed = bytearray(size)
    sock = os.path.join(work, "nbd.sock")
    rng = np.random.default_rng(2024)
    for rnd in range(30):
        server = ServeProcess(rpool, "--socket", sock)
        killer = threading.Timer(float(rng.uniform(0.05, 0.5)),
                                 server.proc.send_signal, (signal.SIGKILL,))
        current, dirty = bytearray(flushed), np.zeros(size // 4096, dtype=bool)
        killer.start()
        try:
            with NBDDevice(sock, "vol") as dev:
                for i in range(10_000):
                    off = int(rng.integers(0, size // 4096)) * 4096
                    n = min(int(rng.integers(1, 48)) * 4096, size - off)
                    data = rng.integers(1, 256, n, dtype=np.uint8).tobytes()
                    dirty[off // 4096:(off + n) // 4096] = True
                    current[off:off + n] = data
                    dev.pwrite(data, off)
                    if i % 4 == 3:
                        dev.flush()
                        flushed[:] = current
                        dirty[:] = False
                    if rng.random() < 0.05:
                        dev.discard(off - off % cs, cs)
                        current[off - off % cs:off - off % cs + cs] = bytes(cs)
                        dirty[(off - off % cs) // 4096:(off - off % cs + cs) // 4096] = True
        except Exception as e:            # the server died under us, or failed
            failure = e
        else:
            failure = None
        killer.join()
        assert server.proc.wait(timeout=30) == -signal.SIGKILL, \
            f"round {rnd}: the server ended otherwise ({failure}): {server.proc.stderr.read()}"
        server.stop()
        with Pool.open(rpool, commit_interval=0) as pool, pool.open_device("vol") as dev:
            got = np.frombuffer(dev.pread(0, size), np.uint8).reshape(-1, 4096)
            refs = pool.md.space.refs.arr.copy()
        want = np.frombuffer(bytes(flushed), np.uint8).reshape(-1, 4096)
        bad = np.flatnonzero((got != want).any(axis=1) & ~dirty)
        assert not len(bad), f"round {rnd}: flushed 4K blocks {bad[:5]} changed"
        flushed[:] = got.tobytes()        # unflushed writes may or may not have landed
        assert check_path(rpool).problems == [], f"round {rnd}"
        assert leaked_objects(rpool, refs) == [], f"round {rnd}"


def test_takeover_fences_a_paused_holder(rpool, work):
    """A serves and is paused; B takes over and serves every flushed write; A, resumed,
    can neither write nor commit, and nothing it does shows."""
    ts("--pool", rpool, "init", "--capacity", "256M")
    ts("--pool", rpool, "create", "vol", "--size", "8M")
    sock_a, sock_b = os.path.join(work, "a.sock"), os.path.join(work, "b.sock")
    a = ServeProcess(rpool, "--socket", sock_a)
    b = None
    try:
        client = NBDDevice(sock_a, "vol")
        client.pwrite(b"F" * MiB, 0)
        client.flush()
        client.pwrite(b"u" * 4096, 4 * MiB)          # not flushed: may or may not survive
        a.proc.send_signal(signal.SIGSTOP)
        b = ServeProcess(rpool, "--takeover", "--socket", sock_b)
        with NBDDevice(sock_b, "vol") as dev:
            assert dev.pread(0, MiB) == b"F" * MiB
        a.proc.send_signal(signal.SIGCONT)
        with pytest.raises(Exception):
            client.pwrite(b"A" * MiB, 2 * MiB)
            client.flush()                            # the commit: refused (fenced)
        with pytest.raises(Exception):
            client.pwrite(b"A" * MiB, 2 * MiB)        # and every write after it
            client.flush()
        client.close()
        with NBDDevice(sock_b, "vol") as dev:
            assert dev.pread(2 * MiB, MiB) == bytes(MiB)
            dev.pwrite(b"B" * 4096, 6 * MiB)
            dev.flush()
    finally:
        a.proc.send_signal(signal.SIGCONT)
        a.stop()
        if b is not None:
            assert b.stop() == 0
    with Pool.open(rpool, commit_interval=0) as pool, pool.open_device("vol") as dev:
        assert dev.pread(0, MiB) == b"F" * MiB
        assert dev.pread(2 * MiB, MiB) == bytes(MiB)
        assert dev.pread(6 * MiB, 4096) == b"B" * 4096
    assert check_path(rpool).problems == []


def test_a_plain_second_open_names_the_holder_and_how_to_take_over(rpool, work):
    """A holder that is only paused is never broken without --takeover."""
    ts("--pool", rpool, "init", "--capacity", "64M")
    a = ServeProcess(rpool, "--socket", os.path.join(work, "a.sock"))
    try:
        a.proc.send_signal(signal.SIGSTOP)
        with pytest.raises(PoolLocked) as err:
            Pool.open(rpool)
        assert f"process {a.proc.pid} on host" in str(err.value)
        assert "--takeover" in str(err.value)
        res = ts("--pool", rpool, "serve", "--socket", os.path.join(work, "b.sock"),
                 check=False)
        assert res.returncode == 5
        assert f"process {a.proc.pid}" in res.stderr.decode()
    finally:
        a.proc.send_signal(signal.SIGCONT)
    assert a.stop() == 0          # still the owner: it closes cleanly
    with Pool.open(rpool) as pool:
        assert pool.list() == []


def test_a_command_for_another_clusters_pool_of_the_same_name_never_reaches_this_server(
        rpool, work):
    """Two clusters may both hold rados://P/N. While one's pool is served, a command for
    the other's (another conf, another fsid) must go to that cluster (here: one this host
    cannot reach, exit 15), not through the served pool's control socket, where a
    `destroy` destroyed the served pool's volume and exited 0."""
    ts("--pool", rpool, "init", "--capacity", "64M")
    ts("--pool", rpool, "create", "vol", "--size", "8M")
    other_conf = os.path.join(work, "other.conf")
    with open(other_conf, "w") as f:       # another cluster's fsid, no monitor reachable
        f.write("[global]\nfsid = 0e6fe4c8-8bd4-4c8e-9d4f-2f3b1a7f0001\n")
    other = rpool.split("?")[0] + "?conf=" + other_conf
    server = ServeProcess(rpool, "--socket", os.path.join(work, "a.sock"))
    try:
        for cmd in (("list",), ("destroy", "vol", "--force")):
            res = ts("--pool", other, *cmd, check=False)
            assert res.returncode == 15, (cmd, res.stdout, res.stderr)
            assert other_conf in res.stderr.decode()
        assert "vol" in ts("--pool", rpool, "list").stdout.decode()
    finally:
        assert server.stop() == 0


def test_the_local_directory_an_earlier_version_used_moves_to_the_clusters_own(rpool, work):
    """Earlier versions kept a rados pool's frontend state (the snapshotter's records,
    whose absence makes it destroy every layer device) in rados-CEPHPOOL-NAME: the first
    open moves it to the directory that names the cluster, and leaves one a server still
    answers in alone."""
    from thinstore.storage import runtime_dir
    ts("--pool", rpool, "init", "--capacity", "64M")
    cephpool, name = rpool[len("rados://"):].split("?")[0].split("/")
    legacy = os.path.join(work, "run", f"rados-{cephpool}-{name}")
    os.makedirs(os.path.join(legacy, "containerd"))
    with open(os.path.join(legacy, "containerd", "snapshots.json"), "w") as f:
        f.write("records")
    res = ts("--pool", rpool, "list")
    assert os.path.islink(legacy)          # paths configured before still lead there
    assert os.path.realpath(legacy) == os.path.realpath(runtime_dir(rpool))
    with open(os.path.join(runtime_dir(rpool), "containerd", "snapshots.json")) as f:
        assert f.read() == "records"
    assert "now" in res.stderr.decode() and legacy in res.stderr.decode()
    ts("--pool", rpool, "list")            # a link is not an older version's directory
    assert os.path.isfile(os.path.join(runtime_dir(rpool), "containerd", "snapshots.json"))

    os.unlink(legacy)
    os.makedirs(legacy)                    # an older server still serving from it: kept
    import socket
    live = socket.socket(socket.AF_UNIX)
    live.bind(os.path.join(legacy, "control.sock"))
    live.listen(1)
    try:
        ts("--pool", rpool, "list")
        assert os.path.isdir(legacy)
    finally:
        live.close()
