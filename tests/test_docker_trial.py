"""The Docker volume plugin against a real dockerd: what a fresh user's trial ran into.

A full pool under a mounted volume, a volume too large for its pool or too small for its
file system, a clone grown at create, the file system and origin inspect reports, and the
plugin's messages.  A private dockerd of this module (and a plugin on a small 256 MiB pool,
so that filling it is quick); skips with the reason where there is no dockerd, no root or
no /dev/fuse.
"""

from __future__ import annotations

import os
import re
import time

import pytest

from docker_helpers import (MiB, Plugin, inspect, plugin_for_a_test, private_dockerd,
                            remove_everything, require_docker_host, running_plugin)

pytestmark = pytest.mark.integration

POOL = "256M"


@pytest.fixture(scope="module")
def docker():
    require_docker_host()
    d = private_dockerd()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def plugin_process(docker):
    with running_plugin(capacity=POOL) as p:
        yield p


@pytest.fixture
def plugin(docker, plugin_process):
    with plugin_for_a_test(docker, plugin_process) as p:
        yield p


def volumes(docker, p: Plugin) -> list[str]:
    """This plugin's volumes (dockerd also lists those of every plugin with a spec file
    in /etc/docker/plugins, which other test runs may have)."""
    return docker("volume", "ls", "-q", "--filter", f"driver={p.name}").stdout.split()


def until(condition: str) -> str:
    """A shell loop waiting (at most 60 s) for a test expression to hold."""
    return f"for i in $(seq 600); do if {condition}; then exit 0; fi; sleep 0.1; done; exit 1"


def wait_for(predicate, what: str, polls: int = 600):
    for _ in range(polls):                  # bounded: 60 s
        found = predicate()
        if found:
            return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def read_only(path: str) -> bool:
    """ext4 stopped writing after errors: "ro" in the mount's options, or the
    super option "emergency_ro" (Linux 6.x), as /proc/self/mountinfo shows them."""
    from thinstore.frontends.docker.probe import read_only as _read_only
    return _read_only(path)


# 1 -----------------------------------------------------------------------------------
def test_a_volume_whose_file_system_failed_on_a_full_pool_is_released(docker, plugin):
    """The pool fills under a container: ext4 goes read-only, its Unmount's sync fails.
    The volume must still be snapshotted while mounted, released when the container
    goes (Docker never retries an Unmount), and removable afterwards."""
    docker("volume", "create", "-d", plugin.name, "-o", "size=1G", "filler")
    # data past the pool's end, then metadata until a journal commit needs a chunk the
    # full pool cannot give (ext4 then stops writing; data errors alone do not stop it)
    docker.run(["-v", "filler:/data"], "dd if=/dev/urandom of=/data/big bs=1M count=600 "
               "2>/dev/null; sync; for i in $(seq 20000); do mkdir /data/d$i 2>/dev/null "
               "|| break; [ $((i % 500)) = 0 ] && sync; done; sleep 600", detach=True,
               name="filler-user")
    target = os.path.join(plugin.pool, "docker", "mnt", "filler")
    wait_for(lambda: read_only(target), "ext4 to go read-only on the full pool")

    done = plugin.cli("snapshot", "filler@after", check=False)
    assert not done.returncode, f"a read-only file system blocks a snapshot: {done.stderr}"

    docker("rm", "-f", "filler-user")
    assert "filler-user" not in docker("ps", "-a", "--format", "{{.Names}}").stdout
    status = inspect(docker, "filler")["Status"]
    assert status["mounts"] == 0, "the failed Unmount kept Docker's mount"
    assert "failed to write its data out" in plugin.log_text()
    refused = docker("volume", "rm", "filler", check=False)
    assert refused.returncode and "in use" not in refused.stderr \
        and "filler@after" in refused.stderr, refused.stderr
    plugin.cli("destroy", "filler@after")
    docker("volume", "rm", "filler")
    with plugin.remote() as remote:
        assert "filler" not in [d.name for d in remote.list()]
        assert remote.status()["used"] < 64 * MiB, "the full volume's space did not come back"


