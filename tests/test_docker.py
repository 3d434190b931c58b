"""The Docker volume plugin against a real dockerd (issue 13's must-show items 1-5).

Containers run with --network none on a busybox image imported offline (see
.ci/services/dockerd.sh).  Skips with the reason where there is no dockerd, no root or no
/dev/fuse.
"""

from __future__ import annotations

import json
import re

import pytest

from docker_helpers import (MiB, Plugin, docker_daemon, inspect, plugin_for_a_test,
                            private_dockerd, remove_everything, require_docker_host,
                            running_plugin)

pytestmark = pytest.mark.integration

EXT4_INCOMPAT = 1024 + 0x60     # s_feature_incompat in the superblock at byte 1024
EXT4_NEEDS_RECOVERY = 0x4


@pytest.fixture(scope="module")
def docker():
    with docker_daemon() as d:
        yield d


@pytest.fixture(scope="module")
def plugin_process(docker):
    """One plugin (one driver name) for the module: dockerd keeps every volume driver it
    has met until it restarts, and a gone one makes each 'docker volume ls' wait for it."""
    with running_plugin() as p:
        yield p


@pytest.fixture
def plugin(docker, plugin_process):
    with plugin_for_a_test(docker, plugin_process) as p:
        yield p


# 1 -----------------------------------------------------------------------------------
def test_data_outlives_the_container_and_inspect_shows_size_and_used(docker, plugin):
    docker("volume", "create", "-d", plugin.name, "-o", "size=1G", "db")
    docker.run(["-v", "db:/data"], "echo hello > /data/greeting && "
               "dd if=/dev/urandom of=/data/blob bs=1M count=8 2>/dev/null")
    seen = docker.run(["-v", "db:/data"], "cat /data/greeting; wc -c < /data/blob").stdout
    assert seen.split() == ["hello", str(8 * MiB)]

    listed = docker("volume", "ls", "--format", "{{.Driver}} {{.Name}}").stdout.splitlines()
    assert f"{plugin.name} db" in listed
    status = inspect(docker, "db")["Status"]
    assert status["size"] == 1 << 30
    assert 8 * MiB <= status["used"] < 200 * MiB, status
    assert status["fs"] == "ext4" and status["mounts"] == 0


def test_auto_created_volume_gets_the_defaults(docker, plugin):
    docker.run(["-v", "auto:/data", "--volume-driver", plugin.name], "echo x > /data/x")
    status = inspect(docker, "auto")["Status"]
    assert status["size"] == 10 << 30 and status["fs"] == "ext4"


def test_xfs_volume(docker, plugin):
    docker("volume", "create", "-d", plugin.name, "-o", "fs=xfs", "-o", "size=512M", "xfsvol")
    out = docker.run(["-v", "xfsvol:/data"], "grep ' /data ' /proc/mounts").stdout
    assert " xfs " in out


# 2 -----------------------------------------------------------------------------------
WRITER = ("i=0; while :; do i=$((i+1)); echo $i > /data/t.$i; mv /data/t.$i /data/n.$i; "
          "sleep 0.01; done")


def until(condition: str) -> str:
    """A shell loop waiting (at most 60 s) for a test expression to hold."""
    return f"for i in $(seq 600); do if {condition}; then exit 0; fi; sleep 0.1; done; exit 1"


