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