# 2 -----------------------------------------------------------------------------------
def test_create_refuses_sizes_the_pool_or_the_file_system_cannot_take(docker, plugin):
    """size=1P on a small pool: mkfs at the first mount would write metadata until the
    pool is full (minutes, past Docker's 60 s); size=1: mkfs would fail at the mount.
    Both are refused by 'docker volume create', in words the user sees."""
    refused = docker("volume", "create", "-d", plugin.name, "-o", "size=1P", "huge",
                     check=False)
    assert refused.returncode and "metadata" in refused.stderr \
        and "more than the pool's" in refused.stderr, refused.stderr
    refused = docker("volume", "create", "-d", plugin.name, "-o", "size=1", "tiny",
                     check=False)
    assert refused.returncode and "ext4 needs at least 2M" in refused.stderr, refused.stderr
    assert volumes(docker, plugin) == []
    with plugin.remote() as remote:
        assert remote.list() == []
    docker("volume", "create", "-d", plugin.name, "-o", "size=64G", "roomy")  # ~10 MiB
    out = docker.run(["-v", "roomy:/data"], "df -k /data | tail -1").stdout.split()
    assert int(out[1]) > 60 << 20, out                                       # KiB


# 3 -----------------------------------------------------------------------------------
def df_kib(docker, volume: str) -> tuple[int, str]:
    """(size of the file system in KiB as df shows it in a container, /data/f)."""
    out = docker.run(["-v", f"{volume}:/data"], "df -k /data | tail -1; cat /data/f").stdout
    lines = out.splitlines()
    return int(lines[0].split()[1]), lines[1]


@pytest.mark.parametrize("fs,small", [("ext4", "128M"), ("xfs", "320M")])
def test_a_clone_made_larger_and_a_resized_volume_show_their_size_in_df(docker, plugin, fs,
                                                                        small):
    """'-o from=VOL@SNAP -o size=BIGGER' promises a clone grown to BIGGER: df in the
    container shows it (the file system is grown at mount), with the snapshot's data."""
    docker("volume", "create", "-d", plugin.name, "-o", f"size={small}", "-o", f"fs={fs}",
           f"{fs}-base")
    docker.run(["-v", f"{fs}-base:/data"], "echo kept > /data/f")
    plugin.cli("snapshot", f"{fs}-base@s")
    docker("volume", "create", "-d", plugin.name, "-o", f"from={fs}-base@s", "-o", "size=2G",
           f"{fs}-big")
    size, content = df_kib(docker, f"{fs}-big")
    assert size > 1900 << 10 and content == "kept", (size, content)
    plugin.cli("resize", f"{fs}-base", "1G")
    size, content = df_kib(docker, f"{fs}-base")
    assert size > 900 << 10 and content == "kept", (size, content)


# 4 -----------------------------------------------------------------------------------
def test_inspect_reports_the_file_system_and_origin_the_volume_really_has(docker, plugin):
    """A clone of an xfs volume is xfs in 'docker volume inspect' (it mounts as xfs); a
    clone whose snapshot is destroyed says its origin is gone, as 'thinstore list' does.
    (An xfs volume renamed with the CLI was the case too: Docker's volumes are held now,
    and the rename is refused.)"""
    docker("volume", "create", "-d", plugin.name, "-o", "fs=xfs", "-o", "size=320M", "xsrc")
    docker.run(["-v", "xsrc:/data"], "echo x > /data/f")
    plugin.cli("snapshot", "xsrc@s")
    docker("volume", "create", "-d", plugin.name, "-o", "from=xsrc@s", "xclone")
    assert inspect(docker, "xclone")["Status"]["fs"] == "xfs"
    assert " xfs " in docker.run(["-v", "xclone:/data"], "grep ' /data ' /proc/mounts").stdout
    plugin.cli("destroy", "xsrc@s")
    status = inspect(docker, "xclone")["Status"]
    listed = plugin.cli("list", "-H", "-o", "name,origin", "xclone").stdout.split("\t")
    assert status["origin"] == listed[1].strip() == "(gone)", (status, listed)
    refused = plugin.cli("rename", "xsrc", "xmoved", check=False)   # Docker's: held
    assert refused.returncode == 5 and "held by the docker volume plugin as volume " \
        "'xsrc'" in refused.stderr, refused.stderr
    assert inspect(docker, "xsrc")["Status"]["fs"] == "xfs"


# 5 -----------------------------------------------------------------------------------
def test_a_refusal_names_docker_mount_ids_as_such(docker, plugin):
    """The IDs Docker's Mount carries are its mount IDs: a refusal listing them as
    containers sends the user looking for IDs docker ps never shows."""
    docker("volume", "create", "-d", plugin.name, "-o", "size=64M", "held")
    docker.run(["-v", "held:/data"], "touch /data/up; sleep 600", detach=True, name="holder")
    docker.run(["-v", "held:/data"], until("[ -e /data/up ]"))
    err = plugin.call("/VolumeDriver.Remove", {"Name": "held"})[1]["Err"]
    ids = re.findall(r"Docker mount ID ([0-9a-f]{12}), not container IDs", err)
    assert len(ids) == 1 and "docker ps -a --filter volume=held" in err, err
    containers = docker("ps", "-aq", "--no-trunc").stdout.split()
    assert not any(c.startswith(ids[0]) for c in containers)
    refused = plugin.cli("rollback", "held@none", check=False)     # no such snapshot: plain
    assert refused.returncode
    plugin.cli("snapshot", "held@s")
    refused = plugin.cli("rollback", "held@s", check=False)
    assert refused.returncode and f"Docker mount ID {ids[0]}, not container IDs" \
        in refused.stderr, refused.stderr