def test_snapshot_while_writing_then_clone(docker, plugin):
    docker("volume", "create", "-d", plugin.name, "-o", "size=1G", "db")
    docker.run(["-v", "db:/data"], "echo base > /data/base")
    docker.run(["-v", "db:/data"], WRITER, detach=True, name=f"{plugin.name}-writer")
    docker.run(["-v", "db:/data"], until("[ -e /data/n.200 ]"))
    plugin.cli("snapshot", "db@s1")             # through the control socket, mid-write
    with plugin.remote() as remote, remote.open_device("db@s1") as snap:
        incompat = int.from_bytes(snap.pread(EXT4_INCOMPAT, 4), "little")
    assert not incompat & EXT4_NEEDS_RECOVERY, "the snapshot was not frozen: journal dirty"

    docker("volume", "create", "-d", plugin.name, "-o", "from=db@s1", "db-test")
    listing = docker.run(["-v", "db-test:/data"], "cd /data; grep '' n.* t.* 2>/dev/null; "
                         "echo clone > /data/clone-only").stdout.split("\n")
    files = dict(line.split(":", 1) for line in listing if line)
    numbered = sorted(int(f[2:]) for f in files if f.startswith("n."))
    assert numbered == list(range(1, len(numbered) + 1)), "a file is missing in the middle"
    assert len(numbered) >= 200
    assert all(files[f"n.{k}"] == str(k) for k in numbered), "a file is torn"
    partial = [f for f in files if f.startswith("t.")]
    assert partial in ([], [f"t.{len(numbered) + 1}"])

    docker("rm", "-f", f"{plugin.name}-writer")
    after = docker.run(["-v", "db:/data"], "cat /data/base; ls /data | grep -c '^n\\.'; "
                       "ls /data/clone-only 2>&1 || true").stdout.split("\n")
    assert after[0] == "base" and int(after[1]) >= len(numbered)
    assert "No such file" in after[2], "the clone's write reached db"


def test_clone_of_a_full_volume_costs_what_an_empty_one_does(docker, plugin):
    docker("volume", "create", "-d", plugin.name, "-o", "size=2G", "full")
    docker("volume", "create", "-d", plugin.name, "-o", "size=2G", "empty")
    docker.run(["-v", "full:/data"], "dd if=/dev/urandom of=/data/seed bs=1M count=64 "
               "2>/dev/null; for i in $(seq 15); do cp /data/seed /data/copy.$i; done; sync")
    assert inspect(docker, "full")["Status"]["used"] >= 1 << 30
    plugin.cli("snapshot", "full@s")
    plugin.cli("snapshot", "empty@s")
    assert not plugin.settled_leftovers()    # unmounted: a mounted ext4 writes on its own

    def clone_cost(source: str, name: str) -> dict:
        with plugin.remote() as remote:
            before, used = remote.request("counters"), remote.status()["used"]
            docker("volume", "create", "-d", plugin.name, "-o", f"from={source}", name)
            after, used_after = remote.request("counters"), remote.status()["used"]
        cost = {k: after[k] - before[k] for k in
                ("chunks_allocated", "chunks_copied", "bytes_copied", "bytes_written")}
        return {**cost, "pool_used": used_after - used}
    full, empty = clone_cost("full@s", "full-clone"), clone_cost("empty@s", "empty-clone")
    assert full == empty == {"chunks_allocated": 0, "chunks_copied": 0, "bytes_copied": 0,
                             "bytes_written": 0, "pool_used": 0}
    assert inspect(docker, "full-clone")["Status"]["shared"] >= 1 << 30


# 3 -----------------------------------------------------------------------------------
def test_remove_refused_while_mounted_then_space_comes_back(docker, plugin):
    docker("volume", "create", "-d", plugin.name, "-o", "size=1G", "vol")
    docker.run(["-v", "vol:/data"], "dd if=/dev/urandom of=/data/blob bs=1M count=64 2>/dev/null;"
               " sync; touch /data/done; sleep 600", detach=True, name=f"{plugin.name}-user")
    docker.run(["-v", "vol:/data"], until("[ -e /data/done ]"))
    refused = docker("volume", "rm", "vol", check=False)
    assert refused.returncode and "in use" in refused.stderr
    status, answer = plugin.call("/VolumeDriver.Remove", {"Name": "vol"})
    assert "in use by 1 mount" in answer["Err"], answer
    with plugin.remote() as remote:
        used_before = remote.status()["used"]
        assert "vol" in [d.name for d in remote.list()], "a refused Remove lost the volume"
    docker("rm", "-f", f"{plugin.name}-user")
    docker("volume", "rm", "vol")
    with plugin.remote() as remote:
        assert used_before - remote.status()["used"] >= 64 * MiB
        assert "vol" not in [d.name for d in remote.list()]


