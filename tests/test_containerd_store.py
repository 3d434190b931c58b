"""The containerd snapshotter's parts that need no daemon: its .proto and generated module,
the metadata store's transactions and format, List's filter syntax."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from thinstore.errors import CorruptMetadata, UsageError
from thinstore.frontends.containerd import snapshots_pb2 as pb
from thinstore.frontends.containerd.filters import compile_filters
from thinstore.frontends.containerd.store import Store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------ wire
def test_generated_module_matches_the_proto():
    pytest.importorskip("grpc_tools", reason="grpcio-tools is not installed (test extra)")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gen_containerd_proto.py"),
                        "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# containerd 1.6's published numbers (api/services/snapshots/v1/snapshots.proto,
# api/types/mount.proto): a renumbered field would silently mangle every call
UPSTREAM = {
    "Mount": {"type": 1, "source": 2, "target": 3, "options": 4},
    "PrepareSnapshotRequest": {"snapshotter": 1, "key": 2, "parent": 3, "labels": 4},
    "ViewSnapshotRequest": {"snapshotter": 1, "key": 2, "parent": 3, "labels": 4},
    "CommitSnapshotRequest": {"snapshotter": 1, "name": 2, "key": 3, "labels": 4},
    "Info": {"name": 1, "parent": 2, "kind": 3, "created_at": 4, "updated_at": 5, "labels": 6},
    "UpdateSnapshotRequest": {"snapshotter": 1, "info": 2, "update_mask": 3},
    "ListSnapshotsRequest": {"snapshotter": 1, "filters": 2},
    "ListSnapshotsResponse": {"info": 1},
    "UsageResponse": {"size": 1, "inodes": 2},
}


@pytest.mark.parametrize("message", sorted(UPSTREAM))
def test_field_numbers_are_containerds(message):
    fields = pb.DESCRIPTOR.message_types_by_name[message].fields_by_name
    assert {name: f.number for name, f in fields.items()} == UPSTREAM[message]


def test_service_and_kinds_are_containerds():
    svc = pb.DESCRIPTOR.services_by_name["Snapshots"]
    assert svc.full_name == "containerd.services.snapshots.v1.Snapshots"
    assert [m.name for m in svc.methods] == ["Prepare", "View", "Mounts", "Commit", "Remove",
                                            "Stat", "Update", "List", "Usage", "Cleanup"]
    assert svc.methods_by_name["List"].server_streaming
    assert (pb.UNKNOWN, pb.VIEW, pb.ACTIVE, pb.COMMITTED) == (0, 1, 2, 3)


# ------------------------------------------------------------ store
def test_store_survives_reopen_and_keeps_arbitrary_keys(tmp_path):
    store = Store(str(tmp_path))
    key = "default/7/extract-12 sha256:ab/cd\n\u00e9"
    with store.transaction() as body:
        body["snapshots"][key] = {"id": 3, "kind": "active", "parent": "", "device": "ctd-3",
                                  "labels": {"a": "b"}, "created": 1, "updated": 2}
    again = Store(str(tmp_path))
    assert again.get(key)["device"] == "ctd-3"
    assert again.body["generation"] == 1 and again.devices() == {"ctd-3"}


def test_a_failed_transaction_changes_nothing(tmp_path):
    store = Store(str(tmp_path))
    with store.transaction() as body:
        body["next_id"] = 5
    with pytest.raises(RuntimeError):
        with store.transaction() as body:
            body["next_id"] = 9
            raise RuntimeError("act failed")
    assert store.body["next_id"] == 5 and Store(str(tmp_path)).body["next_id"] == 5
    assert not os.path.exists(os.path.join(tmp_path, "snapshots.json.tmp"))


DAMAGE = {"flip": ("ctd-1@c", "ctd-2@c", "checksum"),
          "magic": ("thinstore-containerd-snapshots", "thinstore-containerd-snapshotz",
                    "not a thinstore-containerd-snapshots file"),
          "version": ("thinstore-containerd-snapshots 2 ", "thinstore-containerd-snapshots 9 ",
                      "version 9"),
          "truncate": (None, None, "cut short")}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_store_is_refused_not_guessed(tmp_path, damage):
    store = Store(str(tmp_path))
    with store.transaction() as body:
        body["snapshots"]["k"] = {"id": 1, "kind": "committed", "parent": "",
                                  "device": "ctd-1@c", "labels": {}, "created": 1,
                                  "updated": 1}
    with open(store.path, "rb") as f:
        raw = f.read()
    old, new, why = DAMAGE[damage]
    raw = raw[:len(raw) // 2] if old is None else raw.replace(old.encode(), new.encode(), 1)
    with open(store.path, "wb") as f:
        f.write(raw)
    with pytest.raises(CorruptMetadata, match=f"snapshots.json.*{why}"):
        Store(str(tmp_path))


# ------------------------------------------------------------ filters
INFO = {"name": "sha256:abc", "parent": "", "kind": "committed",
        "labels": {"containerd.io/gc.root": "x", "foo": "bar"}}


@pytest.mark.parametrize("filters,expected", [
    ([], True),
    (["name==sha256:abc"], True),
    (["kind==active"], False),
    (["kind==active", "name~=^sha"], True),                 # any one filter
    (['labels."containerd.io/gc.root"'], True),            # present
    (["labels.missing"], False),
    (["labels.foo~=^ba", "kind==view"], True),
    (["kind==committed,labels.foo==baz"], False),          # all selectors
    (['parent!=""'], False),
    (['name=="sha256:abc"'], True),
])
def test_filters_follow_containerds_syntax(filters, expected):
    assert compile_filters(filters)(INFO) is expected


@pytest.mark.parametrize("bad", ["bogus==1", "name==a,", 'labels."x', "labels.foo~=(", "==x"])
def test_a_bad_filter_is_a_usage_error(bad):
    with pytest.raises(UsageError):
        compile_filters([bad])


# ------------------------------------------------------------ base size
@pytest.mark.parametrize("size,words", [("1M", "ext4 needs at least 2M"),
                                        ("1P", "writes about")])
def test_a_base_size_its_file_system_cannot_take_is_refused_at_start(tmp_path, size, words):
    """--base-size below what mkfs needs, or whose mkfs metadata would not fit the pool,
    stops the snapshotter at start with the reason, before any volume is made."""
    pool = str(tmp_path / "pool")
    env = dict(os.environ, PYTHONPATH=ROOT)
    run = [sys.executable, "-m", "thinstore", "--pool", pool]
    subprocess.run(run + ["init", "--capacity", "1G"], check=True, env=env)
    done = subprocess.run(run + ["snapshotter", "--address", str(tmp_path / "s.sock"),
                                 "--base-size", size], capture_output=True, text=True,
                          env=env, timeout=120)
    assert done.returncode != 0 and f"--base-size {size}: " in done.stderr \
        and words in done.stderr, done.stderr
    listed = subprocess.run(run + ["list", "-H", "-o", "name"], capture_output=True,
                            text=True, env=env, check=True).stdout
    assert listed.strip() == "", listed


# ------------------------------------------------------------ records kept elsewhere
def test_a_pool_whose_layer_records_are_elsewhere_is_refused_not_emptied(tmp_path):
    """The records file is local (a rados:// pool's is in the runtime directory of the
    host that served it; another --address or host, a cleaned /tmp): a snapshotter that
    starts without it on a pool holding layers refused to start; it used to destroy every
    layer as an orphan. With the file back, it serves them again."""
    from google.protobuf import empty_pb2
    from containerd_helpers import Backend, Snapshotter
    from nbd_helpers import need_loop_over_nbd
    need_loop_over_nbd()
    pool = str(tmp_path / "pool")
    env = dict(os.environ, PYTHONPATH=ROOT)
    subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, "init", "--capacity",
                    "256M"], check=True, env=env)
    snap = Snapshotter(pool, str(tmp_path / "s.sock"), "16M")
    snap.start()
    try:
        b = Backend(snap.address)
        b.call("Prepare", pb.PrepareSnapshotRequest(key="k1"), pb.PrepareSnapshotResponse)
        b.call("Commit", pb.CommitSnapshotRequest(name="layer1", key="k1"), empty_pb2.Empty)
        b.close()
    finally:
        snap.stop()
    records = os.path.join(pool, "containerd", "snapshots.json")
    os.rename(records, records + ".elsewhere")
    done = subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, "snapshotter",
                           "--address", str(tmp_path / "s.sock")], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "ctd-1@c" in done.stderr and "would destroy" in done.stderr, done.stderr
    listed = subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, "list", "-H",
                             "-o", "name"], capture_output=True, text=True, env=env).stdout
    assert "ctd-1@c" in listed.split()
    os.rename(records + ".elsewhere", records)
    snap.start()
    try:
        b = Backend(snap.address)
        assert list(b.list()) == ["layer1"]
        b.close()
    finally:
        snap.stop()


def test_a_users_own_volume_named_like_ctd_something_is_not_taken_for_a_layer(tmp_path):
    """Recovery at start and Cleanup destroy the snapshotter's devices that no record
    names; they took every device whose name began with 'ctd-', so a volume a user made
    beside the layers ('ctd-mine', and its snapshot) was destroyed at the next start."""
    from google.protobuf import empty_pb2
    from containerd_helpers import Backend, Snapshotter
    from nbd_helpers import need_loop_over_nbd
    need_loop_over_nbd()
    pool = str(tmp_path / "pool")
    env = dict(os.environ, PYTHONPATH=ROOT)
    ts = [sys.executable, "-m", "thinstore", "--pool", pool]
    subprocess.run(ts + ["init", "--capacity", "256M"], check=True, env=env)
    for args in (["create", "ctd-mine", "--size", "8M"], ["snapshot", "ctd-mine@keep"],
                 ["create", "ctd-7x", "--size", "8M"]):
        subprocess.run(ts + args, check=True, env=env, capture_output=True)
    snap = Snapshotter(pool, str(tmp_path / "s.sock"), "16M")
    snap.start()
    try:
        b = Backend(snap.address)
        b.call("Cleanup", pb.CleanupRequest(), empty_pb2.Empty)
        b.close()
        assert {"ctd-mine", "ctd-mine@keep", "ctd-7x"} <= set(snap.devices())
    finally:
        snap.stop()
