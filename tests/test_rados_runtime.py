"""Where a rados:// pool's sockets live on this host (docs/format.md, "A pool on RADOS"):
the directory names the cluster, so a command reaches the server of the pool it names and
no other. No cluster is needed: the directory is found without contacting one."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from thinstore.control.wire import socket_path
from thinstore.storage import runtime_dir

FSID_A = "7139cd2a-054b-4e8c-a17a-ccdd0aab6424"
FSID_B = "0e6fe4c8-8bd4-4c8e-9d4f-2f3b1a7f0001"


@pytest.fixture
def confs(tmp_path, monkeypatch):
    monkeypatch.setenv("THINSTORE_RUNTIME_DIR", str(tmp_path / "run"))
    monkeypatch.delenv("CEPH_CONF", raising=False)

    def conf(name: str, body: str) -> str:
        path = tmp_path / name
        path.write_text(body)
        return str(path)
    return conf


def test_two_clusters_holding_the_same_pool_name_get_their_own_sockets(confs):
    a = confs("a.conf", f"[global]\nfsid = {FSID_A}\nmon host = 10.0.0.1\n")
    b = confs("b.conf", f"[global]\n  fsid={FSID_B}   # cluster b\n")
    assert socket_path(f"rados://rbd/vm?conf={a}") != socket_path(f"rados://rbd/vm?conf={b}")


def test_one_cluster_reached_through_any_copy_of_its_conf_or_by_default_shares_them(
        confs, monkeypatch):
    a = confs("a.conf", f"[global]\nfsid = {FSID_A}\n")
    copy = confs("copy.conf", f"; a copy\n[global]\nFSID = {FSID_A.upper()}\nlog_file = x\n")
    dirs = {runtime_dir(f"rados://rbd/vm?conf={a}"),
            runtime_dir(f"rados://rbd/vm?conf={copy}&id=other")}
    monkeypatch.setenv("CEPH_CONF", a)               # librados' default conf
    dirs.add(runtime_dir("rados://rbd/vm"))
    assert len(dirs) == 1


def test_a_conf_without_an_fsid_is_known_by_its_path(confs):
    a = confs("a.conf", "[global]\nmon host = 10.0.0.1\n")
    b = confs("b.conf", "[global]\nmon host = 10.0.0.2\n")
    assert runtime_dir(f"rados://rbd/vm?conf={a}") != runtime_dir(f"rados://rbd/vm?conf={b}")


def test_dashes_in_pool_and_name_do_not_make_two_pools_one(confs):
    a = confs("a.conf", f"[global]\nfsid = {FSID_A}\n")
    assert (runtime_dir(f"rados://a-b/c?conf={a}") != runtime_dir(f"rados://a/b-c?conf={a}"))


def test_the_sockets_of_a_long_pool_name_fit_a_unix_socket_path(confs, monkeypatch):
    a = confs("a.conf", f"[global]\nfsid = {FSID_A}\n")
    base = tempfile.mkdtemp(prefix="tsrun", dir="/tmp")      # a short runtime directory
    monkeypatch.setenv("THINSTORE_RUNTIME_DIR", base)
    path = socket_path(f"rados://{'p' * 40}/{'n' * 64}?conf={a}")
    assert len(path.encode()) <= 107
    assert os.path.isdir(os.path.dirname(path))
    shutil.rmtree(base)
