"""send, receive, diff, check, dump and scrub while `thinstore serve` holds the pool,
with fio writing through the server: the output of each, and what the clients see.

The tests that run a `thinstore serve` daemon are marked integration: CI runs them once,
with the native kernels (the pure-Python run would repeat the same CLI round trips)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from thinstore.control import RemotePool
from nbd_helpers import ROOT, SYSTEM_PYTHON, MiB, need, need_libnbd_python, run, wait_for
from online_helpers import STALL_NS, Fio, Server, env, fio_ok, pipe, ts


@pytest.fixture
def pools(tmp_path):
    """A source pool with `vol` (16 MiB of random data, snapshot vol@base) and an empty
    destination pool."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    for p in (src, dst):
        ts(p, "init", "--capacity", "1G")
    img = tmp_path / "img"
    img.write_bytes(os.urandom(16 * MiB))
    ts(src, "import", "vol", str(img), "--size", "64M")
    ts(src, "snapshot", "vol@base")
    return src, dst


def exported(pool: str, name: str, path) -> bytes:
    ts(pool, "export", name, str(path))
    return path.read_bytes()


@pytest.mark.integration
def test_incremental_send_of_a_served_volume_while_fio_writes(pools, tmp_path):
    need("fio", "nbdinfo")
    src, dst = pools
    a, b = Server(src), Server(dst)       # both pools served: receive goes online too
    try:
        fio = Fio(a.uri("vol"), 32 * MiB)
        ts(src, "snapshot", "vol@a")
        assert pipe(src, ["send", "vol@a"], dst, ["receive", "vol"])[:2] == (0, 0)
        time.sleep(0.5)                   # fio writes on
        ts(src, "snapshot", "vol@b")
        rc = pipe(src, ["send", "vol@b", "--from", "vol@a"], dst, ["receive", "vol"])
        assert rc[:2] == (0, 0), rc[2]
        # published means exported: the destination's server offers vol@b at once
        size = run(["nbdinfo", "--size", b.uri("vol@b")]).stdout.strip()
        assert size == str(64 * MiB)
        job = fio.stop()
    finally:
        a.stop()
        b.stop()
    error, written, slowest = fio_ok(job)
    assert error == 0 and written > 0
    assert slowest < STALL_NS, f"a write waited {slowest / 1e9:.2f}s"
    want = exported(src, "vol@b", tmp_path / "b.src")
    assert exported(dst, "vol@b", tmp_path / "b.dst") == want
    assert exported(src, "vol@a", tmp_path / "a.src") != want, "fio wrote between a and b"


@pytest.mark.integration
def test_check_scrub_and_dump_of_a_served_pool_while_fio_writes(pools):
    need("fio")
    src, _ = pools
    srv = Server(src)
    try:
        fio = Fio(srv.uri("vol"), 32 * MiB)
        check = ts(src, "check")
        scrub = ts(src, "scrub", "--rate", "32M", "--progress")
        dump = ts(src, "dump", "--json")
        checked = json.loads(ts(src, "check", "--json").stdout)
        job = fio.stop()
    finally:
        srv.stop()
    assert check.stdout.decode().splitlines()[-1] == "clean"
    assert checked["clean"] and checked["exit_code"] == 0
    assert b"no damage found" in scrub.stdout
    assert b"100.0%" in scrub.stderr, "--progress draws the bar on stderr"
    doc = json.loads(dump.stdout)
    assert {d["name"] for d in doc["devices"]} == {"vol", "vol@base"}
    error, written, slowest = fio_ok(job)
    assert error == 0 and written > 0 and slowest < STALL_NS


@pytest.mark.integration
def test_scrub_of_a_served_pool_names_a_damaged_chunk(pools):
    src, _ = pools
    doc = json.loads(ts(src, "dump", "--json").stdout)
    snap = next(d for d in doc["devices"] if d["name"] == "vol@base")
    page = snap["directory"][0][1]
    chunk = doc["pages"][str(page)][0][1]          # data chunk of vol@base's byte 0
    cs = doc["pool"]["chunk_size"]
    with open(os.path.join(src, "data"), "r+b") as f:
        f.seek(chunk * cs + 100)
        f.write(b"rot" * 10)
    srv = Server(src)
    try:
        online = ts(src, "scrub", check=False)
    finally:
        srv.stop()
    offline = ts(src, "scrub", check=False)
    assert online.returncode == offline.returncode == 11
    damaged = [line for line in online.stdout.decode().splitlines() if line.startswith("damaged:")]
    assert len(damaged) == 1
    assert f"chunk {chunk} " in damaged[0] and "vol@base at byte 0" in damaged[0]
    assert damaged == [line for line in offline.stdout.decode().splitlines()
                       if line.startswith("damaged:")]