def test_rollback_of_a_mounted_volume_says_which_containers_to_stop(docker, plugin):
    """The refusal is right; its reason is the container's mount, not nbdfuse's own NBD
    connections (which the user never opened)."""
    docker("volume", "create", "-d", plugin.name, "-o", "size=256M", "rb")
    docker.run(["-v", "rb:/data"], "echo before > /data/f")
    plugin.cli("snapshot", "rb@s")
    docker.run(["-v", "rb:/data"], "echo after > /data/f; touch /data/up; sleep 600",
               detach=True, name=f"{plugin.name}-rb")
    docker.run(["-v", "rb:/data"], until("[ -e /data/up ]"))
    refused = plugin.cli("rollback", "rb@s", check=False)
    assert refused.returncode and "volume 'rb' is mounted by Docker" in refused.stderr \
        and "stop the container(s)" in refused.stderr, refused.stderr
    assert "NBD connection" not in refused.stderr
    docker("rm", "-f", f"{plugin.name}-rb")
    done = plugin.cli("rollback", "rb@s", check=False)      # at once, as a script would
    assert not done.returncode, done.stderr
    assert docker.run(["-v", "rb:/data"], "cat /data/f").stdout.strip() == "before"
    assert not plugin.settled_leftovers()    # that run's mount has lingered and gone
    from thinstore.nbd.client import NBDDevice
    with NBDDevice(f"{plugin.pool}/nbd.sock", "rb"):        # a plain NBD client: its reason
        refused = plugin.cli("rollback", "rb@s", check=False)
    assert refused.returncode and "open NBD connection" in refused.stderr, refused.stderr


def test_a_forced_destroy_of_a_mounted_volume_names_the_containers_it_cuts_off(docker, plugin):
    """destroy --force still goes ahead (the user forced it), but it says which
    container mounts lose the volume, as the refusal without --force does."""
    docker("volume", "create", "-d", plugin.name, "-o", "size=256M", "gone")
    cid = docker.run(["-v", "gone:/data"], "touch /data/up; sleep 600", detach=True,
                     name=f"{plugin.name}-gone").stdout.strip()
    docker.run(["-v", "gone:/data"], until("[ -e /data/up ]"))
    done = plugin.cli("destroy", "--force", "gone", check=False)
    assert done.returncode == 0, done.stderr
    warning = done.stderr.strip()
    assert warning.startswith("thinstore: warning: 'gone' was in use and is destroyed "
                              "(--force): its ") and "NBD connection" in warning, warning
    assert re.search(r"; Docker containers that mount it lost it \(1 mount \(Docker mount "
                     r"ID [0-9a-f]{12}, not container IDs\); their I/O on it now fails: "
                     r"stop them, docker ps --filter volume=gone\)$", warning), warning
    with plugin.remote() as remote:
        assert "gone" not in [d.name for d in remote.list()]
    docker("rm", "-f", cid)     # Docker sends no Unmount for a volume that is gone:
    assert not plugin.settled_leftovers()       # the plugin let go of it itself


def test_remove_waits_for_a_connection_that_is_ending(docker, plugin):
    """A container's unmount stops nbdfuse, whose NBD connections end a moment later on
    the server's threads; a Remove right after must not fail on that moment."""
    import os
    import threading
    from thinstore.nbd.client import NBDDevice
    late = f"late-{plugin.name[-8:]}"
    docker("volume", "create", "-d", plugin.name, "-o", "size=64M", late)
    dev = NBDDevice(os.path.join(plugin.pool, "nbd.sock"), late)     # a late leaver
    threading.Timer(0.5, dev.close).start()
    docker("volume", "rm", late)
    with plugin.remote() as remote:
        assert late not in [d.name for d in remote.list()]


def test_remove_refused_for_a_volume_with_snapshots_and_clones(docker, plugin):
    """Destroying the snapshots is all a Remove needs: the clone made from one is an
    independent volume, named in the refusal only so that none is surprised, and stays."""
    docker("volume", "create", "-d", plugin.name, "-o", "size=256M", "origin")
    docker.run(["-v", "origin:/data"], "echo o > /data/f")
    plugin.cli("snapshot", "origin@s")
    docker("volume", "create", "-d", plugin.name, "-o", "from=origin@s", "copy")
    refused = docker("volume", "rm", "origin", check=False)
    assert refused.returncode and "volume 'origin' has a snapshot origin@s: destroy it " \
        "first ('thinstore destroy origin@s')" in refused.stderr, refused.stderr
    assert "its clone copy (from origin@s) stays" in refused.stderr, refused.stderr
    assert "remove" not in refused.stderr.split("origin@s", 1)[1], "a clone need not go"
    assert "cloned from" not in refused.stderr, "the relation is told backwards"
    plugin.cli("destroy", "origin@s")
    docker("volume", "rm", "origin")
    assert docker.run(["-v", "copy:/data"], "cat /data/f").stdout.strip() == "o"


