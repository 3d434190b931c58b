"""Holds: the CLI cannot pull a frontend's device out from under it (frontends/holds.py).

A real ``thinstore docker-plugin`` (no dockerd needed: its volume verbs are HTTP on a unix
socket, and Create/Remove of an unmounted volume touch no kernel device) and the real
CLI; the containerd snapshotter's and the CSI plugin's holds from their real state files
(their own Store and State classes write them), through a plain ``serve`` and offline.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from docker_helpers import UnixHTTPConnection
from thinstore import Pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 1 << 20


def cli(pool: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, *args],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT))


def ok(pool: str, *args: str) -> subprocess.CompletedProcess:
    done = cli(pool, *args)
    assert done.returncode == 0, (args, done.stderr)
    return done


def refused(pool: str, *args: str) -> str:
    """Run a command that a hold must refuse: exit 5 and one line; return it."""
    done = cli(pool, *args)
    assert done.returncode == 5, (args, done.returncode, done.stderr)
    assert done.stderr.startswith("thinstore: ") and done.stderr.count("\n") == 1, done.stderr
    return done.stderr


def names(pool: str) -> set[str]:
    return {d["name"] for d in json.loads(ok(pool, "list", "--json").stdout)["devices"]}


@contextlib.contextmanager
def served(pool: str, *args: str, ready=None):
    """``thinstore serve ARGS`` (or a frontend's command) until the block ends."""
    log = open(os.path.join(os.path.dirname(pool), "serve.log"), "ab")
    proc = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", pool, *args],
                            stdout=log, stderr=log, env=dict(os.environ, PYTHONPATH=ROOT),
                            start_new_session=True)
    try:
        for _ in range(300):                         # bounded: 30 s to come up
            assert proc.poll() is None, open(log.name).read()[-2000:]
            with contextlib.suppress(OSError, AssertionError):
                if (ready or (lambda: True))() and os.path.exists(
                        os.path.join(pool, "control.sock")):
                    break
            time.sleep(0.1)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


@pytest.fixture
def where():
    path = tempfile.mkdtemp(prefix="tshold", dir="/tmp")     # short: unix socket paths
    yield path
    subprocess.run(["rm", "-rf", path])