@pytest.mark.integration
def test_online_output_and_exit_codes_are_the_offline_ones(pools, tmp_path):
    src, _ = pools
    ts(src, "snapshot", "vol@two")
    commands = [["diff", "vol@base", "vol"], ["diff", "-p", "--json", "vol@base"],
                ["check"], ["check", "--json"], ["dump"], ["dump", "--json"],
                ["send", "vol@two", "--from", "@base"],
                ["send", "vol@nope"], ["diff", "nope"], ["send", "vol"],
                ["receive", "--abort", "vol"]]
    offline = [ts(src, *c, check=False) for c in commands]
    srv = Server(src)
    try:
        online = [ts(src, *c, check=False) for c in commands]
        sent = tmp_path / "two.stream"
        ts(src, "send", "vol@two", "--from", "@base", "-o", str(sent))
    finally:
        srv.stop()
    for c, off, on in zip(commands, offline, online):
        assert (on.returncode, on.stdout, on.stderr) == (off.returncode, off.stdout,
                                                         off.stderr), c
    assert sent.read_bytes() == offline[6].stdout, "send -o writes what send writes"
    assert [p.returncode for p in offline[7:]] == [3, 3, 2, 2]


@pytest.mark.integration
def test_a_snapshot_being_sent_cannot_be_destroyed(pools):
    """Its chunks must not be freed and reused under the stream, even with --force."""
    src, _ = pools
    srv = Server(src)
    try:
        reader = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", src, "send",
                                   "vol@base"], stdout=subprocess.PIPE, env=env())
        first = reader.stdout.read(4096)          # the send is under way, and blocked
        busy = ts(src, "destroy", "--force", "vol@base", check=False)
        rest = reader.stdout.read()
        assert reader.wait(60) == 0
        assert busy.returncode == 5 and b"being read" in busy.stderr
        stream = first + rest
        ts(src, "destroy", "vol@base")            # once the send is done, it goes
    finally:
        srv.stop()
    assert len(stream) > 16 * MiB


