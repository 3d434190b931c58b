"""The attach module with the real tools: nbdfuse + loop devices, mkfs, mount, fsfreeze.

Needs root, /dev/fuse, free loop devices (skips with the reason otherwise).  The kernel
NBD transport is tested only where the host has the nbd module.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from nbd_helpers import MiB, RawClient, need, need_loop_over_nbd, served, wait_for
from thinstore.control import ControlServer, RemotePool
from thinstore.frontends.attach import Attacher, AttachError, connectors, host
from thinstore.frontends import statefile
from thinstore.frontends.attach.state import MAGIC
from thinstore.nbd import server as nbd_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXT4_SUPERBLOCK = 1024
EXT4_INCOMPAT = 0x60            # s_feature_incompat, from the superblock's start
EXT4_NEEDS_RECOVERY = 0x4       # INCOMPAT_RECOVER: the journal must be replayed


def require_fuse_loop() -> None:
    need_loop_over_nbd("fsfreeze", "blkid")


class Rig:
    """A served pool with a control socket, and an Attacher over nbdfuse + loop."""

    def __init__(self, s):
        self.s, self.pool = s, s.pool
        self.control = ControlServer(s.pool, s.server, nbd_socket=s.sock)
        self.control.listen(os.path.join(s.dir, "control.sock"))
        self.state_path = os.path.join(s.dir, "attach", "state.json")
        self.attacher = self.new_attacher()
        self.control.snapshot_hooks.append(self.attacher.snapshot_hook)
        self.mnt = os.path.join(s.dir, "mnt")

    def new_attacher(self) -> Attacher:
        root = os.path.join(os.path.dirname(self.state_path), "dev")
        return Attacher(self.state_path, self.s.sock,
                        connector=connectors.FuseLoopConnector(self.s.sock, root),
                        server=self.s.server)

    def target(self, name: str) -> str:
        return os.path.join(self.mnt, name)

    def leftovers(self) -> list:
        root = os.path.join(os.path.dirname(self.state_path), "dev")
        fuse = [m for m in host.mounts() if m.target.startswith(self.s.dir)]
        return fuse + list(host.loops_backed_by(root))

    def close(self) -> None:
        self.attacher.close()
        self.control.shutdown()


@pytest.fixture
def rig():
    require_fuse_loop()
    with served(capacity=2 << 30) as s:
        r = Rig(s)
        try:
            yield r
        finally:
            r.close()
            assert not r.leftovers(), "a mount or loop device outlived the test"


def write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_mount_makes_a_file_system_once_and_keeps_the_data(rig):
    rig.pool.create_volume("db", 256 * MiB)
    target = rig.attacher.mount("db", rig.target("db"), "c1")
    assert host.mount_at(target).fstype == "ext4"
    write(os.path.join(target, "hello"), b"kept")
    rig.attacher.unmount("db", "c1")
    assert host.mount_at(target) is None and not rig.leftovers()
    assert rig.attacher.attached() == {}
    target = rig.attacher.mount("db", rig.target("db"), "c2", fstype="xfs")
    assert read(os.path.join(target, "hello")) == b"kept", "mount formatted a used volume"
    assert host.mount_at(target).fstype == "ext4", "the file system found wins over fstype"


def test_a_volume_is_free_for_a_rename_as_soon_as_its_last_unmount_returns(rig, monkeypatch):
    """nbdfuse has exited when a detach stops it, but the server saw its connections end a
    moment later, on its own threads: a rename right after an unmount (a Docker volume's
    linger ending just before 'thinstore rename') failed now and then on a loaded host
    with "'xsrc' has 4 open NBD connection(s)".  The detach now returns once the server
    counts none of its client's connections; another NBD client of the volume is not
    waited for (it stays counted, and the detach returns all the same).  The loaded host
    is made certain here: each connection thread lingers 0.3 s after its session ends."""
    class Late(nbd_server.Transmission):
        def run(self):
            super().run()
            time.sleep(0.3)
    monkeypatch.setattr(nbd_server, "Transmission", Late)
    rig.pool.create_volume("v0", 64 * MiB)
    other = RawClient(rig.s.sock)
    other.greet()
    other.go("v0")                                   # someone else's client, kept open
    target = rig.target("v")
    with RemotePool(rig.s.dir) as remote:
        for i in range(6):
            rig.attacher.mount(f"v{i}", target, "c1")
            assert rig.s.server.connections(f"v{i}") > int(i == 0)
            rig.attacher.unmount(f"v{i}", "c1")
            assert rig.s.server.connections(f"v{i}") == int(i == 0), \
                "the server still counted nbdfuse's connections after the unmount returned"
            if i == 0:
                other.close()
                wait_for(lambda: not rig.s.server.connections("v0"), what="the hang-up")
            remote.rename(f"v{i}", f"v{i + 1}")       # refused while connections are open
    assert [d.name for d in rig.pool.list()] == ["v6"]


def test_data_without_a_signature_is_never_formatted(rig):
    rig.pool.create_volume("raw", 64 * MiB)
    payload = os.urandom(4096)
    with rig.pool.open_device("raw") as dev:
        dev.pwrite(payload, 3 * MiB)
    with pytest.raises(AttachError, match="holds data but no file system"):
        rig.attacher.mount("raw", rig.target("raw"), "c1")
    with rig.pool.open_device("raw") as dev:
        assert dev.pread(3 * MiB, 4096) == payload
    assert rig.attacher.attached() == {} and not rig.leftovers()


def test_mount_refcount_per_owner(rig):
    rig.pool.create_volume("shared", 128 * MiB)
    target = rig.target("shared")
    rig.attacher.mount("shared", target, "c1")
    rig.attacher.mount("shared", target, "c2")
    rig.attacher.mount("shared", target, "c2")          # one owner counts once
    assert sorted(rig.attacher.owners("shared")) == ["c1", "c2"]
    rig.attacher.unmount("shared", "c2")
    assert host.mount_at(target) is not None, "unmounted while c1 still uses it"
    rig.attacher.unmount("shared", "c2")                # a retried Unmount: no error
    assert host.mount_at(target) is not None
    with pytest.raises(Exception, match="mounted on"):
        rig.attacher.mount("shared", rig.target("elsewhere"), "c3")
    device = rig.attacher.attach("shared", "backup")         # a bare-device owner too
    rig.attacher.unmount("shared", "c1")
    assert host.mount_at(target) is None, "mounted after its last mount owner left"
    assert rig.attacher.attached()["shared"]["device"] == device
    rig.attacher.detach("shared", "backup")
    assert not rig.leftovers()


def test_state_file_is_versioned_and_checked(rig):
    rig.pool.create_volume("v", 64 * MiB)
    device = rig.attacher.attach("v", "owner-1")
    with open(rig.state_path, "rb") as f:
        raw = f.read()
    head, _, body = raw.partition(b"\n")
    assert head.split()[:2] == [MAGIC.encode(), b"2"]      # docs/statefile.md
    attachments = json.loads(body)
    assert attachments["v"]["device"] == device
    assert attachments["v"]["owners"] == {"owner-1": "device"}
    other = device[:-1] + ("1" if device[-1] != "1" else "2")   # same length: the sum differs
    edited = raw.replace(device.encode(), other.encode())
    with open(rig.state_path, "wb") as f:
        f.write(edited)
    with pytest.raises(AttachError, match=f"{rig.state_path}.*checksum"):
        rig.new_attacher()
    rig.attacher._save()          # put the real state back for the fixture's clean-up


def test_snapshot_through_control_freezes_the_mounted_file_system(rig):
    rig.pool.create_volume("db", 256 * MiB)
    target = rig.attacher.mount("db", rig.target("db"), "c1")
    write(os.path.join(target, "before"), b"x" * 100_000)
    with RemotePool(rig.s.dir) as remote:
        remote.snapshot("db@frozen")
    rig.control.snapshot_hooks.clear()                  # the same, without the freeze
    write(os.path.join(target, "after"), b"y" * 100_000)
    with RemotePool(rig.s.dir) as remote:
        remote.snapshot("db@unfrozen")

    def needs_recovery(name: str) -> bool:
        with rig.pool.open_device(name) as dev:
            sb = dev.pread(EXT4_SUPERBLOCK, 1024)
        return bool(int.from_bytes(sb[EXT4_INCOMPAT:EXT4_INCOMPAT + 4], "little")
                    & EXT4_NEEDS_RECOVERY)
    assert not needs_recovery("db@frozen"), "the frozen snapshot still needs a journal replay"
    assert needs_recovery("db@unfrozen"), "a mounted ext4 snapshotted live needs replay"
    rig.pool.clone("db@frozen", "db-test")
    clone = rig.attacher.mount("db-test", rig.target("db-test"), "c2", options=("noload",))
    assert read(os.path.join(clone, "before")) == b"x" * 100_000
    assert not os.path.exists(os.path.join(clone, "after"))


def test_clean_up_thaw_of_a_file_system_not_frozen_is_quiet(rig, caplog):
    """Clean-up after a kill -9 thaws whatever may have been left frozen; a file system
    that is not frozen (EINVAL) is the usual case, not a failure.  A real failure still
    shows."""
    from thinstore.frontends.attach import filesystem
    rig.pool.create_volume("cold", 64 * MiB)
    target = rig.attacher.mount("cold", rig.target("cold"), "c1")
    caplog.set_level(logging.DEBUG, logger="thinstore.attach")
    filesystem.thaw(target, quiet=True)
    loud = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO
            and "failed" in r.getMessage()]
    assert not loud, loud
    assert any("not frozen" in r.getMessage() for r in caplog.records)
    caplog.clear()
    filesystem.thaw(os.path.join(rig.s.dir, "no-such-mount"), quiet=True)
    assert [r for r in caplog.records if r.levelno == logging.WARNING
            and "thaw" in r.getMessage()], "a real thaw failure went unseen"
    rig.attacher.unmount("cold", "c1")


def test_xfs_clone_mounts_beside_its_origin(rig):
    need("mkfs.xfs")
    rig.pool.create_volume("x", 512 * MiB)
    origin = rig.attacher.mount("x", rig.target("x"), "c1", fstype="xfs")
    assert host.mount_at(origin).fstype == "xfs"
    write(os.path.join(origin, "f"), b"xfs data")
    with RemotePool(rig.s.dir) as remote:
        remote.snapshot("x@s")
        remote.clone("x@s", "x2")
    clone = rig.attacher.mount("x2", rig.target("x2"), "c1")     # same UUID: needs nouuid
    assert read(os.path.join(clone, "f")) == b"xfs data"
    write(os.path.join(clone, "g"), b"clone only")
    assert not os.path.exists(os.path.join(origin, "g"))


def has_capability(bit: int) -> bool:
    with open("/proc/self/status") as f:
        caps = next(line for line in f if line.startswith("CapEff:"))
    return bool(int(caps.split()[1], 16) >> bit & 1)


CAP_SYS_RESOURCE = 24


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_extend_then_grow_the_file_system(rig, fstype):
    need(f"mkfs.{fstype}")
    if fstype == "ext4" and not has_capability(CAP_SYS_RESOURCE):
        pytest.skip("growing a mounted ext4 needs CAP_SYS_RESOURCE, which this process lacks")
    rig.pool.create_volume("g", 320 * MiB)
    target = rig.attacher.mount("g", rig.target("g"), "c1", fstype=fstype)
    small = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    rig.pool.resize("g", 1024 * MiB)
    with pytest.raises(Exception, match="unmount it first"):
        rig.attacher.extend("g")
    rig.attacher.unmount("g", "c1")
    rig.attacher.attach("g", "admin")
    rig.attacher.extend("g")
    rig.attacher.mount("g", target, "c1")
    rig.attacher.grow_filesystem("g")
    big = os.statvfs(target).f_blocks * os.statvfs(target).f_frsize
    assert big > 2 * small
    rig.attacher.detach("g", "admin")
    rig.attacher.unmount("g", "c1")


def test_stop_writes_through_what_a_container_wrote_and_shuts_down_its_bind_mount(rig):
    """A frontend's graceful stop (Attacher.close) while a container, in a mount namespace
    of its own, still has the volume bind-mounted and its writes only in the page cache:
    they reach the pool (syncfs + device flush before anything is detached), and later
    writes through the orphaned bind mount fail loudly instead of vanishing."""
    need("unshare", "nsenter")
    rig.pool.create_volume("v3", 128 * MiB)
    target = rig.attacher.mount("v3", rig.target("v3"), "c1")
    bind = os.path.join(rig.s.dir, "container-data")
    holder = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c",
         f"mkdir -p {bind} && mount --bind {target} {bind} && echo ready && exec sleep 600"],
        stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"ready\n"
        seq = b"".join(b"%d\n" % i for i in range(1, 100001))
        in_container = ["nsenter", "-t", str(holder.pid), "-m", "sh", "-c"]
        subprocess.run([*in_container, f"seq 1 100000 > {bind}/seq; echo done > {bind}/marker"],
                       check=True)                   # no sync: dirty pages only
        rig.attacher.close()                         # the frontend's stop
        late = subprocess.run([*in_container, f"echo late > {bind}/late && sync {bind}/late"],
                              capture_output=True)
        assert late.returncode != 0, "a write after the stop was accepted and then lost"
        rig.attacher = rig.new_attacher()            # the restarted frontend
        rig.attacher.recover()
        target = rig.attacher.mount("v3", rig.target("v3"), "c2")
        assert read(os.path.join(target, "seq")) == seq
        assert read(os.path.join(target, "marker")) == b"done\n"
        rig.attacher.unmount("v3", "c2")
    finally:
        holder.kill()
        holder.wait()


CRASHER = r"""
import os, sys, time
from thinstore import Pool
from thinstore.nbd.server import NBDServer, ServerConfig
from thinstore.frontends.attach import Attacher, connectors
pool_dir, sock, state, target = sys.argv[1:5]
pool = Pool.open(pool_dir, commit_interval=0)
server = NBDServer(pool, ServerConfig())
server.listen_unix(sock)
server.start()
root = os.path.join(os.path.dirname(state), "dev")
a = Attacher(state, sock, connector=connectors.FuseLoopConnector(sock, root))
a.mount("db", target, "container-1")
with open(os.path.join(target, "data"), "wb") as f:
    f.write(b"synced before the crash")
    f.flush(); os.fsync(f.fileno())
