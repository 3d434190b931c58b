"""The integrity commands end to end: ``check``, ``repair``, ``dump``, ``restore``, ``scrub``
run as ``python -m thinstore`` against real pools; dump/restore round trips by hand."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from integrity_helpers import contents_of, CHUNK, chunk_of, flip, flip_block, flip_chunk, make_pool, \
    map_page_block

from thinstore import Pool
from thinstore.check import check_path
from thinstore.dump import dump_path, restore_path
from thinstore.errors import UsageError
from thinstore.format import BLOCK_SIZE
from thinstore.salvage import DAMAGE_CODES

ROOT = Path(__file__).resolve().parent.parent


def cli(pool, *args, stdin=None):
    env = {k: v for k, v in os.environ.items() if k not in ("THINSTORE_POOL", "THINSTORE_DEBUG")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-m", "thinstore", "--pool", str(pool), *args],
                          input=stdin, capture_output=True, text=True, env=env, timeout=120)


@pytest.fixture
def pool(tmp_path):
    path = str(tmp_path / "pool")
    return path, make_pool(path)


def test_check_clean_and_json(pool):
    path, _ = pool
    r = cli(path, "check")
    assert r.returncode == 0 and "clean" in r.stdout, r.stderr
    r = cli(path, "check", "--json")
    doc = json.loads(r.stdout)
    assert doc["clean"] and doc["info"]["devices"] == ["clone", "vol", "vol@snap"]


def test_check_exit_code_names_the_class_and_the_device(pool):
    path, _ = pool
    flip_block(path, map_page_block(path, "vol"))
    r = cli(path, "check")
    assert r.returncode == DAMAGE_CODES["metadata"]
    assert "device 'vol': bytes 0.." in r.stdout
    doc = json.loads(cli(path, "check", "--json").stdout)
    assert doc["exit_code"] == DAMAGE_CODES["metadata"]
    assert any(p.get("device") == "vol" for p in doc["problems"])


def test_superblock_damage_is_its_own_class(pool):
    path, _ = pool
    with Pool.open(path, commit_interval=0) as p:
        older = (p.md.generation + 1) % 2
    flip(os.path.join(path, "meta"), older * BLOCK_SIZE + 12)
    r = cli(path, "check")
    assert r.returncode == DAMAGE_CODES["superblock"] and f"slot {older}" in r.stdout
    r = cli(path, "repair")
    assert r.returncode == 0 and f"superblock slot {older}" in r.stdout
    assert cli(path, "check").returncode == 0          # the repair commit rewrote the slot


def test_repair_reports_changes_then_check_is_clean(pool):
    path, contents = pool
    flip_block(path, map_page_block(path, "vol"))
    r = cli(path, "repair", "--dry-run")
    assert r.returncode == 0 and "would change:" in r.stdout
    assert cli(path, "check").returncode == DAMAGE_CODES["metadata"]     # dry run: unchanged
    r = cli(path, "repair")
    assert r.returncode == 0 and "changed: metadata: device 'vol'" in r.stdout, r.stdout
    assert cli(path, "check").returncode == 0
    assert cli(path, "repair").stdout.strip() == "nothing to repair"
    assert contents_of(path)["clone"] == contents["clone"]


def test_repair_refuses_while_a_process_holds_the_pool(pool):
    path, _ = pool
    with Pool.open(path, commit_interval=0):
        r = cli(path, "repair", "--no-wait")
    assert r.returncode == 5 and "in use by process" in r.stderr


def test_scrub_cli_names_devices_and_exits_11(pool):
    path, _ = pool
    c = chunk_of(path, "vol", 2)
    assert cli(path, "scrub").returncode == 0
    flip_chunk(path, c)
    r = cli(path, "scrub", "--progress")
    assert r.returncode == 11
    assert f"chunk {c}" in r.stdout and "vol@snap at byte 8192" in r.stdout
    assert "clone at byte 8192" in r.stdout and "scrub [" in r.stderr
    doc = json.loads(cli(path, "scrub", "--json").stdout)
    assert doc["damaged"][0]["chunk"] == c and len(doc["damaged"][0]["users"]) == 3


def test_read_of_bad_chunk_over_cli_fails_with_checksum_exit(pool, tmp_path):
    path, _ = pool
    flip_chunk(path, chunk_of(path, "vol", 2))
    r = cli(path, "export", "vol", str(tmp_path / "out.img"))
    assert r.returncode == 11 and "does not match its checksum" in r.stderr


def test_dump_text_and_json_restore_round_trip(pool, tmp_path):
    path, contents = pool
    text = cli(path, "dump").stdout
    assert "device 1 vol volume" in text and "virtual 0..9 -> chunk" in text
    out = tmp_path / "dump.json"
    assert cli(path, "dump", "--json", "-o", str(out)).returncode == 0
    doc = json.loads(out.read_text())
    assert {d["name"] for d in doc["devices"]} == {"vol", "vol@snap", "clone"}
    os.unlink(os.path.join(path, "meta"))           # lose the metadata altogether
    open(os.path.join(path, "meta"), "wb").close()
    assert cli(path, "check").returncode == DAMAGE_CODES["unreadable"]
    r = cli(path, "restore", str(out))
    assert r.returncode == 0, r.stderr
    assert cli(path, "check").returncode == 0
    assert contents_of(path) == contents


def test_dump_keeps_shared_pages_shared(pool):
    path, _ = pool
    doc, problems = dump_path(path)
    assert not problems
    dirs = {d["name"]: d["directory"] for d in doc["devices"]}
    assert dirs["vol@snap"] == dirs["clone"] != dirs["vol"]
    restore_path(path, doc)
    with Pool.open(path, commit_interval=0) as p:
        assert int(p.md.maps.ref.max()) == 2       # the snap/clone page still shared


def test_hand_edited_dump_mends_a_pool(pool):
    """Drop a device and one mapping by editing the JSON; restore applies exactly that."""
    path, contents = pool
    doc, _ = dump_path(path)
    doc["devices"] = [d for d in doc["devices"] if d["name"] != "clone"]
    vol = next(d for d in doc["devices"] if d["name"] == "vol")
    page = doc["pages"][str(vol["directory"][0][1])]
    slot0 = page[0]
    page[0] = [slot0[0] + 1, slot0[1] + 1, slot0[2] - 1]     # unmap vol's chunk 0
    restore_path(path, doc)
    assert check_path(path).clean
    after = contents_of(path)
    assert set(after) == {"vol", "vol@snap"}
    assert after["vol"][:CHUNK] == bytes(CHUNK)
    assert after["vol"][CHUNK:] == contents["vol"][CHUNK:]
    assert os.path.exists(os.path.join(path, "meta.old"))


@pytest.mark.parametrize("damage", [
    lambda d: d.update(format="other"),
    lambda d: d["pages"].update({"1": [[500, 1, 20]]}),
    lambda d: d["devices"][0]["directory"].append([0, 99999]),
    lambda d: d["pool"].update(chunk_size=3000),
    lambda d: d["devices"][0].pop("size"),
    lambda d: d["devices"][0]["directory"].append([0, 77]),      # a page the dump lacks
    lambda d: d["pages"].update({"1": [[0, 1, 0]]}),
])
def test_restore_rejects_malformed_dumps_and_keeps_the_pool(pool, damage):
    path, contents = pool
    doc, _ = dump_path(path)
    damage(doc)
    with pytest.raises(UsageError, match="restore"):
        restore_path(path, doc)
    assert contents_of(path) == contents


def test_restore_cli_reads_stdin_and_rejects_garbage(pool):
    path, contents = pool
    r = cli(path, "restore", "-", stdin="not json")
    assert r.returncode == 2 and "not valid JSON" in r.stderr
    doc = cli(path, "dump", "--json").stdout
    assert cli(path, "restore", "-", stdin=doc).returncode == 0
    assert contents_of(path) == contents


def test_init_turns_checksums_off_only_when_asked(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    assert cli(on, "init", "--capacity", "16M").returncode == 0
    assert cli(off, "init", "--capacity", "16M", "--no-data-checksums").returncode == 0
    assert json.loads(cli(on, "status", "--json").stdout)["data_checksums"] is True
    assert json.loads(cli(off, "status", "--json").stdout)["data_checksums"] is False


def test_dump_of_a_damaged_pool_warns_and_keeps_the_rest(pool):
    path, _ = pool
    flip_block(path, map_page_block(path, "vol"))
    r = cli(path, "dump", "--json")
    assert r.returncode == 0 and "warning: metadata: device 'vol'" in r.stderr
    doc = json.loads(r.stdout)
    dirs = {d["name"]: d["directory"] for d in doc["devices"]}
    assert dirs["vol"] == [] and dirs["vol@snap"] and dirs["clone"]
