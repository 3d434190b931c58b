"""Everyday mistakes (issue 10, items 6-14), each tried the way a user would type it."""

from __future__ import annotations

import json
import os
import pty
import re
import shutil
import subprocess
import sys

import pytest

from thinstore import Pool
from thinstore.errors import PoolFull, UsageError
from hardening_helpers import G, K, M, ROOT, Serve, fails, out, small_pool, ts
from integrity_helpers import chunk_of, flip

CHUNK = 64 * K


@pytest.fixture
def pool():
    """A pool of 64M with volume v (4M of data) and v@a, made in-process."""
    with small_pool(4 * M) as path:
        yield path


def here(pool: str, name: str) -> str:
    return os.path.join(os.path.dirname(pool), name)


# 6 ------------------------------------------------------------------------------------
def test_a_failed_export_leaves_the_old_file_as_it_was_and_no_new_one(pool):
    flip(os.path.join(pool, "data"), chunk_of(pool, "v", 2) * CHUNK + 123)   # damaged chunk
    old = here(pool, "old.raw")
    with open(old, "wb") as f:
        f.write(b"the image from yesterday")
    fails(11, "export", "v", old, pool=pool)
    assert open(old, "rb").read() == b"the image from yesterday"
    fails(11, "export", "v", here(pool, "new.raw"), pool=pool)
    assert sorted(os.listdir(os.path.dirname(pool))) == ["old.raw", "pool"]  # no .partial


def test_a_good_export_replaces_the_file_keeping_its_mode(pool):
    old = here(pool, "img.raw")
    with open(old, "wb") as f:
        f.write(b"x" * 100)
    os.chmod(old, 0o640)
    out("export", "v@a", old, pool=pool)
    assert os.path.getsize(old) == 16 * M and oct(os.stat(old).st_mode & 0o777) == "0o640"
    with open(old, "rb") as f:
        assert f.read(4 * M) == b"\x07" * (4 * M)


# 7 ------------------------------------------------------------------------------------
def test_every_command_taking_a_path_says_is_a_directory(pool):
    d = here(pool, "adir")
    os.mkdir(d)
    for args in (("import", "new", d), ("export", "v", d), ("send", "v@a", "-o", d),
                 ("receive", "w", "-i", d), ("restore", d), ("dump", "-o", d),
                 ("serve", "--tls-cert", d, "--tls-key", d)):
        err = fails(1, *args, pool=pool)
        assert err == f"thinstore: {d}: Is a directory\n", (args, err)
    assert "new" not in out("list", "-H", "-o", "name", pool=pool).split()


