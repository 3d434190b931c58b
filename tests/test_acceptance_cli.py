"""Acceptance: the CLI used the way an operator scripts it, found broken in QA.

Every case runs the real ``python -m thinstore`` in a subprocess on a real pool, and asserts
what a script notices: the exit code, one ``thinstore:`` line on stderr, never exit 70
(the code for "a bug in thinstore").
"""

from __future__ import annotations

import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile

import pytest

from nbd_helpers import ROOT, ServeProcess, new_pool_dir

BUG_EXIT = 70


def ts(*args: str, stdin=None, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run the CLI from this tree; never raise on a failing exit code."""
    env = {k: v for k, v in os.environ.items() if k not in ("THINSTORE_POOL", "THINSTORE_DEBUG")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run([sys.executable, "-m", "thinstore", *args], input=stdin,
                          capture_output=True, timeout=timeout, env=env)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    err = result.stderr.decode()
    assert err.startswith("thinstore: ") and err.count("\n") == 1, err
    return err


@pytest.fixture
def pool():
    with new_pool_dir("256M") as path:
        yield path


@pytest.fixture
def served_pool(pool):
    assert ts("--pool", pool, "create", "vm", "--size", "4M").returncode == 0
    assert ts("--pool", pool, "snapshot", "vm@a").returncode == 0
    server = ServeProcess(pool)
    yield pool
    server.stop()


@pytest.mark.parametrize("command", [["send", "vm@a"], ["diff", "vm@a"], ["receive", "copy"]])
def test_replication_commands_on_a_served_pool_answer_as_offline(served_pool, command):
    """send/diff/receive used to die with AttributeError on a served pool (exit 70), then
    said 'stop the server first' (exit 5); now the server runs them (thinstore/online.py)
    and they answer as offline: a stream, the ranges, and for an empty stdin a stream
    error (exit 12)."""
    result = ts("--pool", served_pool, *command, stdin=b"")
    assert result.returncode == (12 if command[0] == "receive" else 0), result.stderr
    if command[0] == "receive":
        assert "stream" in one_error_line(result)
    else:
        assert result.stdout and not result.stderr


def test_a_failed_send_to_a_file_on_a_served_pool_leaves_no_file(served_pool, tmp_path):
    out = tmp_path / "s.stream"
    assert ts("--pool", served_pool, "send", "vm@nope", "-o", str(out)).returncode == 3
    assert not out.exists()
    assert ts("--pool", served_pool, "send", "vm@a", "-o", str(out)).returncode == 0
    assert out.read_bytes().startswith(b"THINSTRM")


def test_an_exabyte_volume_is_refused_as_usage_not_a_crash(pool):
    env = {k: v for k, v in os.environ.items() if k not in ("THINSTORE_POOL", "THINSTORE_DEBUG")}
    env["PYTHONPATH"] = ROOT
    result = subprocess.run(  # an address-space cap keeps an overcommitting host from paging
        [sys.executable, "-m", "thinstore", "--pool", pool, "create", "huge", "--size", "1E"],
        capture_output=True, timeout=60, env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)))
    assert result.returncode != BUG_EXIT, result.stderr
    assert result.returncode == 2
    one_error_line(result)


def test_serve_prints_uris_that_work_from_another_directory(pool, tmp_path):
    """``tools/demo.sh`` serves ``--pool demo-pool``; the URI it printed named the socket
    relative to the server's cwd, so nbdinfo in another terminal could not connect."""
    if not shutil.which("nbdinfo"):
        pytest.skip("nbdinfo is not installed")
    assert ts("--pool", pool, "create", "vm", "--size", "1M").returncode == 0
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", "pool", "serve"],
                            cwd=os.path.dirname(pool), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        lines = [proc.stdout.readline().strip() for _ in range(2)]
        uri = lines[0].replace("NAME", "vm")
        assert uri.startswith("nbd+unix:///vm?socket=/"), lines
        assert lines[1].startswith("control socket: /"), lines
        size = subprocess.run(["nbdinfo", "--size", uri], cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=30)
        assert size.returncode == 0 and size.stdout.strip() == str(1 << 20), size.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()


def test_list_selects_devices_kinds_and_columns_like_zfs_list(pool):
    """Scripts ask ``zfs list -Hp -o used vm1`` and ``-t snapshot -o name``; list took
    no NAME, -t or -o, so every script had to parse the whole table."""
    for args in (["create", "vm", "--size", "1M"], ["snapshot", "vm@a"], ["clone", "vm@a", "c"]):
        assert ts("--pool", pool, *args).returncode == 0
    one = ts("--pool", pool, "list", "-Hp", "-o", "name,size", "vm")
    assert one.returncode == 0 and one.stdout.decode() == f"vm\t{1 << 20}\n", one.stderr
    snaps = ts("--pool", pool, "list", "-H", "-o", "name", "-t", "snapshot")
    assert snaps.stdout.decode() == "vm@a\n"
    kinds = ts("--pool", pool, "list", "-H", "-o", "kind,name", "-t", "volume,clone")
    assert kinds.stdout.decode() == "clone\tc\nvolume\tvm\n"
    missing = ts("--pool", pool, "list", "vm", "nope")
    assert missing.returncode == 3 and missing.stdout == b"" and "nope" in one_error_line(missing)
    assert ts("--pool", pool, "list", "-o", "colour").returncode == 2
    assert ts("--pool", pool, "list", "-t", "pool").returncode == 2


def test_import_of_a_preallocated_image_maps_only_chunks_with_data(pool, tmp_path):
    """A fully allocated raw image (dd from /dev/zero, or a block device: SEEK_DATA sees
    no holes) with two small writes imported as 8 MiB: every 4 MiB block holding any
    byte was written whole. Only the two 64 KiB chunks with data should be mapped."""
    image = tmp_path / "prealloc.raw"
    with open(image, "wb") as f:
        f.write(bytes(16 << 20))
        f.seek(5)
        f.write(b"hello")
        f.seek((9 << 20) + 3)
        f.write(b"x")
    assert ts("--pool", pool, "import", "vm", str(image)).returncode == 0
    listed = ts("--pool", pool, "list", "-Hp", "-o", "used", "vm")
    assert listed.stdout.decode().strip() == str(2 * 64 << 10), listed
    out = tmp_path / "out.raw"
    assert ts("--pool", pool, "export", "vm", str(out)).returncode == 0
    assert out.read_bytes() == image.read_bytes()
    assert os.stat(out).st_blocks * 512 <= 2 * 64 << 10


def test_export_to_stdout_pipes_into_import_from_stdin(pool, tmp_path):
    """``export vm -`` writes stdout, but ``import vm -`` said '-: No such file or
    directory': a raw pipe between two pools (or over ssh) was impossible."""
    data = os.urandom(100_001)
    image = tmp_path / "in.raw"
    image.write_bytes(data)
    assert ts("--pool", pool, "import", "src", str(image)).returncode == 0
    raw = ts("--pool", pool, "export", "src", "-").stdout
    assert raw == data
    no_size = ts("--pool", pool, "import", "dst", "-", stdin=raw)
    assert no_size.returncode == 2 and "--size" in one_error_line(no_size)
    assert ts("--pool", pool, "import", "dst", "-", "--size", "1M", stdin=raw).returncode == 0
    back = ts("--pool", pool, "export", "dst", "-").stdout
    assert back == data + bytes((1 << 20) - len(data))
    short = ts("--pool", pool, "import", "cut", "-", "--size", "64K", stdin=raw)
    assert short.returncode == 2 and "longer" in one_error_line(short)
    assert ts("--pool", pool, "list", "cut").returncode == 3  # the half-made volume is gone


def test_serve_names_the_socket_or_address_it_cannot_bind(pool):
    """'thinstore: Address already in use' / 'No such file or directory' did not say
    which of the sockets failed."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = ts("--pool", pool, "serve", "--listen", str(port))
    assert busy.returncode == 1 and f"127.0.0.1:{port}" in one_error_line(busy)
    nodir = ts("--pool", pool, "serve", "--socket", "/nonexistent-dir/nbd.sock")
    assert nodir.returncode == 1 and "/nonexistent-dir/nbd.sock" in one_error_line(nodir)


def test_a_pool_in_a_deep_directory_can_be_served_with_a_short_socket(tmp_path):
    deep = tmp_path / ("d" * 100) / "pool"
    deep.parent.mkdir()
    assert ts("--pool", str(deep), "init", "--capacity", "64M").returncode == 0
    sock = os.path.join(tempfile.mkdtemp(prefix="tsqa", dir="/tmp"), "nbd.sock")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", str(deep), "serve",
                             "--socket", sock], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        first = proc.stdout.readline()
        assert first.startswith("nbd+unix://"), proc.stderr.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
        shutil.rmtree(os.path.dirname(sock), ignore_errors=True)


def test_export_that_the_file_system_refuses_names_the_output_file(pool, tmp_path):
    """Exporting a 16T volume to ext4 said only 'thinstore: File too large' (ftruncate's
    EFBIG): nothing told the user it was the output file, not the pool."""
    assert ts("--pool", pool, "create", "vm", "--size", "8M").returncode == 0
    out = tmp_path / "out.raw"
    env = {k: v for k, v in os.environ.items() if k not in ("THINSTORE_POOL", "THINSTORE_DEBUG")}
    env["PYTHONPATH"] = ROOT
    limited = subprocess.run(  # a file-size limit makes ftruncate fail with EFBIG anywhere
        [sys.executable, "-m", "thinstore", "--pool", pool, "export", "vm", str(out)],
        capture_output=True, timeout=60, env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
    assert limited.returncode == 1
    assert str(out) in one_error_line(limited) and "too large" in limited.stderr.decode()


def test_a_failed_send_leaves_the_output_file_as_it_was(pool, tmp_path):
    """``send vm@typo -o week.stream`` truncated week.stream to 0 bytes before finding
    that vm@typo does not exist: yesterday's stream was lost to a typo."""
    out = tmp_path / "week.stream"
    out.write_bytes(b"yesterday's stream")
    assert ts("--pool", pool, "create", "vm", "--size", "1M").returncode == 0
    assert ts("--pool", pool, "snapshot", "vm@a").returncode == 0
    typo = ts("--pool", pool, "send", "vm@typo", "-o", str(out))
    assert typo.returncode == 3
    assert out.read_bytes() == b"yesterday's stream"
    assert ts("--pool", pool, "send", "vm@a", "-o", str(out)).returncode == 0
    assert out.read_bytes().startswith(b"THINSTRM")
    assert os.listdir(tmp_path) == ["week.stream"]  # no partial file left beside it


def test_a_failed_init_leaves_nothing_behind(tmp_path):
    """init of a capacity the file system cannot hold as one file (EFBIG; a file-size
    limit stands in for ext4's 16T) said 'File too large', naming no file, and left data
    and lock behind, so the next init failed with 'File exists'."""
    pool = tmp_path / "pool"
    env = {k: v for k, v in os.environ.items() if k not in ("THINSTORE_POOL", "THINSTORE_DEBUG")}
    env["PYTHONPATH"] = ROOT
    big = subprocess.run(
        [sys.executable, "-m", "thinstore", "--pool", str(pool), "init", "--capacity", "1G"],
        capture_output=True, timeout=60, env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)))
    assert big.returncode == 1
    assert str(pool / "data") in one_error_line(big) and "--capacity" in big.stderr.decode()
    assert "--data-device" in big.stderr.decode()     # the fix for a pool past ext4's 16T
    assert not pool.exists()
    assert ts("--pool", str(pool), "init", "--capacity", "64M").returncode == 0
    stranger = tmp_path / "other"
    stranger.mkdir()
    (stranger / "data").write_bytes(b"not ours")
    assert ts("--pool", str(stranger), "init").returncode == 1
    assert sorted(os.listdir(stranger)) == ["data"]  # no lock file left in a foreign directory
    assert (stranger / "data").read_bytes() == b"not ours"


