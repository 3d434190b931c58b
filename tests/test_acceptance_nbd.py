"""Acceptance: a served pool used the way an operator does, with the real tools.

``thinstore serve`` runs as a process; the pool is managed with the CLI through the control
socket while qemu-img, nbdcopy and libnbd (system python3) move the data.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nbd_helpers import (ROOT, SYSTEM_PYTHON, RawClient, ServeProcess, cli, need,
                         need_libnbd_python, new_pool_dir, run, uri)

MiB = 1 << 20


@pytest.fixture
def served():
    with new_pool_dir("64M") as pool:
        server = ServeProcess(pool)
        yield pool, os.path.join(pool, "nbd.sock")
        server.stop()


def test_qcow2_in_snapshot_clone_copy_and_back_out(served, tmp_path):
    need("qemu-img", "qemu-io", "nbdcopy")
    pool, sock = served
    src = tmp_path / "src.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(src), "16M"])
    run(["qemu-io", "-f", "qcow2", "-c", "write -P 0xab 1M 3M", "-c", "write -P 0x11 9M 512",
         str(src)])
    cli("--pool", pool, "create", "vm", "--size", "16M")
    run(["qemu-img", "convert", "-n", "-f", "qcow2", "-O", "raw", str(src), uri(sock, "vm")])
    cli("--pool", pool, "snapshot", "vm@base")
    cli("--pool", pool, "clone", "vm@base", "work")
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(src), uri(sock, "work")])
    cli("--pool", pool, "create", "copy", "--size", "16M")
    run(["nbdcopy", "--destination-is-zero", uri(sock, "vm@base"), uri(sock, "copy")])
    used = cli("--pool", pool, "list", "-Hp", "-o", "used", "copy").stdout.strip()
    assert int(used) <= 4 * MiB + (64 << 10)  # holes stayed holes
    back = tmp_path / "back.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", uri(sock, "copy"), str(back)])
    run(["qemu-img", "compare", str(src), str(back)])
    ro = run(["qemu-io", "-f", "raw", "-c", "write 0 512", uri(sock, "vm@base")], check=False)
    assert ro.returncode != 0  # a snapshot export is read-only


ENOSPC_SCRIPT = r"""
import nbd, os, subprocess, sys
sock, pool, python, root = sys.argv[1:5]
h = nbd.NBD()
h.connect_uri(f"nbd+unix:///big?socket={sock}")
errors = []
for i in range(80):                       # 80 MiB into a 64 MiB pool
    try:
        h.pwrite(os.urandom(1 << 20), i << 20)
    except nbd.Error as e:
        errors.append(e.errnum)
h.flush()
print("errors", len(errors), set(errors))
other = nbd.NBD()                         # the server still serves new clients
other.connect_uri(f"nbd+unix:///big?socket={sock}")
print("read", len(other.pread(4096, 0)))
env = dict(os.environ, PYTHONPATH=root)
subprocess.run([python, "-m", "thinstore", "--pool", pool, "grow", "+32M"], check=True, env=env)
h.pwrite(os.urandom(1 << 20), 79 << 20)   # room again: the same connection writes
h.flush()
print("after grow ok")
"""


def test_a_full_pool_answers_enospc_and_recovers_when_grown(served):
    need_libnbd_python()
    pool, sock = served
    cli("--pool", pool, "create", "big", "--size", "1G")  # over-provisioned 16x
    out = subprocess.run([SYSTEM_PYTHON, "-c", ENOSPC_SCRIPT, sock, pool, sys.executable, ROOT],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    count, kinds = lines[0].split(" ", 2)[1:]
    assert int(count) >= 16 and kinds == "{28}", lines  # ENOSPC, not EIO or a dropped link
    assert lines[1] == "read 4096" and lines[2] == "after grow ok"
    assert cli("--pool", pool, "list", "-Hp", "-o", "name", "big").stdout.strip() == "big"


def test_rollback_to_a_missing_snapshot_says_missing_even_with_clients(served):
    pool, sock = served
    cli("--pool", pool, "create", "vm", "--size", "1M")
    client = RawClient(sock)
    try:
        client.greet()
        client.go("vm")
        result = cli("--pool", pool, "rollback", "vm@typo", check=False)
        assert result.returncode == 3, result.stderr
    finally:
        client.close()


def test_idle_control_connections_do_not_lock_the_cli_out(served):
    import socket
    pool, _ = served
    idle = []
    try:
        for _ in range(20):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(os.path.join(pool, "control.sock"))
            idle.append(s)
        result = cli("--pool", pool, "list", check=False)
        assert result.returncode == 0, result.stderr
    finally:
        for s in idle:
            s.close()
