"""The Docker plugin's HTTP side in-process (no dockerd, no root): what it logs.

A real pool, attacher, registry and driver behind :class:`PluginServer` on a unix socket;
the client is a raw socket speaking HTTP/1.1 with keep-alive, as dockerd does.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import tempfile

import pytest

from thinstore import Pool
from thinstore.frontends.attach import Attacher
from thinstore.frontends.docker.driver import VolumeDriver
from thinstore.frontends.docker.registry import Registry
from thinstore.frontends.docker.server import PluginServer

ACTIVATE = (b"POST /Plugin.Activate HTTP/1.1\r\nHost: plugin\r\n"
            b"Accept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: 2\r\n\r\n{}")


@pytest.fixture
def server():
    where = tempfile.mkdtemp(prefix="tsdks", dir="/tmp")
    pool = Pool.create(os.path.join(where, "pool"), 64 << 20, 64 << 10, commit_interval=0)
    attacher = Attacher(os.path.join(where, "attach.json"), os.path.join(where, "nbd.sock"))
    driver = VolumeDriver(pool, attacher, Registry(os.path.join(where, "volumes.json")),
                          os.path.join(where, "mnt"), 16 << 20)
    srv = PluginServer(os.path.join(where, "p.sock"), driver, idle_timeout=0.3)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        attacher.close()
        pool.close()
        shutil.rmtree(where, ignore_errors=True)


def test_an_idle_keep_alive_connection_closing_is_not_logged_as_an_error(server, caplog):
    caplog.set_level(logging.DEBUG, logger="thinstore.docker")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(server.path)
        sock.sendall(ACTIVATE)
        reply = b""
        while b"VolumeDriver" not in reply:
            reply += sock.recv(65536)
        assert reply.startswith(b"HTTP/1.1 200")
        while sock.recv(65536):             # dockerd keeps it open; the server ends it
            pass
    records = [r for r in caplog.records if r.name == "thinstore.docker"]
    timed_out = [r for r in records if "timed out" in r.getMessage()]
    assert all(r.levelno <= logging.DEBUG for r in timed_out), \
        [(r.levelname, r.getMessage()) for r in timed_out]
    request = [r.getMessage() for r in records if "/Plugin.Activate" in r.getMessage()]
    assert request and not any(re.match(r"\d{9,}\.\d", m) for m in request), \
        "a raw epoch time in the log line: " + repr(request)


def test_another_frontends_devices_are_not_docker_volumes(tmp_path):
    """A pool served with the CSI plugin or the containerd snapshotter beside the Docker
    plugin: List showed their devices as Docker volumes and Remove destroyed them
    (`docker volume rm csi.pv-x` destroyed a Kubernetes volume, leaving the CSI plugin
    a record of a volume that was gone). Now List shows only the rest, and Get, Remove
    and Create refuse those names, naming their owner; the devices stay."""
    from thinstore.frontends.docker.options import DriverError
    pool = Pool.create(str(tmp_path / "pool"), 64 << 20, 64 << 10, commit_interval=0)
    attacher = Attacher(str(tmp_path / "attach.json"), str(tmp_path / "nbd.sock"))
    driver = VolumeDriver(pool, attacher, Registry(str(tmp_path / "volumes.json")),
                          str(tmp_path / "mnt"), 16 << 20)
    try:
        for name in ("csi.pv-x", "ctd-3", "mine", "ctd-mine"):
            pool.create_volume(name, 8 << 20)
        pool.snapshot("csi.pv-x@csi.snap-1")
        listed = {v["Name"] for v in driver.list({})["Volumes"]}
        assert listed == {"mine", "ctd-mine"}
        for call, name, owner in ((driver.remove, "csi.pv-x", "CSI plugin"),
                                  (driver.remove, "ctd-3", "containerd snapshotter"),
                                  (driver.get, "csi.pv-x", "CSI plugin"),
                                  (driver.create, "csi.pv-y", "CSI plugin")):
            with pytest.raises(DriverError, match=owner):
                call({"Name": name})
        assert {"csi.pv-x", "ctd-3", "csi.pv-x@csi.snap-1"} <= {d.name for d in pool.list()}
        assert "csi.pv-y" not in {d.name for d in pool.list()}
        driver.remove({"Name": "mine"})                   # a volume of the user's: as before
        assert "mine" not in {d.name for d in pool.list()}
    finally:
        attacher.close()
        pool.close()
