"""The ``thinstore`` command line, end to end: real pools in tmp_path, the CLI in a subprocess.

What a user or a script relies on is asserted: exit codes, the one-line error naming the
device, the JSON keys, the table shape, and that import/export keep holes as holes.
"""

from __future__ import annotations

import io
import json
import os
import pty
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from thinstore import Pool
from thinstore.cli.device_cmds import device_dict
from thinstore.cli.main import main
from thinstore.errors import ReadOnlyDevice
from thinstore.progress import Progress
from thinstore.units import format_size, parse_size

ROOT = Path(__file__).resolve().parent.parent
K, M, G = 1 << 10, 1 << 20, 1 << 30
CHUNK = 64 * K


def cli(*args, pool=None, env=None, stderr=subprocess.PIPE, check_rc=None):
    """Run ``python -m thinstore [--pool POOL] ARGS`` from this tree; return the result."""
    # keep THINSTORE_PURE_PYTHON and the like (a run forces a backend for every process);
    # drop only what would change which pool or how errors print
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("THINSTORE_POOL", "THINSTORE_DEBUG")}
    full_env.update(PYTHONPATH=str(ROOT), **(env or {}))
    pool_args = ["--pool", str(pool)] if pool is not None else []
    result = subprocess.run([sys.executable, "-m", "thinstore", *pool_args, *map(str, args)],
                            stdout=subprocess.PIPE, stderr=stderr, env=full_env, timeout=120)
    if check_rc is not None:
        assert result.returncode == check_rc, (result.returncode, result.stderr)
    return result


def ok(*args, pool=None, env=None) -> str:
    """Run a command that must succeed silently on stderr; return its stdout text."""
    result = cli(*args, pool=pool, env=env)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stderr == b""
    return result.stdout.decode()


def fails(code: int, *args, pool=None, env=None) -> str:
    """Run a command that must fail with ``code`` and one stderr line; return that line."""
    result = cli(*args, pool=pool, env=env)
    err = result.stderr.decode()
    assert result.returncode == code, (result.returncode, err)
    if code != 2 or err.startswith("thinstore: ") and "usage:" not in err:
        assert err.startswith("thinstore: ") and err.count("\n") == 1, err
        assert "Traceback" not in err
    return err


def devices(pool) -> dict[str, dict]:
    """The pool's devices as ``list --json`` shows them (in-process: test_*_list_json execs)."""
    with Pool.open(str(pool)) as p:
        return {info.name: device_dict(info) for info in p.list()}


@pytest.fixture(autouse=True)
def _plain_environment(monkeypatch):
    """In-process runs see neither the caller's pool nor its debug switch."""
    monkeypatch.delenv("THINSTORE_POOL", raising=False)
    monkeypatch.delenv("THINSTORE_DEBUG", raising=False)


@pytest.fixture
def pool(tmp_path):
    """A fresh, closed pool of 1 GiB with 64 KiB chunks (made in-process: init has its test)."""
    path = tmp_path / "pool"
    Pool.create(str(path), capacity=G, chunk_size=CHUNK).close()
    return path


def given(pool, *steps) -> None:
    """Set up devices in-process, faster than the CLI: ("create", "vm1", size), ("snapshot", n)."""
    with Pool.open(str(pool)) as p:
        for op, *args in steps:
            getattr(p, {"create": "create_volume"}.get(op, op))(*args)


def in_process(capsys, *args, pool=None) -> tuple[int, str, str]:
    """Run main() in this process (for parse-level cases; same code path minus the exec)."""
    argv = (["--pool", str(pool)] if pool is not None else []) + [str(a) for a in args]
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def write_device(pool, name: str, data: bytes, offset: int) -> None:
    """Write through the core in this process (the CLI has no write command)."""
    with Pool.open(str(pool)) as p:
        dev = p.open_device(name)
        try:
            dev.pwrite(data, offset)
        finally:
            dev.close()


