"""A pool on a multi-user host (issue 10, items 1-3): sockets never take over what is not
theirs, a pool directory is its owner's alone whatever the umask, each side of the control
socket checks the other's credentials, and a network listener without TLS is called out."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import textwrap

import pytest

from hardening_helpers import Serve, fails, other_user, out, short_dir, ts


@pytest.fixture
def pool():
    d = short_dir()
    path = os.path.join(d, "pool")
    out("init", "--capacity", "64M", pool=path)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def test_serve_never_removes_a_file_or_directory_at_its_socket_path(pool):
    precious = os.path.join(os.path.dirname(pool), "precious")
    with open(precious, "w") as f:
        f.write("keep me\n")
    err = fails(1, "serve", "--socket", precious, pool=pool)
    assert "not a socket" in err and precious in err
    assert open(precious).read() == "keep me\n"
    os.mkdir(os.path.join(pool, "control.sock"))      # the control socket's path too
    err = fails(1, "serve", pool=pool)
    assert "control.sock" in err and "directory" in err
    assert os.path.isdir(os.path.join(pool, "control.sock"))
    assert not os.path.exists(os.path.join(pool, "nbd.sock"))   # the failed start cleaned up


def test_serve_refuses_another_servers_live_socket_and_replaces_a_stale_one(pool):
    other = os.path.join(os.path.dirname(pool), "other")
    out("init", "--capacity", "64M", pool=other)
    out("create", "v", "--size", "1M", pool=pool)
    with Serve(pool):
        live = os.path.join(pool, "nbd.sock")
        err = fails(1, "serve", "--socket", live, pool=other)
        assert "another server is listening" in err and live in err
        assert "v" in out("list", pool=pool)            # the first server kept its sockets
        assert stat.S_ISSOCK(os.lstat(live).st_mode)
    stale = socket.socket(socket.AF_UNIX)               # a server that died left this
    stale.bind(os.path.join(pool, "nbd.sock"))
    stale.close()
    with Serve(pool):
        assert "v" in out("list", pool=pool)


def test_under_umask_000_every_file_directory_and_socket_is_private(pool):
    d = short_dir()
    made = os.path.join(d, "pool")
    try:
        out("init", "--capacity", "64M", pool=made, umask=0)
        out("create", "v", "--size", "1M", pool=made, umask=0)
        out("snapshot", "v@a", pool=made, umask=0)
        stream = out("send", "v@a", "-o", os.path.join(d, "s"), pool=made, umask=0)
        out("receive", "w", "-i", os.path.join(d, "s"), pool=made, umask=0)   # resume/ dir
        assert stream == ""
        with Serve(made, umask=0):
            modes = {}
            for root, dirs, files in os.walk(made):
                for name in dirs + files:
                    path = os.path.join(root, name)
                    modes[os.path.relpath(path, made)] = stat.S_IMODE(os.lstat(path).st_mode)
        modes["."] = stat.S_IMODE(os.stat(made).st_mode)
        assert {"data", "meta", "lock", "resume", "nbd.sock", "control.sock"} <= set(modes)
        loose = {name: oct(mode) for name, mode in modes.items() if mode & 0o077}
        assert not loose, loose
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_a_pool_directory_others_can_write_to_is_refused_with_the_fix(pool):
    os.chmod(pool, 0o777)
    err = fails(1, "list", pool=pool)
    assert "writable by" in err and f"chmod 700 {pool}" in err
    err = fails(1, "check", pool=pool)                  # every opener, not just Pool.open
    assert "writable by" in err
    os.chmod(pool, 0o700)
    out("list", pool=pool)


FAKE_SERVER = textwrap.dedent("""
    import json, socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.bind(sys.argv[1]); s.listen(4)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        for line in c.makefile("rb"):
            op = json.loads(line)["op"]
            result = {"pid": 1, "nbd_socket": None} if op == "ping" else \\
                {"capacity": 1 << 50, "used": 0, "free": 1 << 50, "chunk_size": 65536}
            c.sendall(json.dumps({"ok": True, "result": result}).encode() + b"\\n")