def test_a_serve_that_fails_to_start_leaves_no_socket(pool):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert ts("--pool", pool, "serve", "--listen", str(taken.getsockname()[1])).returncode == 1
    assert not os.path.exists(os.path.join(pool, "nbd.sock"))
    tls = ts("--pool", pool, "serve", "--tls-cert", "/nonexistent.pem", "--tls-key", "/k.pem")
    assert tls.returncode == 1 and "/nonexistent.pem" in one_error_line(tls)


def _grow_past_the_file_size_limit(pool: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("THINSTORE_POOL", "THINSTORE_DEBUG")}
    env["PYTHONPATH"] = ROOT
    return subprocess.run(
        [sys.executable, "-m", "thinstore", "--pool", pool, "grow", "+1G"],
        capture_output=True, timeout=60, env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30)))


def test_grow_past_the_file_system_limit_names_the_data_file(pool):
    """grow 20T on ext4 said only 'File too large'; the pool keeps its capacity."""
    result = _grow_past_the_file_size_limit(pool)
    assert result.returncode == 1
    assert os.path.join(pool, "data") in one_error_line(result)
    status = ts("--pool", pool, "status", "-p").stdout.decode()
    assert str(256 << 20) in status


def test_grow_past_the_file_system_limit_while_served_is_not_an_internal_error(pool):
    env = dict(os.environ, PYTHONPATH=ROOT)
    server = subprocess.Popen(  # the server grows the file: limit its file size
        [sys.executable, "-m", "thinstore", "--pool", pool, "serve"], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env=env,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 30, 1 << 30)))
    try:
        while not server.stdout.readline().startswith("control socket:"):
            assert server.poll() is None
        result = ts("--pool", pool, "grow", "+1G")
        assert result.returncode == 1
        assert "internal error" not in result.stderr.decode()
        assert os.path.join(pool, "data") in one_error_line(result)
    finally:
        server.terminate()
        server.wait(timeout=30)
        server.stdout.close()