def test_a_stop_with_a_volume_in_use_logs_the_fuse_retries_once(docker, plugin):
    """SIGTERM while a container holds a volume: the FUSE file stays busy while the
    plugin tries to unmount it; one line with the count, not one per try."""
    docker("volume", "create", "-d", plugin.name, "-o", "size=64M", "busy")
    docker.run(["-v", "busy:/data"], "touch /data/up; sleep 600", detach=True, name="busy-user")
    docker.run(["-v", "busy:/data"], until("[ -e /data/up ]"))
    start = os.path.getsize(os.path.join(plugin.dir, "plugin.log"))
    plugin.stop()
    with open(os.path.join(plugin.dir, "plugin.log"), "rb") as f:
        f.seek(start)
        lines = f.read().decode(errors="replace").splitlines()
    fuse = [line for line in lines if "unmount FUSE " in line and "lazily" not in line]
    assert len(fuse) == 1, fuse[:5]
    assert re.search(r"fusermount3 -u failed \d+ of \d+ tries \(.*busy", fuse[0]) or \
        re.search(r"fusermount3 -u \S+ \((at the first try|\d+ busy tries first)\)",
                  fuse[0]), fuse
    plugin.start()
    docker("rm", "-f", "busy-user")


# 7 -----------------------------------------------------------------------------------
def fs_in_container(docker, volume: str) -> str:
    """The type of the file system a container sees mounted from ``volume``."""
    line = docker.run(["-v", f"{volume}:/data"], "grep ' /data ' /proc/mounts").stdout
    return line.split()[2]


def test_a_docker_volume_cannot_be_renamed_from_under_docker(docker, plugin):
    """Docker keeps a volume's name in its containers: 'thinstore rename' of a volume
    Docker created is refused (its hold), the plugin running or not, and the volume
    keeps its name and options; a new volume under another name is a clone."""
    docker("volume", "create", "-d", plugin.name, "-o", "fs=xfs", "-o", "size=320M", "bx")
    refused = plugin.cli("rename", "bx", "moved", check=False)
    assert refused.returncode == 5 and "'docker volume rm bx'" in refused.stderr, \
        refused.stderr
    plugin.stop()
    refused = plugin.cli("rename", "bx", "moved", check=False)   # offline: the same
    assert refused.returncode == 5 and "held by the docker volume plugin" in refused.stderr
    plugin.start()
    assert fs_in_container(docker, "bx") == "xfs"


# 8 -----------------------------------------------------------------------------------
def test_a_mount_slower_than_docker_waits_is_answered_in_time_and_finished_later(docker):
    """dockerd gives a Mount 120 s and never unmounts a mount ID whose Mount failed.
    A plugin that answers within --docker-mount-wait (1 s here; mkfs of a thin 16 TiB
    ext4 writes ~900 MiB and takes seconds) says the volume is being prepared; the mkfs
    goes on, is released when done (nothing stays mounted or held), and the next run
    of the container mounts the made file system at once."""
    with running_plugin(capacity="16G", args=("--docker-mount-wait", "1")) as p:
        try:
            docker("volume", "create", "-d", p.name, "-o", "size=16T", "vast")
            first = docker.run(["-v", "vast:/data"], "echo early > /data/f", check=False)
            assert first.returncode and "is still being prepared" in first.stderr, first
            wait_for(lambda: "is prepared" in p.log_text(), "the background mount")
            assert not p.settled_leftovers(), "the background mount stayed"
            for _ in range(20):                 # a loaded machine may need > 1 s again
                done = docker.run(["-v", "vast:/data"], "echo kept > /data/f; "
                                  "df -k /data | tail -1", check=False)
                if not done.returncode or "is still being prepared" not in done.stderr:
                    break
            assert not done.returncode, done.stderr
            assert int(done.stdout.split()[1]) > 15 << 30, done.stdout   # KiB: ~16 TiB
            docker("volume", "rm", "vast")      # no mount ID of the failed run holds it
        finally:
            remove_everything(docker, p)
