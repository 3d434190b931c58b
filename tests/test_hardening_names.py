"""Names and hidden devices (issue 10, items 4 and 5): a receive's workspace lives where no
user name reaches, a volume with a pending receive is neither destroyed nor renamed
from under it, the space it holds is accounted for, and LIST answers for thousands of
devices."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import uuid

import pytest

from thinstore import Pool
from thinstore import dump, names, replication as RP
from thinstore.errors import StreamTruncated
from hardening_helpers import M, Serve, fails, out, short_dir, ts
from nbd_helpers import need


@pytest.fixture
def pool():
    d = short_dir()
    path = os.path.join(d, "pool")
    out("init", "--capacity", "256M", pool=path)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def test_a_user_volume_may_be_named_like_an_old_workspace(pool, monkeypatch):
    with Pool.open(pool) as p:
        p.create_volume("src", 4 * M)
        p.snapshot("src@a")
        # new names may not start with '.' (names.py); a pool from before that rule may
        # hold one
        monkeypatch.setattr(names, "check_new_name", lambda n: names.check_name(n))
        p.create_volume(".receive.vol", M)
        monkeypatch.undo()
    stream = os.path.join(os.path.dirname(pool), "s")
    out("send", "src@a", "-o", stream, pool=pool)
    out("receive", "vol", "-i", stream, pool=pool)
    listed = {d["name"] for d in json.loads(out("list", "--json", pool=pool))["devices"]}
    assert {".receive.vol", "vol", "vol@a"} <= listed
    out("destroy", ".receive.vol", pool=pool)


@pytest.fixture
def pending(pool):
    """vol@a received; an incremental stream to vol@b cut off: pending (set up in-process,
    faster than the CLI; the commands under test run as a user types them)."""
    with Pool.open(pool) as p:
        p.create_volume("src", 16 * M)
        with p.open_device("src") as dev:
            dev.pwrite(b"a" * M, 0)
        p.snapshot("src@a")
        full = io.BytesIO()
        RP.send(p, "src@a", full)
        RP.receive(p, "vol", io.BytesIO(full.getvalue()))
        with p.open_device("src") as dev:
            dev.pwrite(os.urandom(9 * M), 2 * M)
        p.snapshot("src@b")
        inc = io.BytesIO()
        RP.send(p, "src@b", inc, "src@a")
        with pytest.raises(StreamTruncated):
            RP.receive(p, "vol", io.BytesIO(inc.getvalue()[:len(inc.getvalue()) * 3 // 4]))
    with open(os.path.join(os.path.dirname(pool), "inc"), "wb") as f:
        f.write(inc.getvalue())
    return pool


def test_destroy_and_rename_of_a_volume_with_a_pending_receive_refuse_with_the_fix(pending):
    for args in (("destroy", "--force", "vol"), ("rename", "vol", "v2")):
        err = fails(5, *args, pool=pending)
        assert "receive into 'vol' is pending" in err and "--abort vol" in err, err
    with Pool.open(pending) as p:
        assert p.info("vol").name == "vol"
    out("receive", "--abort", "vol", pool=pending)
    out("rename", "vol", "v2", pool=pending)


def test_user_names_never_meet_a_workspace(pending):
    # the old workspace name: no new name starts with '.' (an older pool's may: see above)
    assert "may not start with '.'" in fails(2, "create", ".receive.vol", "--size", "1M",
                                             pool=pending)
    fails(2, "create", "%receive/vol", "--size", "1M", pool=pending)
    fails(2, "destroy", "%receive/vol", pool=pending)
    with Pool.open(pending) as p:                   # a full receive into a new name, cut
        full = io.BytesIO()
        RP.send(p, "src@a", full)
        with pytest.raises(StreamTruncated):
            RP.receive(p, "fresh", io.BytesIO(full.getvalue()[:len(full.getvalue()) // 2]))
    for args in (("create", "fresh", "--size", "1M"), ("clone", "src@a", "fresh")):
        assert "receive into 'fresh' is pending" in fails(5, *args, pool=pending)


def test_status_and_list_account_for_what_a_pending_receive_holds(pending):
    status = json.loads(out("status", "--json", pool=pending))
    assert status["pending_receives"]["vol"] >= 4 * M   # most of 9M applied before the cut
    text = out("status", pool=pending)
    assert "pending receives:" in text and "vol (" in text and "held" in text
    listed = ts("list", pool=pending)
    assert listed.returncode == 0
    note = listed.stderr.decode()
    assert "interrupted receives into vol (" in note and "--abort" in note
    out("receive", "--abort", "vol", pool=pending)
    assert json.loads(out("status", "--json", pool=pending))["pending_receives"] == {}
    assert ts("list", pool=pending).stderr == b""


def test_resume_after_the_refused_destroy_finishes_the_receive(pending):
    fails(5, "destroy", "vol", pool=pending)
    d = os.path.dirname(pending)
    out("receive", "--resume", "vol", "-i", f"{d}/inc", pool=pending)
    assert json.loads(out("status", "--json", pool=pending))["pending_receives"] == {}
    out("destroy", "vol", pool=pending)


def test_nbdinfo_lists_five_thousand_devices(pool):
    """The options cap (4,096 per connection) stopped 'nbdinfo --list' at 2,048 devices.
    The devices come from a metadata dump restored in one step (5,000 creates would
    commit 5,000 times)."""
    need("nbdinfo")
    doc, _problems = dump.dump_path(pool)
    template = {"created_ns": 0, "directory": [], "flags": 0, "kind": "volume",
                "origin_uuid": "0" * 32, "size": M}
    doc["devices"] = [dict(template, id=i + 1, name=f"vol{i:04d}", uuid=uuid.uuid4().hex)
                      for i in range(5000)]
    doc["pool"]["next_dev_id"] = 5001
    dump.restore_path(pool, doc)
    server = Serve(pool)
    try:
        listed = subprocess.run(["nbdinfo", "--list", f"nbd+unix:///?socket={pool}/nbd.sock"],
                                capture_output=True, text=True, timeout=300)
    finally:
        server.stop()
    assert listed.returncode == 0, listed.stderr[-500:]
    names = [line for line in listed.stdout.splitlines() if line.startswith("export=")]
    assert len(names) == 5000 and names[-1] == 'export="vol4999":'