def test_a_receive_into_a_full_pool_says_grow_and_resume(tmp_path):
    """The full-pool error named the hidden '.receive.NAME' and said 'destroy a device';
    the receive is resumable, and growing then resuming loses nothing."""
    with new_pool_dir("64M") as src, new_pool_dir("8M") as dst:
        image = tmp_path / "data.raw"
        image.write_bytes(os.urandom(12 << 20))
        stream = tmp_path / "s.stream"
        for args in (["import", "vm", str(image)], ["snapshot", "vm@a"],
                     ["send", "vm@a", "-o", str(stream)]):
            assert ts("--pool", src, *args).returncode == 0
        full = ts("--pool", dst, "receive", "vm", "-i", str(stream))
        assert full.returncode == 8
        assert "receive --resume vm" in full.stderr.decode()
        assert ts("--pool", dst, "grow", "+16M").returncode == 0
        assert ts("--pool", dst, "receive", "--resume", "vm", "-i", str(stream)).returncode == 0
        assert ts("--pool", dst, "export", "vm@a", "-").stdout == image.read_bytes()


def test_version_is_printed():
    result = ts("--version")
    assert result.returncode == 0 and result.stdout.decode().startswith("thinstore 0.")


def test_restore_refuses_a_dump_of_another_pool_unless_forced(tmp_path):
    """Restoring the replica's dump over the primary succeeded silently: every volume then
    read chunks of the wrong data file (only scrub noticed, as checksum damage)."""
    with new_pool_dir("64M") as a, new_pool_dir("64M") as b:
        image = tmp_path / "a.raw"
        image.write_bytes(os.urandom(1 << 20))
        assert ts("--pool", a, "import", "vm", str(image)).returncode == 0
        dump = tmp_path / "a.json"
        assert ts("--pool", a, "dump", "--json", "-o", str(dump)).returncode == 0
        wrong = ts("--pool", b, "restore", str(dump))
        assert wrong.returncode == 2
        assert "holds pool" in one_error_line(wrong)
        assert ts("--pool", b, "list", "vm").returncode == 3  # b untouched
        assert ts("--pool", a, "restore", str(dump)).returncode == 0  # its own dump: fine
        assert ts("--pool", a, "export", "vm", "-").stdout == image.read_bytes()
        assert ts("--pool", b, "restore", "--force", str(dump)).returncode == 0