print("mounted", flush=True)
time.sleep(600)
"""


def test_recover_after_kill_9_cleans_up_and_keeps_owners():
    require_fuse_loop()
    work = tempfile.mkdtemp(prefix="tsatt", dir="/tmp")
    pool_dir, sock = os.path.join(work, "pool"), os.path.join(work, "nbd.sock")
    state, target = os.path.join(work, "attach", "state.json"), os.path.join(work, "mnt")
    from thinstore import Pool
    with Pool.create(pool_dir, 1 << 30, 64 << 10, commit_interval=0) as pool:
        pool.create_volume("db", 256 * MiB)
    child = subprocess.Popen([sys.executable, "-c", CRASHER, pool_dir, sock, state, target],
                             stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        assert child.stdout.readline() == b"mounted\n"
        holder = subprocess.Popen(["sleep", "600"], cwd=target)    # a user of the mount
        child.send_signal(signal.SIGKILL)
        child.wait()
        from thinstore.nbd.server import NBDServer, ServerConfig
        with Pool.open(pool_dir, commit_interval=0) as pool:
            server = NBDServer(pool, ServerConfig())
            server.listen_unix(sock)
            server.start()
            try:
                root = os.path.join(work, "attach", "dev")
                a = Attacher(state, sock, connector=connectors.FuseLoopConnector(sock, root))
                assert a.recover() == {"db": "cleaned"}
                assert a.owners("db") == {"container-1": "mount"}, "the refcount was lost"
                assert host.mount_at(target) is None
                assert not [m for m in host.mounts() if m.target.startswith(work + "/attach")]
                assert not host.processes_mentioning(root, "nbdfuse")
                a.mount("db", target, "container-2")
                assert read(os.path.join(target, "data")) == b"synced before the crash"
                a.unmount("db", "container-1")                 # the old container's unmount
                assert host.mount_at(target) is not None
                a.unmount("db", "container-2")
                assert host.mount_at(target) is None
                holder.kill()
                holder.wait()
                assert not host.loops_backed_by(root), "a loop device outlived its users"
            finally:
                server.shutdown()
    finally:
        child.kill()
        child.wait()
        shutil.rmtree(work, ignore_errors=True)


def test_kernel_nbd_transport():
    if not host.kernel_nbd_available():
        pytest.skip("this host has no kernel NBD client (/sys/module/nbd, /dev/nbd0): "
                    "the nbdfuse + loop transport serves instead")
    need("nbd-client", "mkfs.ext4")
    if os.geteuid() != 0:
        pytest.skip("NBD devices and mounts need root")
    with served(capacity=1 << 30) as s:
        s.pool.create_volume("k", 128 * MiB)
        a = Attacher(os.path.join(s.dir, "attach", "state.json"), s.sock,
                     connector=connectors.KernelNBDConnector(s.sock, os.path.join(s.dir, "dev")))
        try:
            target = a.mount("k", os.path.join(s.dir, "mnt"), "c1")
            write(os.path.join(target, "f"), b"through /dev/nbd")
            assert a.attached()["k"]["device"].startswith("/dev/nbd")
            a.unmount("k", "c1")
            target = a.mount("k", os.path.join(s.dir, "mnt"), "c1")
            assert read(os.path.join(target, "f")) == b"through /dev/nbd"
        finally:
            a.close()


def test_mkfs_cut_short_by_a_crash_is_made_again(rig, monkeypatch):
    """A crash inside mkfs leaves a partial file system, which a blank check alone would
    refuse as data forever; the recorded intent lets the next mount make it again."""
    from thinstore.frontends.attach import filesystem

    class Crash(BaseException):
        pass

    def half_mkfs(device, fstype):
        with open(device, "r+b") as f:            # some of what mkfs writes, then death
            f.seek(1 << 20)
            f.write(os.urandom(64 << 10))
            os.fsync(f.fileno())
        raise Crash()
    rig.pool.create_volume("cut", 128 * MiB)
    monkeypatch.setattr(filesystem, "make", half_mkfs)
    with pytest.raises(Crash):
        rig.attacher.mount("cut", rig.target("cut"), "c1")
    monkeypatch.undo()
    recorded = statefile.StateFile(rig.state_path, MAGIC).load()
    assert recorded["cut"]["unfinished_mkfs"] == "ext4"

    rig.attacher = rig.new_attacher()              # the next start
    rig.attacher.recover()
    target = rig.attacher.mount("cut", rig.target("cut"), "c2")
    assert host.mount_at(target).fstype == "ext4"
    rig.attacher.unmount("cut", "c2")
    assert rig.attacher.attached() == {}, "the finished mkfs is still remembered"


def test_a_failed_unmount_keeps_the_release_and_the_next_detach_retries_it(rig):
    """The last mount owner's unmount fails (the file system is busy): the error is
    raised, the owner is released in the state file as in memory (a restart does not
    bring it back), the mount stays, and the next detach of the export unmounts it."""
    rig.pool.create_volume("busy", 128 * MiB)
    target = rig.attacher.mount("busy", rig.target("busy"), "c1")
    held = open(os.path.join(target, "open"), "wb")           # keeps umount busy
    try:
        with pytest.raises(AttachError, match="busy"):
            rig.attacher.unmount("busy", "c1")
        assert host.mount_at(target) is not None
        assert rig.attacher.owners("busy") == {}
        recorded = statefile.StateFile(rig.state_path, MAGIC).load()
        assert recorded["busy"]["owners"] == {}, "the release was not saved"
        assert recorded["busy"]["mount"]["target"] == target, "the mount was forgotten"
    finally:
        held.close()
    rig.attacher.unmount("busy", "c1")                         # a retry: unmounts now
    assert host.mount_at(target) is None and not rig.leftovers()
    assert rig.attacher.attached() == {}
    assert statefile.StateFile(rig.state_path, MAGIC).load() == {}


def test_a_busy_fuse_unmount_logs_one_line_for_all_its_tries(rig, caplog, monkeypatch):
    """Something holds the loop device as it goes (a container's bind mount, here an open
    descriptor): every ``fusermount3 -u`` try fails with EBUSY; the log has one line for
    the unmount, saying how many tries failed and why, not one (or two) per try."""
    monkeypatch.setattr(connectors, "BUSY_POLLS", 8)             # 0.8 s of tries
    rig.pool.create_volume("held", 64 * MiB)
    device = rig.attacher.attach("held", "c1")
    holder = os.open(device, os.O_RDONLY)
    try:
        with caplog.at_level(logging.INFO, logger="thinstore.attach"):
            rig.attacher.detach("held", "c1")
    finally:
        os.close(holder)
    lines = [r.getMessage() for r in caplog.records if "unmount FUSE" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "fusermount3 -u failed 8 of 8 tries (" in lines[0] and "busy" in lines[0], lines
    for _ in range(300):                         # the kernel frees the loop at its last close
        if not rig.leftovers():
            break
        time.sleep(0.1)
