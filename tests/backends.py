"""Where the semantic tests put their pools: a directory, or a rados:// URI on a test cluster.

The cluster is the one CI starts (.ci/services/ceph.sh exports THINSTORE_TEST_CEPH_CONF and
THINSTORE_TEST_CEPH_POOL); without it, one is started here for the session with
tools/ceph_cluster.py when ceph-mon, ceph-osd and librados' Python module are installed,
and stopped at the end. Otherwise a rados case skips and says what is missing.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = ("dir", "rados")
_target: tuple | None = None        # (conf, cephpool) once known
_skip: str | None = None


def _free_port_block() -> int:
    """A monitor port with its 99 OSD ports above it, none of them in use now."""
    for base in range(17200, 30000, 100):
        try:
            for port in (base, base + 1, base + 2, base + 3):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block for a test Ceph cluster")


def _start_own() -> tuple[str, str]:
    d = tempfile.mkdtemp(prefix="tsceph")
    port = _free_port_block()
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ceph_cluster.py"),
                          "start", d, "--port", str(port), "--size", "3G"],
                         capture_output=True, text=True, timeout=120)

    def stop():
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "ceph_cluster.py"),
                        "stop", d], capture_output=True, timeout=120)
        shutil.rmtree(d, ignore_errors=True)
    atexit.register(stop)
    if res.returncode:
        raise RuntimeError(f"tools/ceph_cluster.py start failed: {res.stderr.strip()}")
    env = dict(line.split("=", 1) for line in res.stdout.split())
    return env["THINSTORE_TEST_CEPH_CONF"], env["THINSTORE_TEST_CEPH_POOL"]


def ceph_target() -> tuple[str, str]:
    """(ceph.conf, RADOS pool) of the test cluster; pytest.skip with the reason if none."""
    global _target, _skip
    if _target is None and _skip is None:
        conf = os.environ.get("THINSTORE_TEST_CEPH_CONF")
        if conf:
            _target = (conf, os.environ.get("THINSTORE_TEST_CEPH_POOL", "thinstore"))
        else:
            _target, _skip = _find_or_start()
    if _skip:
        pytest.skip(_skip)
    return _target


def _find_or_start():
    from thinstore.errors import StorageUnavailable
    from thinstore.rados_store import load_rados
    try:
        load_rados()
    except StorageUnavailable as e:
        return None, f"no Ceph for rados:// pools: {e}"
    missing = [t for t in ("ceph-mon", "ceph-osd", "ceph", "monmaptool") if not shutil.which(t)]
    if missing:
        return None, (f"no test Ceph cluster: THINSTORE_TEST_CEPH_CONF is unset and "
                      f"{', '.join(missing)} not installed (Debian: ceph-mon ceph-osd ceph-common)")
    try:
        return _start_own(), None
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return None, f"could not start a test Ceph cluster: {e}"


def location(backend: str, directory: str, name: str = "pool") -> str:
    """A fresh pool location: DIRECTORY/NAME, or rados://POOL/NAME-UNIQUE?conf=CONF."""
    if backend == "dir":
        return os.path.join(str(directory), name)
    conf, cephpool = ceph_target()
    return f"rados://{cephpool}/{name}-{uuid.uuid4().hex[:10]}?conf={conf}"


def remove(loc: str) -> None:
    """Remove every object of a rados:// pool (tests leave the cluster as they found it)."""
    if not loc.startswith("rados://"):
        return
    from thinstore.rados_store import RadosStore
    store = RadosStore(loc)
    try:
        for name in store.object_names():
            try:
                store.ioctx.remove_object(name)
            except store._rados.ObjectNotFound:
                pass
    finally:
        store.close()