def test_unreadable_inputs_and_unwritable_outputs_are_named(pool):
    """Root reads anything; without CAP_DAC_OVERRIDE/READ_SEARCH (dropped from the
    bounding set, so the exec'd CLI lacks them) it meets modes as any user does."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to drop the capabilities that bypass modes")
    secret, closed = here(pool, "secret"), here(pool, "closed")
    with open(secret, "w") as f:
        f.write("{}")
    os.chmod(secret, 0)
    os.mkdir(closed, 0o500)
    drop = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    for args, named in ((("import", "new", secret), secret), (("restore", secret), secret),
                        (("receive", "w", "-i", secret), secret),
                        (("export", "v", f"{closed}/out"), f"{closed}/out"),
                        (("send", "v@a", "-o", f"{closed}/s"), f"{closed}/s")):
        r = subprocess.run([*drop, sys.executable, "-m", "thinstore", "--pool", pool, *args],
                           capture_output=True, text=True, timeout=60,
                           env=dict(os.environ, PYTHONPATH=ROOT))
        assert (r.returncode, r.stderr) == (1, f"thinstore: {named}: Permission denied\n"), args


def test_a_pool_path_that_is_not_a_directory_says_so(pool):
    fifo = here(pool, "fifo")
    os.mkfifo(fifo)
    open(here(pool, "afile"), "w").close()
    for args, path in ((("init",), here(pool, "afile")), (("list",), fifo),
                       (("status",), "/dev/null")):
        assert fails(1, *args, pool=path) == f"thinstore: {path}: Not a directory\n"


def test_a_fifo_or_character_device_is_a_stream_that_needs_a_size(pool):
    fifo = here(pool, "fifo")
    os.mkfifo(fifo)
    for source in (fifo, "/dev/null"):
        err = fails(2, "import", "new", source, pool=pool)
        assert "has no size" in err and "--size" in err
    out("import", "new", "/dev/null", "--size", "1M", pool=pool)


# 8 ------------------------------------------------------------------------------------
def test_export_to_a_terminal_is_refused(pool):
    leader, follower = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, "export", "v",
                            "-"], stdout=follower, stderr=subprocess.PIPE, timeout=60,
                           env=dict(os.environ, PYTHONPATH=ROOT))
    finally:
        os.close(follower)
        os.close(leader)
    assert r.returncode == 2
    assert "refusing to write a raw image to a terminal" in r.stderr.decode()


# 9 ------------------------------------------------------------------------------------
def test_serve_v_logs_each_connection_open_and_close(pool):
    from thinstore.nbd.client import NBDDevice
    server = Serve(pool, "-v")
    try:
        with NBDDevice(os.path.join(pool, "nbd.sock"), "v") as dev:
            dev.pwrite(b"y" * 8192, 0)
            dev.pread(0, 4096)
            dev.flush()
        with pytest.raises(Exception):
            NBDDevice(os.path.join(pool, "nbd.sock"), "nope")
    finally:
        log = server.stop()
    pid = r"pid \d+ uid %d" % os.getuid()
    assert re.search(rf"connection 0 from {pid}: opened 'v'\n", log), log
    assert re.search(rf"connection 0 from {pid}: closed 'v' after [\d.]+ s, read 4K, "
                     r"wrote 8K\n", log), log
    assert re.search(rf"connection 1 from {pid}: closed in the handshake after [\d.]+ s "
                     r"\(the client hung up; last refusal: no export 'nope'", log), log


# 10 -----------------------------------------------------------------------------------
def test_list_kinds_take_plurals_and_errors_quote_what_was_typed(pool):
    assert out("list", "-H", "-o", "name", "-t", "vols", pool=pool).split() == ["v"]
    assert out("list", "-H", "-o", "name", "-t", "snaps", pool=pool).split() == ["v@a"]
    r = ts("list", "-t", "vols,bogus", pool=pool)
    assert r.returncode == 2 and "unknown kind 'bogus'" in r.stderr.decode()


def test_sizes_in_errors_read_as_typed_and_each_interface_names_its_own_option(pool):
    out("resize", "v", "3G", pool=pool)
    err = fails(2, "resize", "v", "1G", pool=pool)
    assert "'v' is 3G; shrinking it to 1G" in err and "--shrink" in err
    assert "shrink=True" not in err and "3221225472" not in err
    with Pool.open(pool) as p, pytest.raises(UsageError) as exc:
        p.resize("v", G)
    assert "shrink=True" in str(exc.value) and "--shrink" not in str(exc.value)


# 11 -----------------------------------------------------------------------------------
def test_destroying_a_volume_says_which_snapshots_remain_and_list_shows_their_origin(pool):
    with Pool.open(pool) as p:
        p.snapshot("v@b")
        p.snapshot("v@c")
    r = ts("destroy", "v", pool=pool)
    assert r.returncode == 0
    assert r.stderr.decode() == ("thinstore: note: 3 snapshots of 'v' remain (v@a, v@b, v@c); "
                                 "they are whole on their own: destroy them with 'thinstore "
                                 "destroy v@a' and so on\n")
    rows = [line.split("\t") for line in out("list", "-H", pool=pool).splitlines()]
    assert [(row[0], row[6]) for row in rows] == [("v@a", "v (gone)"), ("v@b", "v (gone)"),
                                                   ("v@c", "v (gone)")]


def test_destroying_a_snapshot_says_which_clones_remain_and_list_marks_their_origin(pool):
    with Pool.open(pool) as p:
        p.clone("v@a", "c1")
    r = ts("destroy", "v@a", pool=pool)
    assert r.returncode == 0
    assert r.stderr.decode() == ("thinstore: note: 1 clone of 'v@a' remains (c1); it is "
                                 "whole on its own: destroy it with 'thinstore destroy "
                                 "c1'\n")
    rows = {line.split("\t")[0]: line.split("\t") for line in
            out("list", "-H", pool=pool).splitlines()}
    assert rows["c1"][6] == "(gone)" and rows["v"][6] == "-"


# 12 -----------------------------------------------------------------------------------
def test_readme_says_exactly_which_commands_work_while_serving(pool):
    readme = open(os.path.join(ROOT, "README.md")).read()
    out("dump", "--json", "-o", here(pool, "d.json"), pool=pool)
    working = re.search(r"While `serve` runs, these commands work through its control "
                        r"socket: (.*?)\. These", readme, re.S).group(1)
    refusing = re.search(r"stop with exit 5 until the server is stopped: (.*?)\.", readme,
                         re.S).group(1)
    say = lambda text: re.findall(r"`(\w+)`", text)  # noqa: E731
    image = here(pool, "img")
    open(image, "wb").write(b"z" * 4096)
    example = {"create": ["create", "n", "--size", "1M"], "snapshot": ["snapshot", "v@s"],
               "clone": ["clone", "v@a", "c"], "list": ["list"], "destroy": ["destroy", "c"],
               "rename": ["rename", "n", "n2"], "rollback": ["rollback", "v@a"],
               "resize": ["resize", "n2", "2M"], "grow": ["grow", "+1M"],
               "status": ["status"], "import": ["import", "i", image],
               "export": ["export", "v@a", here(pool, "o")], "diff": ["diff", "v@a"],
               "send": ["send", "v@a", "-o", here(pool, "s")],
               "receive": ["receive", "r", "-i", here(pool, "s")], "check": ["check"],
               "repair": ["repair", "--dry-run"], "scrub": ["scrub", "--rate", "0"], "dump": ["dump"],
               "restore": ["restore", here(pool, "d.json")]}
    assert set(say(working)) | set(say(refusing)) == set(example)
    with Serve(pool):
        for name in say(working):
            out(*example[name], pool=pool)
        for name in say(refusing):
            fails(5, *example[name], pool=pool)


# 13 -----------------------------------------------------------------------------------
def test_docs_say_to_sync_or_freeze_a_mounted_file_system_before_a_snapshot():
    nbd = open(os.path.join(ROOT, "docs", "nbd.md")).read()
    assert "sync -f /mnt/vm1" in nbd and "fsfreeze -f /mnt/vm1" in nbd
    assert "fsfreeze -u" in nbd


# 14 -----------------------------------------------------------------------------------
def test_overprovisioning_is_noted_and_a_full_pool_names_grow(pool):
    r = ts("create", "big", "--size", "1G", pool=pool)
    assert r.returncode == 0
    note = r.stderr.decode()
    assert note.startswith("thinstore: note: 'big' (1G) is larger than the pool's free space")
    assert "thinstore grow" in note
    assert ts("create", "small", "--size", "1M", pool=pool).stderr == b""
    with Pool.open(pool) as p, p.open_device("big") as dev, pytest.raises(PoolFull) as exc:
        dev.pwrite(b"\x01" * (64 * M), 0)
    assert "grow the pool" in str(exc.value)


def test_import_larger_than_the_free_space_is_refused_before_writing(pool):
    image = here(pool, "big.raw")
    with open(image, "wb") as f:
        f.write(b"\x01" * (64 * M))
    before = json.loads(out("status", "--json", pool=pool))["used"]
    err = fails(8, "import", "big", image, pool=pool)
    assert "cannot import" in err and "into 'big'" in err and "thinstore grow" in err
    assert "holds up to 64M of data but the pool has" in err and "nothing was written" in err
    assert json.loads(out("status", "--json", pool=pool))["used"] == before
    assert "big" not in out("list", "-H", "-o", "name", pool=pool).split()


def test_a_second_restore_keeps_the_first_kept_metadata(pool):
    dump = here(pool, "d.json")
    out("dump", "--json", "-o", dump, pool=pool)
    original = open(os.path.join(pool, "meta"), "rb").read()
    assert "meta.old;" not in out("restore", dump, pool=pool) + ";"
    out("create", "later", "--size", "1M", pool=pool)
    said = out("restore", dump, pool=pool)
    assert said.strip().endswith("the previous meta file is meta.old.1")
    assert open(os.path.join(pool, "meta.old"), "rb").read() == original
    assert os.path.exists(os.path.join(pool, "meta.old.1"))


def test_demo_pool_is_ignored_by_git():
    lines = open(os.path.join(ROOT, ".gitignore")).read().split()
    assert "demo-pool/" in lines


def test_a_negative_size_says_it_must_be_positive(pool):
    for args in (("create", "n", "--size=-1G"), ("resize", "v", "--", "-1G")):
        err = fails(2, *args, pool=pool)
        assert "size must be positive" in err, err
