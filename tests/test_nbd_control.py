"""The control socket: managing a pool that a running server holds."""

from __future__ import annotations

import os
import threading

import pytest

from thinstore.control import ControlServer, RemotePool
from thinstore.device import DeviceInfo
from thinstore.errors import DeviceBusy, DeviceExists, NoSuchDevice, ProtocolError
from thinstore.nbd import protocol as P
from nbd_helpers import MiB, RawClient, served, wait_for


@pytest.fixture
def ctl():
    with served() as s:
        control = ControlServer(s.pool, s.server)
        control.listen()
        remote = RemotePool.connect(s.pool.path)
        assert remote is not None
        s.remote = remote
        yield s
        remote.close()
        control.shutdown()


def test_remote_pool_offers_the_pool_api(ctl):
    r = ctl.remote
    info = r.create_volume("vm", 8 * MiB)
    assert isinstance(info, DeviceInfo) and info.to_dict() == ctl.pool.info("vm").to_dict()
    r.snapshot("vm@a")
    r.clone("vm@a", "vm-test")
    assert {i.name for i in r.list()} == {"vm", "vm@a", "vm-test"}
    assert r.info("vm@a").read_only
    r.resize("vm", 16 * MiB)
    assert r.info("vm").size == 16 * MiB
    r.rename("vm", "vm2")
    assert {i.name for i in r.list()} == {"vm2", "vm2@a", "vm-test"}
    r.rollback("vm2@a")
    assert r.info("vm2").size == 8 * MiB
    r.destroy("vm-test")
    status = r.status()
    assert status["devices"] == 2 and status["chunk_size"] == ctl.pool.chunk_size


def test_errors_come_back_as_the_same_class(ctl):
    with pytest.raises(NoSuchDevice):
        ctl.remote.info("missing")
    ctl.remote.create_volume("dup", MiB)
    with pytest.raises(DeviceExists) as caught:
        ctl.remote.create_volume("dup", MiB)
    assert caught.value.exit_code == DeviceExists.exit_code
    with pytest.raises(ProtocolError):
        ctl.remote.request("format_disk")


def test_garbage_on_the_control_socket_gets_an_error_line(ctl):
    import socket
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.path.join(ctl.pool.path, "control.sock"))
    s.sendall(b"{not json\n")
    assert b'"ok": false' in s.recv(4096)
    s.close()
    assert ctl.remote.ping()["pid"] == os.getpid()


def test_no_server_means_no_remote_pool(tmp_path):
    assert RemotePool.connect(str(tmp_path)) is None


def _client_on(ctl, name: str) -> RawClient:
    """A raw NBD client connected to export `name`, once the server counts its session."""
    c = RawClient(ctl.sock)
    c.greet()
    c.go(name)
    wait_for(lambda: ctl.server.connections(name) == 1, what="the session")
    return c


def test_destroy_refuses_a_device_with_open_connections_unless_forced(ctl):
    ctl.remote.create_volume("busy", 8 * MiB)
    c = _client_on(ctl, "busy")
    with pytest.raises(DeviceBusy, match="1 open NBD connection"):
        ctl.remote.destroy("busy")
    assert "busy" in {i.name for i in ctl.remote.list()}
    ctl.remote.destroy("busy", force=True)
    assert c.closed_by_server(), "a forced destroy drops the device's clients"
    assert "busy" not in {i.name for i in ctl.remote.list()}
    c.close()


def test_shrink_of_a_volume_in_use_is_refused_and_grow_is_not(ctl):
    ctl.remote.create_volume("sh", 8 * MiB)
    c = _client_on(ctl, "sh")
    with pytest.raises(DeviceBusy, match="before shrinking it"):
        ctl.remote.resize("sh", 4 * MiB, shrink=True)
    assert ctl.remote.info("sh").size == 8 * MiB
    assert ctl.remote.resize("sh", 16 * MiB).size == 16 * MiB
    c.request(P.Cmd.DISC)
    c.close()
    wait_for(lambda: ctl.server.connections("sh") == 0, what="the session to end")
    assert ctl.remote.resize("sh", 4 * MiB, shrink=True).size == 4 * MiB


def test_rollback_of_a_volume_in_use_is_refused(ctl):
    ctl.remote.create_volume("rb", 8 * MiB)
    ctl.remote.snapshot("rb@a")
    c = _client_on(ctl, "rb")
    with pytest.raises(DeviceBusy, match="rolling it back"):
        ctl.remote.rollback("rb@a")
    c.request(P.Cmd.DISC)
    c.close()
    wait_for(lambda: ctl.server.connections("rb") == 0, what="the session to end")
    ctl.remote.rollback("rb@a")


def test_rename_of_a_device_in_use_or_of_a_volume_whose_snapshot_is_in_use_is_refused(ctl):
    """A mount made through the old name would outlive its unmount, and the renamed
    device could be attached a second time beside it."""
    ctl.remote.create_volume("rn", 8 * MiB)
    ctl.remote.snapshot("rn@a")
    c = _client_on(ctl, "rn")
    with pytest.raises(DeviceBusy, match="before renaming 'rn'"):
        ctl.remote.rename("rn", "rn2")
    c.request(P.Cmd.DISC)
    c.close()
    wait_for(lambda: ctl.server.connections("rn") == 0, what="the session to end")
    s = _client_on(ctl, "rn@a")         # the snapshot follows the volume: refused too
    with pytest.raises(DeviceBusy, match="'rn@a' has 1 open NBD connection"):
        ctl.remote.rename("rn", "rn2")
    assert {"rn", "rn@a"} <= {i.name for i in ctl.remote.list()}
    s.request(P.Cmd.DISC)
    s.close()
    wait_for(lambda: ctl.server.connections("rn@a") == 0, what="the session to end")
    ctl.remote.rename("rn", "rn2")
    assert {"rn2", "rn2@a"} <= {i.name for i in ctl.remote.list()}


def test_snapshots_taken_while_a_client_writes_hold_every_acknowledged_write(ctl):
    ctl.remote.create_volume("live", 16 * MiB)
    block, blocks = 64 << 10, 200
    acked = [-1]
    c = RawClient(ctl.sock)
    c.greet()
    c.go("live")

    def writer():
        for i in range(blocks):
            c.request(P.Cmd.WRITE, i * block, block, cookie=i, data=bytes([i % 251 + 1]) * block)
            assert c.structured_reply()[0] == i
            acked[0] = i

    thread = threading.Thread(target=writer)
    thread.start()
    taken = []
    for n in range(8):
        before = acked[0]
        ctl.remote.snapshot(f"live@s{n}")
        taken.append((f"live@s{n}", before))
    thread.join(60)
    c.close()
    for name, before in taken:
        with ctl.pool.open_device(name) as dev:
            for i in range(before + 1):
                assert dev.pread(i * block, 16) == bytes([i % 251 + 1]) * 16, (name, i)