@pytest.mark.integration
def test_killing_the_server_mid_send_or_receive_leaves_both_pools_whole(pools, tmp_path):
    src, dst = pools
    stream = tmp_path / "full"
    ts(src, "send", "vol@base", "-o", str(stream))
    data = stream.read_bytes()
    # a receive cut by a crash of the receiving server
    srv = Server(dst)
    feeder = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", dst, "receive",
                               "copy"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    feeder.stdin.write(data[:len(data) // 2])
    feeder.stdin.flush()
    _wait_for_workspace(dst)
    srv.kill()
    feeder.stdin.close()
    err = feeder.stderr.read()
    assert feeder.wait(60) != 0 and b"closed the control connection" in err
    assert b"'thinstore receive --resume copy'" in err, err     # and says how to go on
    # a send cut by a crash of the sending server
    srv = Server(src)
    sender = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", src, "send",
                               "vol@base"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=env())
    sender.stdout.read(1 << 20)
    srv.kill()
    sender.stdout.read()
    assert sender.wait(60) != 0
    for pool in (src, dst):
        assert ts(pool, "check").stdout.decode().splitlines()[-1] == "clean"
    # the receive resumes (online again) from the whole stream
    srv = Server(dst)
    try:
        with open(stream, "rb") as f:
            ts(dst, "receive", "--resume", "copy", stdin=f)
    finally:
        srv.stop()
    assert exported(dst, "copy@base", tmp_path / "c") == exported(src, "vol@base",
                                                                  tmp_path / "v")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for_workspace(pool: str) -> None:
    """The receive has started: its resume token is on disk."""
    token = os.path.join(pool, "resume", "copy.json")
    for _ in range(600):
        if os.path.exists(token):
            return
        time.sleep(0.05)
    raise AssertionError("the receive never started")


@pytest.mark.integration
def test_receive_refuses_a_volume_with_nbd_clients(pools, tmp_path):
    """Publishing replaces the volume's content, as rollback would: not under clients."""
    src, dst = pools
    stream = tmp_path / "s"
    ts(src, "send", "vol@base", "-o", str(stream))
    ts(dst, "receive", "vol", "-i", str(stream))
    ts(src, "snapshot", "vol@next")
    ts(src, "send", "vol@next", "--from", "@base", "-o", str(stream))
    srv = Server(dst)
    try:
        need_libnbd_python()
        holder = subprocess.Popen([SYSTEM_PYTHON, "-c", "import nbd, sys; h = nbd.NBD(); "
                                   "h.connect_uri(sys.argv[1]); sys.stdin.read()",
                                   srv.uri("vol")], stdin=subprocess.PIPE)
        wait_for(lambda: _clients(dst, "vol") == 1, what="the NBD client")
        busy = ts(dst, "receive", "vol", "-i", str(stream), check=False)
        holder.stdin.close()
        holder.wait(30)
        wait_for(lambda: _clients(dst, "vol") == 0, what="the client to leave")
        ts(dst, "receive", "vol", "-i", str(stream))
    finally:
        srv.stop()
    assert busy.returncode == 5 and b"open NBD connection" in busy.stderr


def _clients(pool: str, name: str) -> int:
    with RemotePool(pool) as remote:
        return remote.connections().get(name, 0)


def test_a_pinned_generation_stays_whole_while_commits_reuse_space(pool):
    """What check and dump of a served pool rely on: the committed tree they read is not
    overwritten by the commits that go on meanwhile, and its blocks are freed after."""
    from thinstore.check import PinnedMeta, check_metadata, check_served
    from thinstore.dump import dump_metadata
    from thinstore.salvage import salvage
    from thinstore.storage import FileIO

    def read_back(slots):         # through a file of its own: what the pin keeps on disk
        fio = FileIO(os.path.join(pool.path, "meta"), readonly=True)
        try:
            sv = salvage(PinnedMeta(fio, slots), pool.md.data_fio)
            return dump_metadata(sv.md), sv.problems + check_metadata(sv.md)
        finally:
            fio.close()

    pool.create_volume("v", 8 * MiB)
    with pool.open_device("v") as dev:
        dev.pwrite(os.urandom(4 * MiB), 0)
        pool.commit()
        with pool.lock:
            want = dump_metadata(pool.md)
        with pool.pinned_generation() as slots:
            for i in range(20):               # each commit frees the previous tree's blocks
                dev.pwrite(os.urandom(64 << 10), i * (64 << 10))
                pool.commit()
            held = len(pool.md.store.held)
            got, problems = read_back(slots)
        assert got == want and problems == [], "the pinned generation read back whole"
        assert held > 0 and not pool.md.store.held, "held while pinned, freed after"
    report = check_served(pool)
    assert report.clean, report.problems
    assert report.info["generation"] == pool.md.generation


@pytest.mark.integration
def test_the_three_backup_walkthroughs_of_the_docs_run(tmp_path):
    """docs/replication.md's shell blocks, run as written on a served vm1 (paths moved,
    and the volume written just before each snapshot, as a served one is)."""
    need_libnbd_python()
    need("nbdinfo", "nbdcopy")
    text = open(os.path.join(ROOT, "docs", "replication.md")).read()
    section = text[text.index("## Incremental backup of a served volume"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    assert len(blocks) == 3
    srv_pool, bin_dir = str(tmp_path / "srv"), tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "thinstore"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} -m thinstore \"$@\"\n")
    wrapper.chmod(0o755)
    pools = {p: str(tmp_path / p) for p in ("srv", "backup", "restore")}
    for p in pools.values():
        ts(p, "init", "--capacity", "1G")
    ts(srv_pool, "create", "vm1", "--size", "64M")
    srv = Server(srv_pool)
    results = []
    try:
        run_env = dict(env(), PATH=f"{bin_dir}:{os.environ['PATH']}")
        for n, block in enumerate(blocks):
            write = f"head -c 1M /dev/urandom | nbdcopy - '{srv.uri('vm1')}'"
            script = "\n".join(f"{write}; {line}" if "snapshot vm1@" in line else line
                               for line in block.splitlines())
            script = (script.replace("/srv/pool/nbd.sock", srv.sock)
                      .replace("/srv/pool", srv_pool).replace("/backup/pool", pools["backup"])
                      .replace("/restore", pools["restore"])
                      .replace("tools/", os.path.join(ROOT, "tools") + "/"))
            done = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                                  env=run_env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (script, done.stderr)
            want = exported(srv_pool, "vm1@tue", tmp_path / "want")
            got = [lambda: exported(pools["backup"], "vm1@tue", tmp_path / "got"),
                   lambda: exported(pools["restore"], "vm1@tue", tmp_path / "got"),
                   lambda: (tmp_path / "vm1.img").read_bytes()][n]()
            results.append(got == want)
            if n == 2:
                assert "copied 1048576 of 67108864 bytes" in done.stdout
            ts(srv_pool, "destroy", "vm1@tue")
            ts(srv_pool, "destroy", "vm1@mon", check=False)
    finally:
        srv.stop()
    assert results == [True, True, True]


@pytest.mark.integration
def test_interrupting_an_online_receive_stops_it_in_the_server(pools, tmp_path):
    """^C of the command stops the server's receive too (it notices at its next progress
    event) and leaves it resumable, as offline."""
    src, dst = pools
    stream = tmp_path / "s"
    ts(src, "send", "vol@base", "-o", str(stream))
    data = stream.read_bytes()
    srv = Server(dst)
    try:
        # SIGINT as a terminal's ^C sends it, also when the tests run where it is ignored
        # (a job started with '&' by a shell without job control, nohup): a process that
        # starts with SIGINT ignored keeps it ignored, Python's KeyboardInterrupt too
        feeder = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", dst, "receive",
                                   "copy"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env(), preexec_fn=_default_sigint)
        feeder.stdin.write(data[:len(data) // 2])
        feeder.stdin.flush()
        _wait_for_workspace(dst)
        feeder.send_signal(signal.SIGINT)
        assert feeder.wait(30) == 130 and b"interrupted" in feeder.stderr.read()
        with pytest.raises(BrokenPipeError):     # the server let go of the stream
            for pos in range(len(data) // 2, len(data), 64 << 10):
                feeder.stdin.write(data[pos:pos + (64 << 10)])
                feeder.stdin.flush()
        assert ts(dst, "list", "copy", check=False).returncode == 3
        done = ts(dst, "receive", "--resume", "copy", "-i", str(stream), "-v")
    finally:
        srv.stop()
    assert b"received copy@base" in done.stderr
    assert exported(dst, "copy@base", tmp_path / "c") == exported(src, "vol@base", tmp_path / "v")


def test_bad_online_requests_get_clear_errors_and_the_server_carries_on(pool, tmp_path):
    """Wrong descriptor counts, a descriptor that cannot be written, unknown arguments:
    each gets its error; nothing is left open and the next request is answered."""
    import socket as _socket
    from thinstore.control import ControlServer
    from thinstore.errors import ProtocolError
    pool.create_volume("v", MiB)
    pool.snapshot("v@a")
    server = ControlServer(pool)
    server.listen(str(tmp_path / "c.sock"))
    try:
        before = len(os.listdir("/proc/self/fd"))
        with RemotePool.__new__(RemotePool) as remote:
            remote.path = pool.path
            remote._sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            remote._sock.connect(str(tmp_path / "c.sock"))
            remote._reader = remote._sock.makefile("rb")
            remote._lock = threading.Lock()
            with pytest.raises(ProtocolError, match="needs 1 descriptor"):
                remote.stream("send", snapshot="v@a")
            with open(tmp_path / "f", "w") as f, pytest.raises(ProtocolError, match="descriptor"):
                remote.stream("diff", fds=[f.fileno()], a="v@a")
            with open(os.devnull, "rb") as f, pytest.raises(OSError):
                remote.stream("send", fds=[f.fileno()], snapshot="v@a")   # not writable
            with pytest.raises(ProtocolError, match="takes"):
                remote.stream("scrub", speed=1)
            assert remote.stream("diff", a="v@a")["ranges"] == []
            assert remote.ping()["pid"] == os.getpid()
        wait_for(lambda: len(os.listdir("/proc/self/fd")) <= before,
                 what="every passed descriptor and the connection to be closed")
    finally:
        server.shutdown()
