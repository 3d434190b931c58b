"""thinstore as containerd's proxy snapshotter, driven by real containerd and ctr.

Issue 14's must-show items 1-5 (6, the benchmark, is benchmarks/bench_containerd.py).  One
containerd (CI's service, or one started here), one snapshotter process over one pool for
the module; each test works in a containerd namespace of its own and cleans it up.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from containerd_helpers import (SNAPSHOTTER, Backend, Containerd, Snapshotter,
                                skip_unless_containerd, wait_for)
from oci_image import make_image
from thinstore.frontends.containerd.store import Store

pytestmark = pytest.mark.integration

REF = "thinstore.test/busybox:layers"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILLER = 8 << 20        # the image's third layer: 8 MiB of non-zero bytes


@pytest.fixture(scope="module")
def containerd():
    skip_unless_containerd()
    c = Containerd()
    yield c
    c.close()


@pytest.fixture(scope="module")
def workdir():
    d = tempfile.mkdtemp(prefix="ts-ctdt-")     # short: sockets live under it
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def image(workdir):
    path = os.path.join(workdir, "image.tar")
    make_image(path, REF, extra=[{"data/filler": FILLER}])
    return path


@pytest.fixture(scope="module")
def snap(containerd, workdir):
    pool = os.path.join(workdir, "pool")
    subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, "init", "--capacity", "8G"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    s = Snapshotter(pool, containerd.snapshotter_socket)
    s.start()
    assert containerd.reaches_snapshotter()
    yield s
    s.stop()


@pytest.fixture
def ns(request, containerd, snap):
    """A containerd namespace for one test; its containers and images go at the end."""
    name = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name[5:])[:40].strip("-")
    yield name
    if snap.proc is None or snap.proc.poll() is not None:
        snap.start()
        containerd.reaches_snapshotter()
    for cid in containerd.ctr(name, "containers", "ls", "-q", check=False).stdout.split():
        containerd.ctr(name, "tasks", "delete", "-f", cid, check=False)
        containerd.ctr(name, "containers", "rm", cid, check=False)
    for ref in containerd.ctr(name, "images", "ls", "-q", check=False).stdout.split():
        containerd.ctr(name, "images", "rm", "--sync", ref, check=False)


def import_image(containerd, ns, image):
    containerd.ctr(ns, "images", "import", "--snapshotter", SNAPSHOTTER, image)


def layer_devices(snap) -> dict:
    return {n: d for n, d in snap.devices().items() if n.startswith("ctd-") and n.endswith("@c")}


def clone_devices(snap) -> dict:
    return {n: d for n, d in snap.devices().items()
            if n.startswith("ctd-") and "@" not in n}


def digest_of(snap, device: str) -> str:
    out = os.path.join(snap.pool, "..", "export.raw")
    snap.thinstore("export", device, out)
    h = hashlib.sha256()
    with open(out, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    os.unlink(out)
    return h.hexdigest()


def run(containerd, ns, cid, script, rm=True):
    args = ["run"] + (["--rm"] if rm else []) + ["--snapshotter", SNAPSHOTTER, REF, cid,
                                                  "sh", "-c", script]
    return containerd.ctr(ns, *args).stdout


def mount_snapshot(containerd, ns, key, target):
    """Mount snapshot ``key`` on ``target`` as containerd would (its Mounts reply)."""
    os.makedirs(target, exist_ok=True)
    line = containerd.ctr(ns, "snapshots", "--snapshotter", SNAPSHOTTER, "mounts", target,
                          key).stdout.split()
    assert line[:2] == ["mount", "-t"], line
    subprocess.run(line, check=True)


# ---------------------------------------------------------------- a stop loses nothing
def test_a_stop_writes_through_what_a_running_task_wrote(containerd, snap, image, ns, workdir):
    """SIGTERM to the snapshotter while a task's writes are only in the page cache: they
    are in the snapshot after the restart (the attach module syncs before detaching)."""
    import_image(containerd, ns, image)
    containerd.ctr(ns, "run", "-d", "--snapshotter", SNAPSHOTTER, REF, "writer", "sh", "-c",
                   "seq 1 50000 > /seq; echo done > /marker; sleep 1000")
    assert wait_for(lambda: containerd.ctr(ns, "tasks", "exec", "--exec-id", "probe",
                                           "writer", "cat", "/marker",
                                           check=False).stdout == "done\n", pause=0.2)
    snap.stop()
    snap.start()
    assert containerd.reaches_snapshotter()
    containerd.ctr(ns, "tasks", "kill", "-s", "KILL", "writer", check=False)
    wait_for(lambda: containerd.ctr(ns, "tasks", "delete", "writer",
                                    check=False).returncode == 0, pause=0.2)
    target = os.path.join(workdir, "writer-rootfs")
    mount_snapshot(containerd, ns, "writer", target)
    try:
        with open(os.path.join(target, "seq"), "rb") as f:
            assert f.read() == b"".join(b"%d\n" % i for i in range(1, 50001))
    finally:
        subprocess.run(["umount", target], check=True)


def test_remove_is_refused_while_mounted_in_any_mount_namespace(containerd, snap, image, ns,
                                                                 workdir):
    """Remove of an active snapshot mounted inside another mount namespace (a container's,
    ``unshare -m``), or of a mounted view, is FailedPrecondition naming the mount point;
    the device and the data stay.  ``ctr snapshots rm`` itself returns 0 either way:
    containerd removes its record at once and calls Remove from its garbage collector,
    so the call is made here directly, as that collector makes it."""
    import grpc
    from google.protobuf import empty_pb2
    need_tool("unshare")
    import_image(containerd, ns, image)
    sn = ("snapshots", "--snapshotter", SNAPSHOTTER)
    parent = [k for k, i in containerd.snapshots(ns).items() if i["Kind"] == "Committed"][0]
    containerd.ctr(ns, *sn, "prepare", "act1", parent)
    assert wait_for(lambda: view_kept(containerd, ns, "view1", parent), tries=5)
    act, view = os.path.join(workdir, "act1"), os.path.join(workdir, "view1")
    line = containerd.ctr(ns, *sn, "mounts", act, "act1").stdout.strip()
    os.makedirs(act, exist_ok=True)
    holder = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                               f"{line} && echo kept > {act}/f && sync && echo ready && "
                               "exec sleep 600"], stdout=subprocess.PIPE)
    backend = Backend(snap.address)
    try:
        assert holder.stdout.readline() == b"ready\n"
        mount_snapshot(containerd, ns, "view1", view)
        keys = {k.rsplit("/", 1)[1]: k for k in backend.list() if k.startswith(ns + "/")}
        for key, where in (("act1", act), ("view1", view)):
            with pytest.raises(grpc.RpcError) as err:
                backend.call("Remove", backend.pb.RemoveSnapshotRequest(key=keys[key]),
                             empty_pb2.Empty)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"still mounted on {where}" in err.value.details()
        assert {"act1", "view1"} <= {k.rsplit("/", 1)[1] for k in backend.list()}
        holder.kill()
        holder.wait()
        subprocess.run(["umount", view], check=True)
        containerd.ctr(ns, *sn, "rm", "act1", "view1")    # unmounted: containerd's GC
        assert wait_for(lambda: not {keys["act1"], keys["view1"]} & set(backend.list()))
    finally:
        backend.close()
        holder.kill()
        holder.wait()
        subprocess.run(["umount", view], check=False, capture_output=True)


def view_kept(containerd, ns, key, parent) -> bool:
    """``ctr snapshots view`` (unlike prepare) sets no gc.root label: containerd's garbage
    collector, run by another test's clean-up, may take the view before it is labelled.
    Make and label it; True if it is still there after."""
    sn = ("snapshots", "--snapshotter", SNAPSHOTTER)
    if containerd.ctr(ns, *sn, "info", key, check=False).returncode:
        containerd.ctr(ns, *sn, "view", key, parent)
    containerd.ctr(ns, *sn, "label", key, "containerd.io/gc.root=test", check=False)
    return containerd.ctr(ns, *sn, "info", key, check=False).returncode == 0


def need_tool(tool):
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} is not installed")


# ---------------------------------------------------------------- the service itself
def test_bad_requests_get_their_status_code_and_the_service_keeps_serving(snap):
    """Straight to the snapshotter's socket, as containerd's proxy would call it (first in
    the module: no containerd garbage collection is pending that would remove these keys)."""
    import grpc
    from google.protobuf import empty_pb2

    b = Backend(snap.address)
    pb = b.pb

    def code(method, request, response=empty_pb2.Empty, raw=None):
        with pytest.raises(grpc.RpcError) as err:
            b.call(method, request, response, raw)
        return err.value.code()

    C = grpc.StatusCode
    try:
        assert code("Stat", pb.StatSnapshotRequest(key="no/such key")) == C.NOT_FOUND
        assert code("Prepare", pb.PrepareSnapshotRequest(key="bad/a", parent="gone"),
                    pb.PrepareSnapshotResponse) == C.NOT_FOUND
        assert code("Prepare", pb.PrepareSnapshotRequest(key=""),
                    pb.PrepareSnapshotResponse) == C.INVALID_ARGUMENT
        assert code("Prepare", pb.PrepareSnapshotRequest(key="bad/l", labels={"l": "x" * 4096}),
                    pb.PrepareSnapshotResponse) == C.INVALID_ARGUMENT   # containerd's limit
        mounts = b.call("Prepare", pb.PrepareSnapshotRequest(key="bad/a", labels={"l": "1"}),
                        pb.PrepareSnapshotResponse).mounts
        assert [(m.type, m.options[:]) for m in mounts] == [("ext4", ["rw"])]
        assert mounts[0].source.startswith("/dev/")
        assert code("Prepare", pb.PrepareSnapshotRequest(key="bad/a"),
                    pb.PrepareSnapshotResponse) == C.ALREADY_EXISTS
        assert code("Prepare", pb.PrepareSnapshotRequest(key="bad/b", parent="bad/a"),
                    pb.PrepareSnapshotResponse) == C.INVALID_ARGUMENT   # parent not committed
        b.call("Commit", pb.CommitSnapshotRequest(name="bad/c", key="bad/a"), empty_pb2.Empty)
        assert code("Mounts", pb.MountsRequest(key="bad/c"),
                    pb.MountsResponse) == C.INVALID_ARGUMENT
        view = b.call("View", pb.ViewSnapshotRequest(key="bad/v", parent="bad/c"),
                      pb.ViewSnapshotResponse).mounts
        assert "ro" in view[0].options
        assert code("Remove", pb.RemoveSnapshotRequest(key="bad/c")) == C.FAILED_PRECONDITION
        assert code("Commit", pb.CommitSnapshotRequest(name="bad/d", key="bad/v")) \
            == C.INVALID_ARGUMENT                                       # a view
        with pytest.raises(grpc.RpcError) as err:
            b.list("bogus==1")
        assert err.value.code() == C.INVALID_ARGUMENT
        assert code("Prepare", None, pb.PrepareSnapshotResponse, raw=b"\xff\xff\xff") \
            != C.OK                                                     # not a message
        # Update: labels only, by mask
        info = pb.Info(name="bad/c", labels={"x": "1", "y": "2"})
        got = b.call("Update", pb.UpdateSnapshotRequest(info=info), pb.UpdateSnapshotResponse)
        assert dict(got.info.labels) == {"x": "1", "y": "2"}
        req = pb.UpdateSnapshotRequest(info=pb.Info(name="bad/c", labels={"y": "3"}))
        req.update_mask.paths.append("labels.y")
        got = b.call("Update", req, pb.UpdateSnapshotResponse)
        assert dict(got.info.labels) == {"x": "1", "y": "3"}
        assert set(b.list("name~=^bad/")) == {"bad/c", "bad/v"}

        # Cleanup releases what nothing references, and only that
        snap.thinstore("create", "ctd-99999", "--size", "1M")
        b.call("Cleanup", pb.CleanupRequest(), empty_pb2.Empty)
        assert "ctd-99999" not in snap.devices()
        for key in ("bad/v", "bad/c"):
            b.call("Remove", pb.RemoveSnapshotRequest(key=key), empty_pb2.Empty)
        assert not b.list("name~=^bad/")
    finally:
        b.close()


# ---------------------------------------------------------------- 1
def test_import_makes_one_committed_thin_snapshot_per_layer(containerd, snap, image, ns):
    before = set(layer_devices(snap))
    import_image(containerd, ns, image)
    infos = containerd.snapshots(ns)
    assert len(infos) == 3 and all(i["Kind"] == "Committed" for i in infos.values())
    roots = [k for k, i in infos.items() if not i.get("Parent")]
    assert len(roots) == 1                          # a chain: base <- layer 2 <- layer 3
    assert all(i["Parent"] in infos for k, i in infos.items() if k not in roots)

    new = {n: d for n, d in layer_devices(snap).items() if n not in before}
    assert len(new) == 3 and all(d["read_only"] and d["kind"] == "snapshot"
                                 for d in new.values())
    # each layer is a snapshot of a clone of its parent: it shares its parent's chunks
    assert sum(1 for d in new.values() if d["shared"] > 0) == 3
    assert max(d["exclusive"] for d in new.values()) >= FILLER

    # labels go through containerd to the snapshotter and come back in info
    top = next(k for k in infos if k not in {i.get("Parent") for i in infos.values()})
    containerd.ctr(ns, "snapshots", "--snapshotter", SNAPSHOTTER, "label", top,
                   "containerd.io/snapshot/thinstore-test=yes")
    assert containerd.snapshots(ns)[top]["Labels"]["containerd.io/snapshot/thinstore-test"] \
        == "yes"
    backend = Backend(snap.address)
    try:
        marked = backend.list('labels."containerd.io/snapshot/thinstore-test"==yes')
        assert len(marked) == 1
        (key, (kind, parent, labels)), = marked.items()
        assert kind == "COMMITTED" and parent in backend.list()
        listed = backend.list()
    finally:
        backend.close()

    snap.stop()                                     # List and Stat survive a restart
    snap.start()
    assert containerd.reaches_snapshotter()
    backend = Backend(snap.address)
    try:
        assert backend.list() == listed
        assert backend.stat(key).labels["containerd.io/snapshot/thinstore-test"] == "yes"
    finally:
        backend.close()


# ---------------------------------------------------------------- 2
def test_run_leaves_layers_unchanged_and_twenty_containers_share_them(
        containerd, snap, image, ns):
    import_image(containerd, ns, image)
    layers = {n: digest_of(snap, n) for n in layer_devices(snap)}
    out = run(containerd, ns, "once", "echo x > /etc/marker; cat /etc/hostname")
    assert out.strip() == "thinstore-image"
    assert {n: digest_of(snap, n) for n in layer_devices(snap)} == layers
    assert wait_for(lambda: not clone_devices(snap)), "the container's device was not removed"

    used = snap.used()
    for i in range(20):
        run(containerd, ns, f"c{i}", "dd if=/bin/busybox of=/root/own bs=64k count=8 2>/dev/null",
            rm=False)
    clones = clone_devices(snap)
    assert len(clones) == 20
    grown = snap.used() - used
    # the pool grew by the containers' own chunks only: each maps the image (8 MiB+) but
    # owns about its 512 KiB and the file system's journal and metadata writes
    assert grown == sum(d["exclusive"] for d in clones.values())
    assert all(d["used"] >= FILLER for d in clones.values())
    assert grown < 20 * ((512 << 10) + (1 << 20))
    assert {n: digest_of(snap, n) for n in layer_devices(snap)} == layers


# ---------------------------------------------------------------- 3
def test_committed_container_writes_are_a_layer_a_later_container_starts_from(
        containerd, snap, image, ns, workdir):
    import_image(containerd, ns, image)
    run(containerd, ns, "writer", "echo committed-data > /etc/layer4", rm=False)
    sn = ["snapshots", "--snapshotter", SNAPSHOTTER]
    containerd.ctr(ns, *sn, "commit", "layer4", "writer")
    infos = containerd.snapshots(ns)
    assert infos["layer4"]["Kind"] == "Committed" and infos["layer4"]["Parent"] in infos

    containerd.ctr(ns, *sn, "prepare", "reader-root", "layer4")
    target = os.path.join(workdir, "rootfs")
    os.makedirs(target, exist_ok=True)
    mount = containerd.ctr(ns, *sn, "mounts", target, "reader-root").stdout.split()
    assert mount[:3] == ["mount", "-t", "ext4"] and mount[3].startswith(("/dev/loop", "/dev/nbd"))
    subprocess.run(mount, check=True)
    try:
        out = containerd.ctr(ns, "run", "--rm", "--rootfs", target, "reader", "/bin/sh", "-c",
                             "cat /etc/layer4 /etc/hostname").stdout
    finally:
        subprocess.run(["umount", target], check=True)
    assert out.split() == ["committed-data", "thinstore-image"]
    containerd.ctr(ns, *sn, "rm", "reader-root")
    containerd.ctr(ns, "containers", "rm", "writer")
    containerd.ctr(ns, *sn, "rm", "layer4")


# ---------------------------------------------------------------- 4
def test_removal_frees_exclusive_chunks_and_image_rm_returns_the_pool(
        containerd, snap, image, ns):
    assert wait_for(lambda: not clone_devices(snap) and not _foreign_layers(containerd, snap))
    start = snap.used()
    import_image(containerd, ns, image)
    for cid in ("a", "b"):
        run(containerd, ns, cid, "dd if=/bin/busybox of=/root/own bs=64k count=16 2>/dev/null",
            rm=False)
    backend = Backend(snap.address)
    try:
        key = next(k for k in backend.list("kind==active") if k.endswith("/a"))
        own = backend.usage(key)
    finally:
        backend.close()
    devices = clone_devices(snap)
    assert own in {d["exclusive"] for d in devices.values()} and own >= 1 << 20
    before = snap.used()
    containerd.ctr(ns, "containers", "rm", "a")
    assert wait_for(lambda: len(clone_devices(snap)) == 1)
    assert before - snap.used() == own          # exactly the container's own chunks

    containerd.ctr(ns, "containers", "rm", "b")
    containerd.ctr(ns, "images", "rm", "--sync", REF)
    assert wait_for(lambda: snap.used() == start), (snap.used(), start)
    assert not clone_devices(snap)


def _foreign_layers(containerd, snap) -> bool:
    """Layers other tests' namespaces still hold (their cleanup's GC may lag)."""
    return bool(layer_devices(snap))


# ---------------------------------------------------------------- 5
# prepare-clone is left out: prepare-attach leaves the same unrecorded clone, and an
# attachment too (the suite's time is budgeted)
@pytest.mark.parametrize("point", ["prepare-attach", "commit-intent", "commit-snapshot",
                                   "commit-record"])
def test_kill9_in_prepare_or_commit_leaves_a_consistent_snapshotter(
        containerd, snap, image, ns, point):
    snap.stop()
    snap.start(crash=point)

    def attempt():
        r = containerd.ctr(ns, "images", "import", "--snapshotter", SNAPSHOTTER, image,
                           check=False)
        if r.returncode:
            try:
                snap.proc.wait(2)   # its connection drops as the process dies
            except subprocess.TimeoutExpired:
                return None         # alive: containerd's proxy connection is not back yet
        return r
    r = wait_for(attempt, tries=120, pause=0.25)
    assert r is not None and r.returncode != 0
    assert snap.killed(), f"the crash point was not reached; ctr said: {r.stderr}"
    snap.start()
    assert containerd.reaches_snapshotter()

    body = Store(os.path.join(snap.pool, "containerd")).body
    assert body["intents"] == []
    recorded = {r["device"] for r in body["snapshots"].values()}
    ours = {n for n in snap.devices() if n.startswith("ctd-") and n != "ctd-base@fs"}
    assert recorded == ours                         # no orphan, no half-made snapshot
    backend = Backend(snap.address)
    try:
        assert set(backend.list()) == set(body["snapshots"])
    finally:
        backend.close()
    mine = os.path.join(os.path.realpath(snap.pool), "")   # another snapshotter's loops are not ours
    assert not [a for a in _loop_files() if "ctd-" in a and mine in a and not
                any(d.replace("@", "_") in a for d in recorded)]

    import_image(containerd, ns, image)             # containerd works on
    assert run(containerd, ns, "after", "cat /etc/hostname").strip() == "thinstore-image"


def _loop_files() -> list[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    return out.splitlines()


# ---------------------------------------------------------------- xfs
def test_xfs_layers_and_views_mount_with_nouuid(containerd, snap, image, workdir):
    """Every layer's xfs is a copy of the base's, UUID included: nouuid lets them mount
    side by side.  A second pool, served on the same socket for this test only."""
    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs is not installed (xfsprogs)")
    pool = os.path.join(workdir, "xfs-pool")
    subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, "init", "--capacity", "4G"],
                   check=True, capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT))
    snap.stop()
    xfs = Snapshotter(pool, containerd.snapshotter_socket, "512M", "--fs-type", "xfs")
    xfs.start()
    ns, sn = "xfs", ["snapshots", "--snapshotter", SNAPSHOTTER]
    try:
        assert containerd.reaches_snapshotter()
        import_image(containerd, ns, image)
        assert run(containerd, ns, "x1", "cat /etc/hostname").strip() == "thinstore-image"
        top = next(k for k, i in containerd.snapshots(ns).items()
                   if k not in {j.get("Parent") for j in containerd.snapshots(ns).values()})
        containerd.ctr(ns, *sn, "view", "v1", top)
        containerd.ctr(ns, *sn, "prepare", "p1", top)
        targets = [os.path.join(workdir, t) for t in ("xv", "xp")]
        for key, target in zip(("v1", "p1"), targets):
            os.makedirs(target, exist_ok=True)
            mount = containerd.ctr(ns, *sn, "mounts", target, key).stdout.split()
            assert mount[:3] == ["mount", "-t", "xfs"] and "nouuid" in mount[-1]
            subprocess.run(mount, check=True)
        try:                    # both mounted at once: same UUID, accepted
            for target in targets:
                with open(os.path.join(target, "etc", "hostname")) as f:
                    assert f.read().strip() == "thinstore-image"
        finally:
            for target in targets:
                subprocess.run(["umount", target], check=False)
        for key in ("v1", "p1"):
            containerd.ctr(ns, *sn, "rm", key)
        containerd.ctr(ns, "images", "rm", "--sync", REF)
    finally:
        xfs.stop()
    ext4 = Snapshotter(pool, containerd.snapshotter_socket, "512M", "--fs-type", "ext4")
    same = Snapshotter(pool, containerd.snapshotter_socket, "512M")
    try:                        # the pool's layers are xfs: another type is refused
        with pytest.raises(AssertionError, match="--fs-type xfs"):
            ext4.start()
        same.start()            # no --fs-type: the pool's
        assert containerd.reaches_snapshotter()
        containerd.ctr(ns, *sn, "prepare", "p2")      # a fresh layer: the base's xfs
        line = containerd.ctr(ns, *sn, "mounts", "/x", "p2").stdout.split()
        assert line[:3] == ["mount", "-t", "xfs"]
        containerd.ctr(ns, *sn, "rm", "p2")
    finally:
        ext4.stop()
        same.stop()
        snap.start()
        containerd.reaches_snapshotter()


def test_another_base_size_on_an_existing_pool_is_refused(containerd, snap):
    """--base-size is fixed when the base is made, like --fs-type: a different one is
    refused with the pool's size in the message, not silently ignored."""
    snap.stop()
    bigger = Snapshotter(snap.pool, containerd.snapshotter_socket, "5G")
    try:
        with pytest.raises(AssertionError, match=r"layers are 256M \(268435456 bytes\), "
                                                 r"not 5G.*--base-size 268435456"):
            bigger.start()
    finally:
        bigger.stop()
        snap.start()
        assert containerd.reaches_snapshotter()


# ---------------------------------------------------------------- last
def test_the_pool_checks_clean_after_all_of_the_above(containerd, snap):
    """Crashes, removals and restarts left the pool's own metadata whole (thin_check's
    counterpart: refcounts recomputed from the maps agree)."""
    snap.stop()
    try:
        out = snap.thinstore("check", "--json")
        assert json.loads(out)["clean"] is True, out    # (a damaged pool exits non-zero too)
    finally:
        snap.start()
        containerd.reaches_snapshotter()