class Plugin:
    """The Docker volume plugin's socket, spoken to as dockerd does."""

    def __init__(self, path: str):
        self.path = path

    def __call__(self, verb: str, body: dict) -> dict:
        conn = UnixHTTPConnection(self.path, timeout=60)
        try:
            conn.request("POST", f"/VolumeDriver.{verb}", body=json.dumps(body).encode(),
                         headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
            reply = json.loads(conn.getresponse().read() or b"{}")
            return {k: v for k, v in reply.items() if k != "Err" or v}
        finally:
            conn.close()

    def answers(self) -> bool:
        return "Volumes" in self("List", {})


def test_the_docker_plugins_volumes_are_held_while_it_serves_and_after(where):
    """destroy and rename of a volume Docker created are refused with exit 5 naming the
    plugin, whether the plugin runs or not; the volume stays, served, with its data; a
    rollback (the documented restore) and everything of the user's own still work; the
    plugin's own Remove works; destroy --force overrides a Docker hold, saying so. A
    device made outside Docker is held once Docker Creates it (adopts it)."""
    pool = os.path.join(where, "pool")
    ok(pool, "init", "--capacity", "256M")
    ok(pool, "create", "mine", "--size", "16M")
    plugin = Plugin(os.path.join(where, "p.sock"))
    with served(pool, "docker-plugin", "--plugin-socket", plugin.path, ready=plugin.answers):
        assert plugin("Create", {"Name": "pg", "Opts": {"size": "32M"}}) == {}
        assert plugin("Create", {"Name": "kept", "Opts": {"size": "16M"}}) == {}
        from thinstore.control import RemotePool
        with RemotePool(pool) as remote, remote.open_device("pg") as dev:
            dev.pwrite(b"rows" * 1024, 0)
            dev.flush()
            for args in (["destroy", "pg"], ["rename", "pg", "pg2"],
                         ["resize", "pg", "8M", "--shrink"]):
                err = refused(pool, *args)
                assert "held by the docker volume plugin as volume 'pg'" in err, err
            assert "docker volume rm pg" in refused(pool, "destroy", "pg")
            assert dev.pread(0, 4096) == b"rows" * 1024   # intact, and still served
        held = json.loads(ok(pool, "holds", "--json").stdout)["holds"]
        assert {h["device"]: h["holder"] for h in held} == {"pg": "docker", "kept": "docker"}
        assert "held by frontends" in ok(pool, "list").stderr
        ok(pool, "snapshot", "kept@s")                    # reads and snapshots: allowed,
        ok(pool, "rollback", "kept@s")                    # and the documented restore
        ok(pool, "rename", "kept@s", "kept@t")
        ok(pool, "destroy", "kept@t")
        ok(pool, "rename", "mine", "yours")               # no frontend's: as before
        ok(pool, "create", "adopted", "--size", "16M")    # Docker's once it Creates it
        assert plugin("Create", {"Name": "adopted", "Opts": None}) == {}
        assert "as volume 'adopted'" in refused(pool, "destroy", "adopted")
        assert plugin("Get", {"Name": "pg"})["Volume"]["Name"] == "pg"
        assert plugin("Remove", {"Name": "pg"}) == {}     # the plugin's own: not refused
        assert "pg" not in names(pool)
    assert "cannot destroy 'kept'" in refused(pool, "destroy", "kept")       # offline
    refused(pool, "rename", "kept", "other")
    forced = ok(pool, "destroy", "--force", "kept")
    assert "held by the docker volume plugin" in forced.stderr and "--force" in forced.stderr
    assert names(pool) == {"yours", "adopted"}


def _containerd_and_csi_records(pool: str) -> None:
    """Devices and records as the snapshotter and the CSI plugin make them."""
    from thinstore.frontends.containerd.store import Store
    from thinstore.frontends.csi.state import State
    with Pool.open(pool) as p:
        p.create_volume("ctd-base", 16 * M)
        p.snapshot("ctd-base@fs")
        p.clone("ctd-base@fs", "ctd-1")
        p.snapshot("ctd-1@c")
        p.destroy("ctd-1")
        p.clone("ctd-1@c", "ctd-2")
        p.create_volume("csi.vol-1", 16 * M)
        p.snapshot("csi.vol-1@snap-1")
        p.create_volume("ctd-9", 16 * M)              # no record names it: not held
    store = Store(os.path.join(pool, "containerd"))
    with store.transaction() as body:
        body["snapshots"] = {
            "default/1/sha256:aa": {"id": 1, "kind": "committed", "parent": "",
                                    "device": "ctd-1@c", "labels": {}, "created": 0,
                                    "updated": 0},
            "default/2/ctr": {"id": 2, "kind": "active", "parent": "default/1/sha256:aa",
                              "device": "ctd-2", "labels": {}, "created": 0, "updated": 0}}
    state = State(os.path.join(pool, "csi"))
    state.put("volumes", "pvc-1", {"id": "csi.vol-1", "size": 16 * M})
    state.put("snapshots", "snap-1", {"id": "csi.vol-1@snap-1"})


def _containerd_and_csi_holds_refuse(pool: str) -> None:
    err = refused(pool, "destroy", "ctd-1@c")
    assert "containerd snapshotter as committed snapshot 'default/1/sha256:aa'" in err, err
    assert "not even --force" in refused(pool, "destroy", "--force", "ctd-1@c")
    refused(pool, "destroy", "ctd-base@fs")
    refused(pool, "rename", "ctd-2", "mine")
    refused(pool, "rename", "csi.vol-1", "csi.vol-x")       # its held snapshot follows
    err = refused(pool, "destroy", "--force", "csi.vol-1")
    assert "held by the CSI plugin as volume 'pvc-1'" in err, err
    assert "as snapshot 'snap-1'" in refused(pool, "destroy", "csi.vol-1@snap-1")
    ok(pool, "snapshot", "csi.vol-1@mine")
    assert "roll back" in refused(pool, "rollback", "csi.vol-1@mine")
    refused(pool, "resize", "csi.vol-1", "8M", "--shrink")
    stream = os.path.join(os.path.dirname(pool), "stream")
    ok(pool, "send", "csi.vol-1@mine", "-o", stream)
    assert "cannot receive into 'csi.vol-1'" in refused(pool, "receive", "csi.vol-1",
                                                       "-i", stream, "--force")
    ok(pool, "resize", "csi.vol-1", "32M")                  # a grow is no harm
    ok(pool, "destroy", "csi.vol-1@mine")
    ok(pool, "destroy", "ctd-9")
    assert "ctd-1@c" in names(pool) and "csi.vol-1" in names(pool)
    status = ok(pool, "status").stdout
    assert "holds:" in status and "the containerd snapshotter 4" in status, status


def test_the_snapshotters_and_csi_records_hold_offline_and_through_a_server(where):
    """The records of frontends that are not running hold their devices too: on the pool
    itself, and through a plain serve's control socket (they come back and trust them).
    Neither gives way to --force: their dependants are not the pool's to see."""
    pool = os.path.join(where, "pool")
    ok(pool, "init", "--capacity", "256M")
    _containerd_and_csi_records(pool)
    _containerd_and_csi_holds_refuse(pool)
    ok(pool, "create", "ctd-9", "--size", "16M")
    with served(pool, "serve", "--socket", os.path.join(where, "nbd.sock")):
        _containerd_and_csi_holds_refuse(pool)
        held = json.loads(ok(pool, "holds", "--json", "ctd-2").stdout)["holds"]
        assert held == [{"device": "ctd-2", "holder": "snapshotter",
                         "what": "active snapshot 'default/2/ctr'",
                         "blocks": ["destroy", "rename", "rollback", "shrink", "receive"]}]


def test_a_damaged_record_file_is_said_and_holds_nothing(where):
    pool = os.path.join(where, "pool")
    ok(pool, "init", "--capacity", "64M")
    ok(pool, "create", "csi.v", "--size", "8M")
    os.makedirs(os.path.join(pool, "csi"))
    with open(os.path.join(pool, "csi", "state"), "w") as f:
        f.write("thinstore-csi-state 2 3 00000000\n{}\n")
    done = ok(pool, "destroy", "csi.v")
    assert "warning" in done.stderr and "checksum" in done.stderr, done.stderr


def test_a_docker_entry_holds_its_device_under_the_name_it_has_now():
    """A volume renamed before holds existed (the registry follows it by uuid) is held
    under its new name; an entry still "creating" holds its name; a stale entry whose
    device is gone holds nothing, so a new device under that name is free."""
    from thinstore.frontends.holds import docker_holds
    held = docker_holds({"old": {"uuid": "u1"}, "making": {"uuid": None},
                         "gone": {"uuid": "u9"}},
                        {"new": "u1", "making": "u2", "gone": "u3"})
    assert {h.device: h.what for h in held} == {"new": "volume 'new'",
                                                "making": "volume 'making'"}
    assert all(h.blocks == ("destroy", "rename", "shrink") for h in held)