def sparse_image(path: Path, size: int, pieces: dict[int, bytes]) -> Path:
    """A sparse file of ``size`` bytes holding ``pieces`` at their offsets, holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, data in pieces.items():
            f.seek(offset)
            f.write(data)
    return path


def data_ranges(path: Path) -> list[tuple[int, int]]:
    """The file's data segments as SEEK_DATA/SEEK_HOLE report them."""
    ranges, offset = [], 0
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        while offset < size:
            try:
                start = os.lseek(f.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(f.fileno(), start, os.SEEK_HOLE)
            ranges.append((start, end))
            offset = end
    return ranges


# ---------------------------------------------------------------- units (no subprocess)

@pytest.mark.parametrize("text, value", [
    ("4096", 4096), ("512K", 512 * K), ("10G", 10 * G), ("1.5G", 3 * G // 2),
    ("2T", 2 << 40), ("64k", 64 * K), ("10GiB", 10 * G), ("1MB", M), (".5M", M // 2)])
def test_parse_size_accepts_bytes_and_binary_suffixes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "1.3K", "10X", "1.5.5G", "G"])
def test_parse_size_refuses_what_is_not_a_whole_size(text):
    with pytest.raises(Exception) as info:
        parse_size(text)
    assert info.value.exit_code == 2 and repr(text) in str(info.value)


@pytest.mark.parametrize("value, text", [
    (0, "0B"), (1023, "1023B"), (512 * K, "512K"), (10 * G, "10G"), (3 * G // 2, "1.5G"),
    (123456789, "118M"), (M - 1, "1M")])
def test_format_size_is_short_and_parses_back(value, text):
    assert format_size(value) == text
    assert abs(parse_size(text) - value) <= value / 100


def test_progress_line_shows_bytes_rate_and_eta():
    now = [0.0]
    progress = Progress(100 * M, "import vm1", stream=io.StringIO(), clock=lambda: now[0])
    assert not progress.enabled  # a StringIO is no terminal: nothing is drawn
    now[0] = 2.0
    progress.advance(25 * M)
    line = progress.line(now[0])
    assert line.startswith("import vm1  [######------------------]")
    assert "25M/100M" in line and "12.5M/s" in line and "ETA 0:06" in line
    progress.close()
    assert progress.stream.getvalue() == ""


def test_debug_env_shows_the_traceback(tmp_path, capsys, monkeypatch):
    assert in_process(capsys, "list", pool=tmp_path / "none")[2].count("\n") == 1
    monkeypatch.setenv("THINSTORE_DEBUG", "1")
    code, _, err = in_process(capsys, "list", pool=tmp_path / "none")
    assert code == 9 and "Traceback" in err and err.endswith("(run 'thinstore init' first)\n")


# ---------------------------------------------------------------- pool commands

def test_init_defaults_and_status_json(tmp_path):
    path = tmp_path / "p"
    ok("init", pool=path)
    status = json.loads(ok("status", "--json", pool=path))
    assert status["chunk_size"] == 64 * K and status["capacity"] == 16 * G
    assert status["used"] == 0 and status["free"] == 16 * G
    for key in ("devices", "low_water", "low_water_crossed", "backend", "generation"):
        assert key in status
    assert "already" in fails(2, "init", pool=path)


def test_status_table_shows_human_sizes(pool, capsys):
    given(pool, ("create", "vm1", 4 * G))
    text = ok("status", pool=pool)
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}
    assert fields["capacity"] == "1G" and fields["chunk size"] == "64K"
    assert fields["devices"] == "1" and fields["used"] == "0B (0.0%)"
    assert "not reached" in fields["low water"]
    code, out, _ = in_process(capsys, "status", "-p", pool=pool)
    assert code == 0 and "capacity:       1073741824" in out


def test_grow_adds_capacity_and_never_shrinks(pool):
    ok("grow", "2G", pool=pool)
    ok("grow", "+512M", pool=pool)
    with Pool.open(str(pool)) as p:
        assert p.capacity == 2 * G + 512 * M and p.status()["free"] == 2 * G + 512 * M
    assert "shrink" in fails(2, "grow", "1G", pool=pool)


@pytest.mark.parametrize("size", ["3K", "2K", "2M", "96K", "64Q"])
def test_init_refuses_a_bad_chunk_size(tmp_path, capsys, size):
    code, _, err = in_process(capsys, "init", "--chunk-size", size, pool=tmp_path / "p")
    assert code == 2 and err.startswith("thinstore: ") and "size" in err
    assert not (tmp_path / "p" / "meta").exists()


def test_bad_chunk_size_exits_2_from_the_shell(tmp_path):
    assert "chunk size" in fails(2, "init", "--chunk-size", "3K", pool=tmp_path / "p")


def test_init_with_small_chunks(tmp_path):
    path = tmp_path / "p"
    ok("init", "--capacity", "64M", "--chunk-size", "4K", pool=path)
    with Pool.open(str(path)) as p:
        assert p.chunk_size == 4 * K and p.capacity == 64 * M


# ---------------------------------------------------------------- device commands

def test_create_snapshot_clone_list_json(pool):
    over = cli("create", "vm1", "--size", "10G", pool=pool)   # 10G in a 1G pool: noted
    assert over.returncode == 0 and over.stderr.startswith(b"thinstore: note: 'vm1' (10G)")
    ok("snapshot", "vm1@monday", pool=pool)
    ok("clone", "vm1@monday", "vm1-test", pool=pool)
    devs = {d["name"]: d for d in json.loads(ok("list", "--json", pool=pool))["devices"]}
    assert set(devs) == {"vm1", "vm1@monday", "vm1-test"}
    assert [devs[n]["kind"] for n in ("vm1", "vm1@monday", "vm1-test")] == \
        ["volume", "snapshot", "clone"]
    assert all(d["size"] == 10 * G and d["used"] == 0 for d in devs.values())
    assert devs["vm1@monday"]["read_only"] and not devs["vm1-test"]["read_only"]
    assert devs["vm1-test"]["origin"] == "vm1@monday"
    keys = {"name", "kind", "size", "used", "exclusive", "shared", "origin", "created",
            "read_only", "uuid"}
    assert all(set(d) == keys for d in devs.values())


def test_list_table_is_aligned_with_human_sizes(pool):
    given(pool, ("create", "vm1", 10 * G), ("create", "a-much-longer-name", 512 * K),
          ("snapshot", "vm1@s"))
    lines = ok("list", pool=pool).splitlines()
    assert lines[0].split() == ["NAME", "KIND", "SIZE", "USED", "EXCL", "SHARED", "ORIGIN",
                                "CREATED"]
    assert lines[1].split()[:3] == ["a-much-longer-name", "volume", "512K"]
    assert lines[2].split()[:3] == ["vm1", "volume", "10G"]
    assert lines[3].split()[:3] == ["vm1@s", "snapshot", "10G"]
    # right-aligned SIZE column: every row's size ends where the header's does
    end = lines[0].index("SIZE") + len("SIZE")
    assert lines[1][end - 4:end] == "512K" and lines[2][end - 3:end] == "10G"


def test_list_parsable_and_scripted(pool, capsys):
    given(pool, ("create", "vm1", 10 * G))
    code, out, _ = in_process(capsys, "list", "-p", pool=pool)
    assert code == 0 and out.splitlines()[1].split()[2] == str(10 * G)
    rows = ok("list", "-H", "-p", pool=pool).splitlines()
    assert len(rows) == 1 and rows[0].split("\t")[:3] == ["vm1", "volume", str(10 * G)]


def test_used_exclusive_shared_follow_writes_and_snapshots(pool):
    given(pool, ("create", "vm1", G))
    write_device(pool, "vm1", b"x" * (2 * CHUNK), 0)
    given(pool, ("snapshot", "vm1@s"))
    write_device(pool, "vm1", b"y" * CHUNK, 0)
    vm1 = devices(pool)["vm1"]
    assert vm1["used"] == 2 * CHUNK
    assert vm1["exclusive"] == CHUNK and vm1["shared"] == CHUNK
    assert json.loads(ok("status", "--json", pool=pool))["used"] == 3 * CHUNK


def test_destroy_snapshot_then_volume(pool):
    given(pool, ("create", "vm1", G), ("snapshot", "vm1@s"))
    ok("destroy", "vm1@s", pool=pool)
    ok("destroy", "vm1", pool=pool)
    assert devices(pool) == {}


def test_destroy_busy_device_needs_force(pool):
    with Pool.open(str(pool)) as p:
        p.create_volume("vm1", G)
        dev = p.open_device("vm1")
        try:
            with pytest.raises(Exception) as info:
                p.destroy("vm1")
            assert info.value.exit_code == 5
            p.destroy("vm1", force=True)
        finally:
            dev.close()
    # the CLI passes --force through; with nothing open both forms work
    given(pool, ("create", "vm2", G))
    ok("destroy", "--force", "vm2", pool=pool)


def test_rename_moves_snapshots_along(pool):
    given(pool, ("create", "vm1", G), ("snapshot", "vm1@s"))
    ok("rename", "vm1", "vm2", pool=pool)
    assert set(devices(pool)) == {"vm2", "vm2@s"}


def test_rollback_restores_snapshot_content(pool, tmp_path):
    given(pool, ("create", "vm1", M))
    write_device(pool, "vm1", b"old" * 1000, 0)
    given(pool, ("snapshot", "vm1@s"))
    write_device(pool, "vm1", b"new" * 1000, 0)
    ok("rollback", "vm1@s", pool=pool)
    ok("export", "vm1", tmp_path / "out.raw", pool=pool)
    assert (tmp_path / "out.raw").read_bytes()[:3000] == b"old" * 1000
    assert set(devices(pool)) == {"vm1", "vm1@s"}


def test_resize_grows_and_shrinks_only_when_asked(pool):
    given(pool, ("create", "vm1", G))
    ok("resize", "vm1", "2G", pool=pool)
    assert devices(pool)["vm1"]["size"] == 2 * G
    err = fails(2, "resize", "vm1", "512M", pool=pool)
    assert "vm1" in err and "shrink" in err
    ok("resize", "vm1", "512M", "--shrink", pool=pool)
    assert devices(pool)["vm1"]["size"] == 512 * M


# ---------------------------------------------------------------- error cases

def test_unknown_device_is_named(pool, capsys):
    assert "ghost" in fails(3, "destroy", "ghost", pool=pool)
    for args in (["snapshot", "ghost@s"], ["clone", "ghost@s", "g2"], ["rename", "ghost", "g2"],
                 ["rollback", "ghost@s"], ["resize", "ghost", "1G"], ["export", "ghost", "-"]):
        code, out, err = in_process(capsys, *args, pool=pool)
        assert code == 3 and "ghost" in err and err.count("\n") == 1, (args, err)


@pytest.mark.parametrize("args", [["create", "bad name", "--size", "1G"],
                                  ["create", "a/b", "--size", "1G"],
                                  ["create", "é", "--size", "1G"],
                                  ["create", "x" * 256, "--size", "1G"],
                                  ["create", "", "--size", "1G"],
                                  ["create", "..", "--size", "1G"],
                                  ["create", "vm@s", "--size", "1G"],
                                  ["snapshot", "vm1@a@b"], ["clone", "vm1@s", "n@x"],
                                  ["rename", "vm1", "bad name"], ["destroy", "a b"]])
def test_bad_name_is_a_usage_error(pool, capsys, args):
    code, _, err = in_process(capsys, *args, pool=pool)
    assert code == 2 and err.startswith("thinstore: ") and "name" in err


def test_bad_name_exits_2_from_the_shell(pool):
    assert "bad name" in fails(2, "create", "bad name", "--size", "1G", pool=pool)


def test_existing_name_is_refused(pool, capsys):
    given(pool, ("create", "vm1", G))
    assert "vm1" in fails(4, "create", "vm1", "--size", "1G", pool=pool)
    given(pool, ("snapshot", "vm1@s"), ("create", "vm2", G))
    for args in (["snapshot", "vm1@s"], ["clone", "vm1@s", "vm2"], ["rename", "vm1", "vm2"]):
        code, _, err = in_process(capsys, *args, pool=pool)
        assert code == 4 and err.count("\n") == 1, (args, err)


def test_snapshot_is_read_only(pool, tmp_path):
    given(pool, ("create", "vm1", M), ("snapshot", "vm1@s"))
    image = sparse_image(tmp_path / "img", CHUNK, {0: b"data"})
    assert "vm1@s" in fails(6, "import", "vm1@s", image, pool=pool)
    with pytest.raises(ReadOnlyDevice):
        write_device(pool, "vm1@s", b"data", 0)
    code = cli("resize", "vm1@s", "2M", pool=pool).returncode
    assert code in (2, 6)  # refused either as a name (resize takes a volume) or as read-only


def test_locked_pool_names_the_holder(pool):
    with Pool.open(str(pool)):
        err = fails(5, "--no-wait", "list", pool=pool)     # (the wait: test_trial_fixes)
    assert str(os.getpid()) in err and str(pool) in err


def test_corrupt_superblocks_give_a_distinct_error(pool):
    with open(pool / "meta", "r+b") as f:
        for offset in (0, 4096):
            f.seek(offset)
            f.write(b"\xde\xad\xbe\xef" * 16)
    err = fails(10, "list", pool=pool)
    assert str(pool) in err and "check" in err


def test_missing_pool_and_env_pool(pool, tmp_path):
    assert "THINSTORE_POOL" in fails(2, "list")
    assert "init" in fails(9, "list", pool=tmp_path / "nowhere")
    ok("create", "vm1", "--size", "1G", env={"THINSTORE_POOL": str(pool)})
    assert "vm1" in devices(pool)
    ok("list", "--pool", pool)  # --pool after the command works too


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["create", "vm1"], ["list", "--bogus"],
                                  ["create", "vm1", "--size", "ten"], ["snapshot", "vm1"],
                                  ["resize", "vm1"], ["clone", "vm1@s"],
                                  ["init", "--capacity", "1.3K"]])
def test_usage_errors_exit_2(pool, capsys, args):
    code, _, err = in_process(capsys, *args, pool=pool)
    assert code == 2 and err and "Traceback" not in err


def test_usage_error_exits_2_from_the_shell(pool):
    result = cli("frobnicate", pool=pool)
    assert result.returncode == 2 and b"usage:" in result.stderr


def test_help_exits_0():
    result = cli("--help")
    assert result.returncode == 0 and b"import" in result.stdout


# ---------------------------------------------------------------- import / export

def test_import_export_round_trip_keeps_holes(pool, tmp_path):
    size = 64 * M
    pieces = {0: b"boot" * 1024, 5 * M + 123: os.urandom(200 * K), 40 * M: bytes(1 * M),
              size - 4 * K: b"tail" * 1024}
    src = sparse_image(tmp_path / "src.raw", size, pieces)
    ok("import", "vm1", src, pool=pool)
    vm1 = devices(pool)["vm1"]
    assert vm1["size"] == size
    # 4K at 0, 200K across 5M+123 (4 or 5 chunks), the zero MiB none, the tail one chunk
    assert 6 * CHUNK <= vm1["used"] <= 7 * CHUNK
    out = tmp_path / "out.raw"
    ok("export", "vm1", out, pool=pool)
    assert out.stat().st_size == size
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_blocks * 512 <= 8 * CHUNK  # holes stayed holes
    for start, end in data_ranges(out):
        assert any(start < off + len(d) and off < end for off, d in pieces.items() if any(d))


def test_export_snapshot_and_to_stdout(pool, tmp_path):
    src = sparse_image(tmp_path / "src.raw", 4 * M, {M: b"snapshot data"})
    ok("import", "vm1", src, pool=pool)
    given(pool, ("snapshot", "vm1@s"))
    write_device(pool, "vm1", b"changed later", M)
    ok("export", "vm1@s", tmp_path / "snap.raw", pool=pool)
    assert (tmp_path / "snap.raw").read_bytes() == src.read_bytes()
    piped = cli("export", "vm1@s", "-", pool=pool, check_rc=0)
    assert piped.stdout == src.read_bytes() and piped.stderr == b""


def test_export_overwrites_an_existing_file_sparsely(pool, tmp_path):
    given(pool, ("create", "vm1", M))
    out = tmp_path / "out.raw"
    out.write_bytes(b"\xff" * (2 * M))
    ok("export", "vm1", out, pool=pool)
    assert out.read_bytes() == bytes(M) and data_ranges(out) == []


def test_import_size_option(pool, tmp_path):
    src = sparse_image(tmp_path / "src.raw", M, {0: b"hello"})
    ok("import", "big", src, "--size", "8M", pool=pool)
    assert devices(pool)["big"]["size"] == 8 * M
    assert "smaller" in fails(2, "import", "small", src, "--size", "512K", pool=pool)
    assert "small" not in devices(pool)


def test_import_of_a_qcow2_file_warns_that_it_takes_raw_bytes(pool, tmp_path):
    if not shutil.which("qemu-img"):
        pytest.skip("qemu-img is not installed")
    image = tmp_path / "t.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "100M"], check=True)
    result = cli("import", "q", image, pool=pool, check_rc=0)
    err = result.stderr.decode()
    assert "looks like a qcow2 image" in err and "qemu-img convert -O raw" in err, err
    raw = sparse_image(tmp_path / "plain.raw", M, {0: b"QFI"})     # not the whole magic
    assert ok("import", "r", raw, pool=pool) == ""


def test_import_errors_leave_no_volume(pool, tmp_path):
    assert "missing.raw" in fails(1, "import", "vm1", tmp_path / "missing.raw", pool=pool)
    given(pool, ("create", "vm1", M))
    src = sparse_image(tmp_path / "src.raw", M, {0: b"x"})
    assert "vm1" in fails(4, "import", "vm1", src, pool=pool)
    assert set(devices(pool)) == {"vm1"}


def test_import_into_a_full_pool_fails_cleanly(tmp_path):
    path = tmp_path / "small"
    Pool.create(str(path), capacity=8 * CHUNK, chunk_size=CHUNK).close()
    src = sparse_image(tmp_path / "src.raw", 16 * CHUNK, {0: os.urandom(16 * CHUNK)})
    err = fails(8, "import", "vm1", src, pool=path)
    assert "vm1" in err and "full" in err
    assert devices(path) == {}  # the half-made volume is gone: the import can be retried


def test_export_to_an_unwritable_path_names_it(pool, tmp_path):
    given(pool, ("create", "vm1", M))
    assert "no-such-dir/out.raw" in fails(1, "export", "vm1", tmp_path / "no-such-dir" / "out.raw",
                                          pool=pool)


def test_progress_only_on_a_terminal(pool, tmp_path):
    src = sparse_image(tmp_path / "src.raw", 8 * M, {0: b"x" * M})
    assert cli("import", "piped", src, pool=pool, check_rc=0).stderr == b""
    master, slave = pty.openpty()
    try:
        cli("import", "tty", src, pool=pool, stderr=slave, check_rc=0)
        os.close(slave)
        shown = _read_all(master)
    finally:
        os.close(master)
    assert b"import tty" in shown and b"ETA" in shown and b"8M/8M" in shown


def _read_all(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO once the slave side is closed
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)