""")


def test_the_cli_refuses_a_control_socket_another_user_planted(pool):
    """A pool directory left world-writable by an older version: another user plants a
    control.sock that claims 1P of capacity and acknowledges anything."""
    user = other_user()
    os.chmod(os.path.dirname(pool), 0o755)
    os.chmod(pool, 0o777)
    fake = subprocess.Popen(["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}",
                             "--clear-groups", sys.executable, "-c", FAKE_SERVER,
                             os.path.join(pool, "control.sock")], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert fake.stdout.readline() == "ready\n"
        for args in (("status",), ("destroy", "v")):
            err = fails(1, *args, pool=pool)
            assert f"uid {user.pw_uid}" in err and "not trusting" in err
    finally:
        fake.kill()
        fake.wait()
        fake.stdout.close()


HOSTILE_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(b'{"op": "destroy", "args": {"name": "v", "force": true}}\\n')
    print(s.makefile("rb").readline().decode(), end="")
""")


def test_the_server_answers_no_other_user_even_through_a_loosened_socket(pool):
    user = other_user()
    out("create", "v", "--size", "1M", pool=pool)
    os.chmod(os.path.dirname(pool), 0o755)
    server = Serve(pool)
    try:
        os.chmod(pool, 0o755)                           # a mistake: others can now reach
        os.chmod(os.path.join(pool, "control.sock"), 0o666)   # ... and connect
        # what a hostile user sends (stdlib only: their python may not reach our packages)
        answer = subprocess.run(
            ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups",
             sys.executable, "-S", "-c", HOSTILE_CLIENT, os.path.join(pool, "control.sock")],
            capture_output=True, text=True, timeout=30)
        assert answer.returncode == 0, answer.stderr
        reply = json.loads(answer.stdout)
        assert reply["ok"] is False and reply["error"]["type"] == "UntrustedPeer"
        assert "answers only root and the owner" in reply["error"]["message"]
        os.chmod(pool, 0o700)
        assert "v" in out("list", pool=pool)            # nothing happened; still serving
    finally:
        log = server.stop()
    assert f"refused a client running as uid {user.pw_uid}" in log


NBD_PEEK = textwrap.dedent("""
    import socket, sys
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    print(len(s.recv(16)))          # the server's greeting (NBDMAGIC...) or 0 at EOF
""")


def test_the_nbd_socket_serves_no_other_user_even_when_loosened(pool):
    """SO_PEERCRED on accept: with the socket's 0600 mode undone, another user's
    connection is closed unanswered (one log line) while the owner's clients go on."""
    from thinstore.nbd.client import NBDDevice
    user = other_user()
    out("create", "v", "--size", "1M", pool=pool)
    os.chmod(os.path.dirname(pool), 0o755)
    server = Serve(pool)
    nbd_sock = os.path.join(pool, "nbd.sock")
    try:
        with NBDDevice(nbd_sock, "v") as dev:          # a trusted client, connected first
            dev.pwrite(b"kept", 0)
            os.chmod(pool, 0o755)                          # the mistakes: others can reach
            os.chmod(nbd_sock, 0o666)                      # ... and connect
            peek = [*_prefix_of(user), sys.executable, "-S", "-c", NBD_PEEK, nbd_sock]
            answer = subprocess.run(peek, capture_output=True, text=True, timeout=30)
            assert answer.returncode == 0, answer.stderr
            assert answer.stdout.strip() == "0"            # closed: not even the greeting
            assert dev.pread(0, 4) == b"kept"              # the trusted client still served
        mine = subprocess.run([sys.executable, "-S", "-c", NBD_PEEK, nbd_sock],
                              capture_output=True, text=True, timeout=30)
        assert mine.stdout.strip() == "16"                 # the owner still gets greeted
        os.chmod(pool, 0o700)
    finally:
        log = server.stop()
    assert log.count("NBD socket: refused a client running as") == 1, log
    assert f"uid {user.pw_uid}" in log


def _prefix_of(user) -> list[str]:
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]


def test_listening_on_every_address_without_tls_warns(pool):
    server = Serve(pool, "--listen", "0.0.0.0:0")
    err = server.stop()
    assert "0.0.0.0" in err and "without TLS" in err and "--tls-cert" in err
    server = Serve(pool, "--listen", "127.0.0.1:0")
    assert "without TLS" not in server.stop()


def test_status_json_of_a_trusted_server_still_works(pool):
    with Serve(pool):
        assert json.loads(out("status", "--json", pool=pool))["capacity"] == 64 << 20


def test_optional_tls_on_an_open_address_warns_too(caplog):
    from thinstore.cli.serve import warn_if_exposed
    warn_if_exposed([("::", 10809)], tls=True, required=False)
    warn_if_exposed([("10.1.2.3", 10809)], tls=True, required=True)
    warn_if_exposed([("::1", 10809)], tls=False)
    assert [r.getMessage()[:61] for r in caplog.records] == [
        "warning: listening on [::]:10809 with TLS optional (--tls on)"]