# 4 -----------------------------------------------------------------------------------
def test_plugin_killed_while_mounted_restarts_clean(docker, plugin):
    docker("volume", "create", "-d", plugin.name, "-o", "size=512M", "killme")
    docker.run(["-v", "killme:/data"], "echo survived > /data/f; sync; sleep 600", detach=True,
               name=f"{plugin.name}-holder")
    docker.run(["-v", "killme:/data"], until("[ -s /data/f ]"))
    plugin.kill9()
    plugin.start()
    answer = plugin.call("/VolumeDriver.Get", {"Name": "killme"})[1]
    assert answer["Volume"]["Status"]["mounts"] == 1, "the restart lost the mount count"
    docker("rm", "-f", f"{plugin.name}-holder")          # its Unmount reaches the new plugin
    assert plugin.call("/VolumeDriver.Get", {"Name": "killme"})[1]["Volume"]["Status"]["mounts"] == 0
    assert docker.run(["-v", "killme:/data"], "cat /data/f").stdout.strip() == "survived"
    assert not plugin.settled_leftovers(), "a stale loop device, FUSE mount or nbdfuse is left"


def test_dockerd_restart_keeps_the_volume():
    require_docker_host()
    docker = private_dockerd()                  # one this test may restart
    p = Plugin()
    try:
        p.start()
        docker("volume", "create", "-d", p.name, "-o", "size=256M", "keep")
        docker.run(["-v", "keep:/data"], "echo kept > /data/f")
        docker.restart()
        assert "keep" in docker("volume", "ls", "-q").stdout.split()
        assert docker.run(["-v", "keep:/data"], "cat /data/f").stdout.strip() == "kept"
        remove_everything(docker, p)
    finally:
        p.close()
        docker.stop()


# 5 -----------------------------------------------------------------------------------
BAD_REQUESTS = [
    ("/VolumeDriver.Explode", {"Name": "x"}, 404, r"unknown plugin call '/VolumeDriver.Explode'"),
    ("/VolumeDriver.Create", b"{\"Name\": ", 400, r"malformed JSON"),
    ("/VolumeDriver.Create", b"[1, 2]", 400, r"must be a JSON object"),
    ("/VolumeDriver.Mount", {"Name": "ghost", "ID": "c1"}, 200, r"no volume 'ghost'"),
    ("/VolumeDriver.Create", {"Name": "v", "Opts": {"size": "lots"}}, 200,
     r"invalid size 'lots'"),
    ("/VolumeDriver.Create", {"Name": "v", "Opts": {"from": "db@never"}}, 200,
     r"no snapshot 'db@never'"),
    ("/VolumeDriver.Create", {"Name": "v", "Opts": {"colour": "red"}}, 200,
     r"unknown option 'colour'"),
    ("/VolumeDriver.Create", {"Name": "v", "Opts": {"fs": "ntfs"}}, 200, r"fs='ntfs'"),
    ("/VolumeDriver.Create", {"Name": "v", "Opts": {"fs": "xfs", "size": "64M"}}, 200,
     r"xfs needs at least 300M"),
    ("/VolumeDriver.Create", {"Opts": {}}, 200, r"names no volume"),
    ("/VolumeDriver.Create", {"Name": "a@b"}, 200, r"snapshot name"),
    ("/VolumeDriver.Remove", {"Name": "ghost"}, 200, r"no volume 'ghost'"),
    ("/VolumeDriver.Unmount", {"Name": "v", "ID": 7}, 200, r"ID"),
]


