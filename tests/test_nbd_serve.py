"""``thinstore serve`` as a process: URIs, the CLI routed through the control socket,
TCP on loopback, multi-connection flush durability, clean and hard stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import sys

import pytest

from thinstore import Pool
from thinstore.nbd import protocol as P
from nbd_helpers import (MiB, ROOT, RawClient, ServeProcess, cli, need, new_pool_dir, run,
                         writer_and_flusher)


@pytest.fixture
def pool_dir():
    with new_pool_dir() as path:
        yield path


@pytest.fixture
def serving(pool_dir):
    s = ServeProcess(pool_dir)
    yield s
    s.stop()


def test_prints_uris_and_makes_a_private_socket(serving, pool_dir):
    sock = os.path.join(pool_dir, "nbd.sock")
    assert f"nbd+unix:///NAME?socket={sock}" in serving.lines
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(pool_dir, "control.sock")).st_mode) == 0o600


def test_cli_manages_the_pool_while_the_server_holds_it(serving, pool_dir):
    p = ["--pool", pool_dir]
    cli(*p, "create", "vm", "--size", "16M")
    cli(*p, "snapshot", "vm@a")
    cli(*p, "clone", "vm@a", "vm-test")
    cli(*p, "rename", "vm-test", "vm-try")
    cli(*p, "resize", "vm", "32M")
    cli(*p, "rollback", "vm@a")
    listed = json.loads(cli(*p, "list", "--json").stdout)
    names = {d["name"] for d in (listed if isinstance(listed, list) else listed["devices"])}
    assert names == {"vm", "vm@a", "vm-try"}
    assert "vm" in cli(*p, "status").stdout + cli(*p, "list").stdout
    cli(*p, "destroy", "vm-try")
    before = json.loads(cli(*p, "status", "--json").stdout)["capacity"]
    cli(*p, "grow", "+256M")
    assert json.loads(cli(*p, "status", "--json").stdout)["capacity"] == before + (256 << 20)
    missing = cli(*p, "destroy", "nothing", check=False)
    assert missing.returncode == 3 and "nothing" in missing.stderr
    taken = cli(*p, "create", "vm", "--size", "1M", check=False)
    assert taken.returncode == 4


def test_destroy_in_use_is_refused_with_a_clear_error_unless_forced(serving, pool_dir):
    cli("--pool", pool_dir, "create", "used", "--size", "8M")
    c = RawClient(os.path.join(pool_dir, "nbd.sock"))
    c.greet()
    c.go("used")
    refused = cli("--pool", pool_dir, "destroy", "used", check=False)
    assert refused.returncode == 5
    assert "open NBD connection" in refused.stderr and "--force" in refused.stderr
    cli("--pool", pool_dir, "destroy", "--force", "used")
    assert c.closed_by_server()
    c.close()


def test_import_and_export_through_the_server(serving, pool_dir, tmp_path):
    image = tmp_path / "in.img"
    data = os.urandom(MiB)
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(3 * MiB)
        f.write(data)
    cli("--pool", pool_dir, "import", "imp", str(image))
    out = tmp_path / "out.img"
    cli("--pool", pool_dir, "export", "imp", str(out))
    assert out.read_bytes() == image.read_bytes()
    info = json.loads(cli("--pool", pool_dir, "list", "--json").stdout)
    assert "imp" in json.dumps(info)


def test_tcp_listen_with_a_bare_port_binds_loopback(pool_dir):
    need("nbdinfo")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    s = ServeProcess(pool_dir, "--listen", str(port))
    try:
        assert f"nbd://127.0.0.1:{port}/NAME" in s.lines
        cli("--pool", pool_dir, "create", "net", "--size", "4M")
        out = json.loads(run(["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/net"]).stdout)
        assert out["exports"][0]["export-size"] == 4 * MiB
    finally:
        assert s.stop() == 0


def test_a_socket_path_too_long_for_clients_is_warned_about(pool_dir, tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    path = str(deep / "nbd.sock")
    s = ServeProcess(pool_dir, "--socket", path)
    s.proc.send_signal(signal.SIGTERM)
    _, err = s.proc.communicate(timeout=30)
    assert s.proc.returncode == 0, err
    assert f"nbd+unix:///NAME?socket={path}" in s.lines
    assert f"the socket path is {len(path)} bytes" in err and "shorter path" in err, err


def test_flush_on_one_connection_makes_writes_on_another_durable(pool_dir):
    """CAN_MULTI_CONN's promise, checked by killing the server with SIGKILL."""
    s = ServeProcess(pool_dir)
    try:
        cli("--pool", pool_dir, "create", "mc", "--size", "8M")
        (writer, flusher), flags = writer_and_flusher(pool_dir, "mc")
        assert all(f & P.TF_CAN_MULTI_CONN for f in flags)
        data = os.urandom(256 << 10)
        writer.request(P.Cmd.WRITE, MiB, len(data), cookie=1, data=data)
        assert writer.structured_reply()[1] == [(-1, bytes(4))]
        flusher.request(P.Cmd.FLUSH, cookie=2)
        assert flusher.structured_reply()[1] == [(-1, bytes(4))]
    finally:
        s.stop(signal.SIGKILL)
    with Pool.open(pool_dir) as pool, pool.open_device("mc") as dev:
        assert dev.pread(MiB, len(data)) == data


def test_sigterm_stops_cleanly_and_releases_the_pool(pool_dir):
    s = ServeProcess(pool_dir)
    cli("--pool", pool_dir, "create", "keep", "--size", "1M")
    assert s.stop() == 0
    assert not os.path.exists(os.path.join(pool_dir, "nbd.sock"))
    assert "keep" in cli("--pool", pool_dir, "list").stdout


def test_a_second_server_on_the_same_pool_is_refused(serving, pool_dir):
    env = dict(os.environ, PYTHONPATH=ROOT)
    second = run([sys.executable, "-m", "thinstore", "--pool", pool_dir, "serve", "--socket",
                  os.path.join(pool_dir, "other.sock")], check=False, env=env, timeout=30)
    assert second.returncode == 5, second.stderr
    assert cli("--pool", pool_dir, "status").returncode == 0, "the first server still answers"


def test_sigterm_with_clients_connected_ends_them_and_exits(pool_dir):
    s = ServeProcess(pool_dir)
    cli("--pool", pool_dir, "create", "held", "--size", "4M")
    clients = [RawClient(os.path.join(pool_dir, "nbd.sock")) for _ in range(3)]
    clients[0].greet()
    clients[0].go("held")
    data = os.urandom(65536)
    clients[0].request(P.Cmd.WRITE, 0, len(data), cookie=1, data=data)
    assert clients[0].structured_reply()[1] == [(-1, bytes(4))]
    clients[1].greet()                     # mid-handshake
    clients[2].recv(P.GREETING.size)       # greeted by the server, silent since
    assert s.stop() == 0
    for c in clients:
        assert c.closed_by_server()
        c.close()
    with Pool.open(pool_dir) as pool, pool.open_device("held") as dev:
        assert dev.pread(0, len(data)) == data, "an acknowledged write survives a clean stop"