def test_dump_dash_is_stdout_and_restore_explains_the_text_form(pool, tmp_path):
    """``dump -o -`` wrote a file named '-' (export and restore take '-' as stdout/stdin),
    and restoring the text form said only 'not valid JSON'."""
    out = ts("--pool", pool, "dump", "-o", "-")
    assert out.returncode == 0 and out.stdout.startswith(b"pool ")
    assert not os.path.exists("-")
    text = tmp_path / "dump.txt"
    text.write_bytes(out.stdout)
    wrong = ts("--pool", pool, "restore", str(text))
    assert wrong.returncode == 2 and "--json" in one_error_line(wrong)


@pytest.mark.parametrize("command", ["check", "scrub", "dump"])
def test_integrity_commands_on_a_served_pool_run_in_the_server(served_pool, command):
    """They said 'needs the pool itself: stop the server'; now the server runs them."""
    result = ts("--pool", served_pool, command)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] in (b"clean", b"no damage found") or \
        result.stdout.startswith(b"pool ")


@pytest.mark.parametrize("command", ["repair", "restore"])
def test_repair_and_restore_on_a_served_pool_do_not_suggest_the_control_socket(
        served_pool, command, tmp_path):
    """They rewrite the metadata: still refused while served, saying what to do."""
    args = [command] if command == "repair" else [command, str(tmp_path / "none.json")]
    if command == "restore":
        (tmp_path / "none.json").write_text(ts("--pool", served_pool, "dump", "--json")
                                            .stdout.decode())
    result = ts("--pool", served_pool, *args)
    assert result.returncode == 5
    err = one_error_line(result)
    assert f"'{command}' needs the pool itself" in err and "in use by process" in err


def test_core_warnings_are_prefixed_like_every_stderr_line(tmp_path):
    """'pool X is 90% full ...' went to stderr bare (logging's last resort), unlike every
    other line there; a script filtering 'thinstore:' lines missed it."""
    with new_pool_dir("1M") as pool:
        image = tmp_path / "fill.raw"
        image.write_bytes(os.urandom(960 << 10))  # 15 of 16 chunks: past the 90% mark
        result = ts("--pool", pool, "import", "vm", str(image))
        assert result.returncode == 0
        lines = result.stderr.decode().splitlines()
        assert lines and all(line.startswith("thinstore: warning: ") for line in lines), lines


@pytest.mark.parametrize("option", [["--workers", "0"], ["--max-connections", "0"],
                                    ["--handshake-timeout", "-1"]])
def test_serve_refuses_counts_and_timeouts_that_are_not_positive(pool, option):
    """'--handshake-timeout -1' started a server that dropped every client."""
    result = ts("--pool", pool, "serve", *option, timeout=20)
    assert result.returncode == 2 and option[0] in result.stderr.decode()
