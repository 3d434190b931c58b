"""What a fresh-user trial found (names, sizes, the pool lock, notes), tried from the CLI
the way a user types it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from thinstore import Pool, names, online
from thinstore import management
from thinstore.units import check_device_size
from thinstore.control import ControlServer
from thinstore.errors import InvalidName
from hardening_helpers import K, M, ROOT, Serve, fails, out, small_pool, ts



@pytest.fixture
def pool():
    """A pool of 64M with volume v and its snapshot v@a, made in-process."""
    with small_pool() as path:
        yield path


# the notes after destroy ---------------------------------------------------------------
def test_the_note_after_destroy_speaks_of_one_snapshot_as_one(pool):
    r = ts("destroy", "v", pool=pool)
    assert r.returncode == 0
    assert r.stderr.decode() == ("thinstore: note: 1 snapshot of 'v' remains (v@a); it is "
                                 "whole on its own: destroy it with 'thinstore destroy v@a'\n")


def test_the_note_after_destroy_speaks_of_several_clones_as_several(pool):
    out("clone", "v@a", "c1", pool=pool)
    out("clone", "v@a", "c2", pool=pool)
    r = ts("destroy", "v@a", pool=pool)
    assert r.returncode == 0
    assert r.stderr.decode() == ("thinstore: note: 2 clones of 'v@a' remain (c1, c2); they "
                                 "are whole on their own: destroy them with 'thinstore "
                                 "destroy c1' and so on\n")


# names that look like options or hidden files ------------------------------------------
@pytest.mark.parametrize("name", ["-x", ".hidden", "-", ".receive.v"])
def test_a_new_name_may_not_start_with_a_dash_or_a_dot(pool, name):
    for args in (["create", "--size", "1M", "--", name], ["clone", "v@a", "--", name],
                 ["rename", "--", "v", name]):
        err = fails(2, *args, pool=pool)
        assert f"invalid device name {name!r}: a new name may not start with {name[0]!r}" in err
    stream = os.path.join(os.path.dirname(pool), "v.stream")
    out("send", "v@a", "-o", stream, pool=pool)
    assert "a new name may not start" in fails(2, "receive", "-i", stream, "--", name, pool=pool)
    with Pool.open(pool) as p:
        assert [i.name for i in p.list()] == ["v", "v@a"]
        with pytest.raises(InvalidName):
            p.create_volume(name, M)


def test_a_snapshot_part_and_a_dot_or_dash_inside_a_name_stay_allowed(pool):
    out("snapshot", "v@-x", pool=pool)
    out("clone", "v@-x", "a.b-c", pool=pool)
    out("destroy", "v@-x", pool=pool)
    assert out("list", "-H", "-o", "name", pool=pool).split() == ["a.b-c", "v", "v@a"]


def test_names_an_older_thinstore_allowed_still_work_with_end_of_options(pool, monkeypatch):
    monkeypatch.setattr(names, "check_new_name", lambda n: names.check_name(n, snapshot=False))
    with Pool.open(pool) as p:                      # as an older thinstore wrote them
        p.create_volume("-x", M)
        p.create_volume(".old", M)
    monkeypatch.undo()
    assert out("list", "-H", "-o", "name", pool=pool).split() == ["-x", ".old", "v", "v@a"]
    out("snapshot", "--", "-x@s", pool=pool)
    out("clone", "--", "-x@s", "x2", pool=pool)
    out("rename", "--", ".old", "new", pool=pool)
    out("resize", "--", "-x", "2M", pool=pool)
    out("bench", "--io-type", "write", "--io-total", "256K", "--", "-x", pool=pool)  # a clone
    fails(2, "rename", "--", "-x", "-y", pool=pool)
    r = ts("destroy", "--", "-x", pool=pool)
    assert r.returncode == 0 and "1 snapshot of '-x' remains (-x@s)" in r.stderr.decode()
    out("destroy", "--", "-x@s", pool=pool)
    assert out("list", "-H", "-o", "name", pool=pool).split() == ["new", "v", "v@a", "x2"]


def test_a_receive_into_v_does_not_shadow_a_device_named_like_its_marker(pool, monkeypatch):
    """The server marks a running receive into v; the marker once was '.receive:v', a
    name a device could have, whose destroy was then refused as 'being read'."""
    monkeypatch.setattr(names, "check_new_name", lambda n: names.check_name(n, snapshot=False))
    with Pool.open(pool) as p:
        p.create_volume(".receive:v", M)
        server = ControlServer(p)
        with online._receiving(server, "v"):
            server.call("destroy", {"name": ".receive:v", "force": True})
        assert [i.name for i in p.list()] == ["v", "v@a"]


# 0-byte volumes ---------------------------------------------------------------------------
def test_a_volume_of_0_bytes_is_refused_at_create_resize_and_import(pool):
    for args in (["create", "z", "--size", "0"], ["resize", "v", "0", "--shrink"]):
        assert "a volume of 0 bytes holds nothing" in fails(2, *args, pool=pool)
    empty = os.path.join(os.path.dirname(pool), "empty.raw")
    open(empty, "wb").close()
    assert "empty.raw is empty: a volume needs a size above 0; give --size" in \
        fails(2, "import", "e", empty, pool=pool)
    assert out("list", "-Hp", "-o", "name,size", pool=pool).split() == \
        ["v", str(16 * M), "v@a", str(16 * M)]
    out("import", "e", empty, "--size", "1M", pool=pool)     # an empty volume of 1M


def test_a_0_byte_volume_an_older_thinstore_made_still_works(pool, monkeypatch):
    monkeypatch.setattr(management, "check_volume_size", check_device_size)
    with Pool.open(pool) as p:
        p.create_volume("z", 0)
    monkeypatch.undo()
    out("snapshot", "z@s", pool=pool)
    out("clone", "z@s", "z2", pool=pool)
    stream = os.path.join(os.path.dirname(pool), "z.stream")
    out("send", "z@s", "-o", stream, pool=pool)
    out("receive", "r", "-i", stream, pool=pool)
    out("resize", "z", "1M", pool=pool)
    sizes = dict(line.split("\t") for line in
                 out("list", "-Hp", "-o", "name,size", pool=pool).splitlines())
    assert sizes == {"r": "0", "r@s": "0", "v": str(16 * M), "v@a": str(16 * M),
                     "z": str(M), "z2": "0", "z@s": "0"}


# capacities and sizes that are not whole chunks or sectors ------------------------------
def capacity(path) -> int:
    return int(dict(line.split(":", 1) for line in out("status", "-p", pool=path)
                    .splitlines())["capacity"])


def test_a_capacity_not_a_whole_number_of_chunks_is_rounded_up_and_said(tmp_path):
    path = tmp_path / "p"
    r = ts("init", "--capacity", "100K", pool=path)
    assert r.returncode == 0 and r.stderr.decode() == (
        "thinstore: note: capacity 100K rounded up to 128K, a whole number of 64K chunks\n")
    assert capacity(path) == 128 * K
    r = ts("grow", "+1000000", pool=path)
    assert r.returncode == 0 and r.stderr.decode() == (
        "thinstore: note: capacity 1131072 bytes rounded up to 1179648 bytes, a whole "
        "number of 64K chunks\n")
    assert capacity(path) == 1179648
    assert ts("grow", "+64K", pool=path).stderr == b""          # whole chunks: no note
    assert "holds no chunk: give at least one (4K)" in \
        fails(2, "init", "--capacity", "0", "--chunk-size", "4K", pool=tmp_path / "q")


def test_a_size_that_is_not_whole_sectors_is_kept_and_said(pool):
    r = ts("create", "odd", "--size", "513", pool=pool)
    assert r.returncode == 0 and r.stderr.decode() == (
        "thinstore: note: 'odd' is 513 bytes, not a whole number of 512-byte sectors: QEMU "
        "sees 1024 bytes (zeros past the end), the kernel's loop device 512; a multiple of "
        "4K suits every client\n")
    assert out("list", "-Hp", "-o", "size", "odd", pool=pool) == "513\n"
    assert ts("create", "even", "--size", "1536", pool=pool).stderr == b""


# two commands on one unserved pool -------------------------------------------------------
def test_a_command_waits_for_another_that_holds_the_pool(pool):
    holder = Pool.open(pool, commit_interval=0)          # this process, like a command
    try:
        proc = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", pool,
                                 "snapshot", "v@b"], stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT))
        note = proc.stderr.readline()                    # said once it waited a second
    finally:
        holder.close()                                   # the other command finishes
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert note == (f"thinstore: note: pool {pool} is held by process {os.getpid()}; "
                    "waiting up to 10 s for it (--wait SECONDS, --no-wait)\n")
    assert out("list", "-H", "-o", "name", pool=pool).split() == ["v", "v@a", "v@b"]


def test_a_command_gives_up_after_its_wait_naming_the_holder(pool):
    with Pool.open(pool, commit_interval=0):
        err = fails(5, "--no-wait", "snapshot", "v@b", pool=pool)
        assert f"pool {pool} is in use by process {os.getpid()} " in err and "waited" not in err
        r = ts("snapshot", "v@b", "--wait", "1.2", pool=pool)
        assert r.returncode == 5
        note, err = r.stderr.decode().splitlines()
        assert note.startswith("thinstore: note: ") and "up to 1.2 s" in note
        assert f"in use by process {os.getpid()} " in err and "waited 1.2 s for it" in err
        assert err.endswith("; wait longer with --wait SECONDS")
    assert "invalid wait 'soon'" in ts("--wait", "soon", "list", pool=pool).stderr.decode()
    assert out("list", "-H", "-o", "name", pool=pool).split() == ["v", "v@a"]


# a forced destroy says what it cut off -----------------------------------------------------
def test_a_forced_destroy_of_a_served_volume_warns_of_the_clients_it_drops(pool):
    from thinstore.nbd.client import NBDDevice
    with Serve(pool):
        with NBDDevice(os.path.join(pool, "nbd.sock"), "v"):
            assert "open NBD connection" in fails(5, "destroy", "v", pool=pool)
            r = ts("destroy", "--force", "v", pool=pool)
        assert r.returncode == 0
        assert r.stderr.decode().splitlines() == [
            "thinstore: warning: 'v' was in use and is destroyed (--force): its 1 NBD "
            "connection was dropped",
            "thinstore: note: 1 snapshot of 'v' remains (v@a); it is whole on its own: "
            "destroy it with 'thinstore destroy v@a'"]
        r = ts("destroy", "--force", "v@a", pool=pool)        # nobody used it: no warning
        assert r.returncode == 0 and r.stderr == b""


# negative sizes and suffixes ----------------------------------------------------------
def test_a_negative_size_is_called_negative_not_a_missing_argument(pool):
    """`--size -5G` was taken by argparse for an option ("expected one argument")."""
    for args in (("create", "n", "--size", "-5G"), ("create", "n", "-s", "-1.5G"),
                 ("resize", "v", "-1M"), ("grow", "-1G")):
        assert "size must be positive" in fails(2, *args, pool=pool), args
    assert "K/M/G/T/P/E suffix" in fails(2, "create", "n", "--size", "5X", pool=pool)
    assert ts("create", "n", "--size", "1P", pool=pool).returncode == 0   # P is a suffix


# a server that is stopped (SIGSTOP) ---------------------------------------------------------
def test_a_command_against_a_stopped_server_says_the_server_does_not_answer(pool):
    """A stopped server's control socket still takes connections, so a command waited
    for the lock and then said only that the pool was 'in use by process N (a running
    thinstore serve or another opener)': not that the server was there and silent."""
    import signal
    from nbd_helpers import ServeProcess
    server = ServeProcess(pool)
    try:
        server.proc.send_signal(signal.SIGSTOP)
        r = ts("--wait", "0.5", "list", pool=pool)
        assert r.returncode == 5
        err = r.stderr.decode().splitlines()[-1]
        assert f"its server (process {server.proc.pid})" in err and "did not answer" in err
        assert f"kill -CONT {server.proc.pid}" in err
    finally:
        server.proc.send_signal(signal.SIGCONT)
        assert server.stop() == 0
    assert out("list", "-H", "-o", "name", pool=pool).split() == ["v", "v@a"]


# the file system under the pool is full ------------------------------------------------------
def test_a_full_file_system_under_the_pool_is_named_as_such(tmp_path):
    """With the pool nearly empty but the file system holding it full, a command said
    only 'No space left on device', which reads as the pool being full."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "fs"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)]).returncode:
        pytest.skip("could not mount a tmpfs")
    try:
        pool = str(mnt / "pool")
        assert ts("init", "--capacity", "64M", pool=pool).returncode == 0
        with open(mnt / "filler", "wb") as f:
            try:
                while True:
                    f.write(bytes(64 << 10))
                    f.flush()
            except OSError:
                pass
        r = ts("create", "v", "--size", "1M", pool=pool)
        assert r.returncode == 1
        err = r.stderr.decode()
        assert f"no space left on the file system that holds pool {pool}" in err, err
        assert f"df {pool}" in err
        os.unlink(mnt / "filler")
        assert ts("create", "v", "--size", "1M", pool=pool).returncode == 0
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