def test_bad_requests_get_an_err_and_the_plugin_keeps_serving(docker, plugin):
    for path, body, code, message in BAD_REQUESTS:
        status, answer = plugin.call(path, body)
        assert status == code and re.search(message, answer.get("Err", "")), (path, answer)
        assert plugin.call("/Plugin.Activate", {}) == (200, {"Implements": ["VolumeDriver"],
                                                              "Err": ""})
    for raw, code in ((b"GARBAGE\r\n\r\n", 400),
                      (b"POST /VolumeDriver.Get HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n",
                       413),
                      (b"POST /VolumeDriver.Get HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"zz\r\n", 400),
                      (b"POST /VolumeDriver.Get HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
                       b"11\r\n{\"Name\": \"ghost\"}\r\n0\r\n\r\n", 200)):
        status, answer = raw_request(plugin.socket, raw)
        assert status == code and answer["Err"], (raw, status, answer)
    assert plugin.call("/VolumeDriver.List", {})[1] == {"Volumes": [], "Err": ""}
    refused = docker("volume", "create", "-d", plugin.name, "-o", "size=lots", "vol", check=False)
    assert refused.returncode and "invalid size 'lots'" in refused.stderr
    refused = docker("volume", "create", "-d", plugin.name, "-o", "from=nope@s", "vol",
                     check=False)
    assert refused.returncode and "no snapshot 'nope@s'" in refused.stderr
    assert plugin.call("/VolumeDriver.Capabilities", {})[1]["Capabilities"] == {"Scope": "local"}
    docker("volume", "create", "-d", plugin.name, "fine")
    assert "fine" in docker("volume", "ls", "-q").stdout.split()


def test_messages_name_the_driver_dockerd_knows(docker, plugin):
    """The plugin's socket is NAME.sock (as dockerd finds plugins): advice says NAME."""
    answer = plugin.call("/VolumeDriver.Mount", {"Name": "ghost", "ID": "c1"})[1]
    assert f"'docker volume create -d {plugin.name} ghost'" in answer["Err"], answer
    refused = docker("volume", "create", "-d", plugin.name, "-o", "colour=red", "v",
                     check=False)
    assert refused.returncode and f"{plugin.name} takes size" in refused.stderr


def test_plugin_name_option_names_the_driver_in_messages():
    """Installed under another name through a spec file (trialts.spec -> plugin.sock):
    --plugin-name tells the plugin the name users type."""
    require_docker_host()
    p = Plugin(socket_name="plugin.sock", args=("--plugin-name", "trialts"))
    try:
        p.start()
        err = p.call("/VolumeDriver.Mount", {"Name": "auto1", "ID": "c1"})[1]["Err"]
        assert "'docker volume create -d trialts auto1'" in err, err
        assert "-d thinstore" not in err
    finally:
        p.close()


def test_a_create_cut_short_is_settled_at_the_next_start(docker, plugin):
    """A Create records the volume's options before the pool makes it: killed in between,
    the next start keeps a volume that was made (with its options) and forgets one that
    was not."""
    from thinstore.frontends.docker.registry import Registry

    plugin.kill9()
    plugin.cli("create", "made", "--size", "512M")       # the pool step happened ...
    registry = Registry(f"{plugin.pool}/docker/volumes.json")
    registry.put("made", fs="xfs", state="creating", **{"from": None})
    registry.put("never", fs="ext4", state="creating", **{"from": None})   # ... or did not
    plugin.start()
    registry = Registry(f"{plugin.pool}/docker/volumes.json")
    assert registry.get("made")["state"] == "ready" and registry.get("never") is None
    assert plugin.call("/VolumeDriver.Get", {"Name": "never"})[1]["Err"]
    out = docker.run(["-v", "made:/data", "--volume-driver", plugin.name],
                     "grep ' /data ' /proc/mounts").stdout
    assert " xfs " in out, "the option recorded before the crash was lost"


def raw_request(path: str, data: bytes) -> tuple[int, dict]:
    """Send bytes as they are; the status and the JSON answer."""
    import socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(path)
        sock.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < \
                int(re.search(rb"Content-Length: (\d+)", reply).group(1)):
            part = sock.recv(65536)
            if not part:
                break
            reply += part
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)
