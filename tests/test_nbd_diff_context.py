"""The thinstore:diff:BASE meta context: nbdinfo --map and qemu-img map show the
ranges `thinstore diff` lists, and a query costs the pages that differ."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from thinstore.control import ControlServer
from thinstore.nbd import protocol as P
from nbd_helpers import (ROOT, SYSTEM_PYTHON, MiB, RawClient, cli, meta_request, need,
                         need_libnbd_python, run, served)

GiB = 1 << 30
CS = 64 << 10
SPAN = 508 * CS                   # bytes one map page covers


@pytest.fixture(scope="module")
def srv():
    """A served pool: `big` (64 GiB, sparse, a few scattered changes between big@a and
    big@b) and `small` (8 MiB of data, changes of several kinds between small@a and small@b)."""
    with served(capacity=1 * GiB, chunk_size=CS) as s:
        control = ControlServer(s.pool, s.server, nbd_socket=s.sock)
        control.listen()
        pool = s.pool
        rng = np.random.default_rng(7)
        pool.create_volume("big", 64 * GiB)
        with pool.open_device("big") as dev:
            for off in (0, 5 * GiB, 40 * GiB + 12345, 63 * GiB):
                dev.pwrite(rng.bytes(100_000), off)
        pool.snapshot("big@a")
        with pool.open_device("big") as dev:
            for off in (1 * MiB, 5 * GiB, 33 * GiB, 64 * GiB - CS):
                dev.pwrite(rng.bytes(70_000) if off < 64 * GiB - CS else rng.bytes(CS), off)
        pool.snapshot("big@b")
        pool.create_volume("small", 8 * MiB)
        with pool.open_device("small") as dev:
            dev.pwrite(rng.bytes(8 * MiB), 0)
        pool.snapshot("small@a")
        with pool.open_device("small") as dev:
            dev.pwrite(rng.bytes(100), 3 * CS + 7)           # part of one chunk
            dev.pwrite(rng.bytes(3 * CS), 10 * CS)            # three whole chunks
            dev.discard(20 * CS, 2 * CS)                      # data -> hole
            dev.pwrite(rng.bytes(CS + 1), 8 * MiB - CS - 1)   # the last chunk and one before
        pool.snapshot("small@b")
        yield s
        control.shutdown()


def diff_ranges(srv, a: str, b: str) -> list[tuple[int, int]]:
    """`thinstore diff` through the control socket, as (offset, length) pairs."""
    out = cli("--pool", srv.pool.path, "diff", "--json", a, b).stdout
    return [(r["offset"], r["length"]) for r in json.loads(out)["ranges"]]


def nbdinfo_map(srv, export: str, base: str) -> list[tuple[int, int, int]]:
    out = run(["nbdinfo", f"--map=thinstore:diff:{base}", srv.uri(export)]).stdout
    return [tuple(int(x) for x in line.split()[:3]) for line in out.splitlines()]


def changed(extents) -> list[tuple[int, int]]:
    """Coalesced (offset, length) of the extents flagged 1 (changed)."""
    out: list[list[int]] = []
    for off, n, flags in extents:
        if not flags & 1:
            continue
        if out and out[-1][0] + out[-1][1] == off:
            out[-1][1] += n
        else:
            out.append([off, n])
    return [tuple(r) for r in out]


def test_nbdinfo_map_of_a_64g_volume_lists_what_diff_lists_at_the_cost_of_the_change(srv):
    need("nbdinfo")
    counters = srv.server.catalog.diff_counters
    before = counters.pages_compared
    extents = nbdinfo_map(srv, "big@b", "big@a")
    compared = counters.pages_compared - before
    want = diff_ranges(srv, "big@a", "big@b")
    assert len(want) == 4
    assert changed(extents) == want
    assert sum(n for _, n, _ in extents) == 64 * GiB, "the whole export is described"
    pages = {off // SPAN for off, n in want} | {(off + n - 1) // SPAN for off, n in want}
    # a page is read only where the two maps differ; one that straddles the end of
    # one BLOCK_STATUS request and the start of the next is read twice at most
    assert len(pages) <= compared <= 2 * len(pages)
    assert compared < (64 * GiB // SPAN) // 100, "not a walk of the 2065 pages of the volume"


def test_the_diff_of_a_small_volume_is_exactly_its_changed_chunks(srv):
    need("nbdinfo")
    with srv.pool.open_device("small@a") as a, srv.pool.open_device("small@b") as b:
        old, new = a.pread(0, 8 * MiB), b.pread(0, 8 * MiB)
    differ = np.frombuffer(old, np.uint8).reshape(-1, CS) != np.frombuffer(new, np.uint8).reshape(-1, CS)
    chunks = np.flatnonzero(differ.any(axis=1))
    extents = nbdinfo_map(srv, "small@b", "small@a")
    flagged = [c for off, n, flags in extents if flags & 1 for c in range(off // CS, (off + n) // CS)]
    assert flagged == chunks.tolist()
    assert changed(extents) == diff_ranges(srv, "small@a", "small@b")
    # the same question asked of the live volume, not of its snapshot
    assert changed(nbdinfo_map(srv, "small", "small@a")) == changed(extents)
    assert changed(nbdinfo_map(srv, "small@a", "small@a")) == []


def test_qemu_img_map_with_x_dirty_bitmap_shows_the_same_ranges(srv):
    """qemu reads the context as if it were base:allocation: bit 0 (changed) is its
    HOLE bit, so changed ranges come out as "data": false (and present false)."""
    need("qemu-img")
    opts = (f"driver=nbd,export=small@b,server.type=unix,server.path={srv.sock},"
            "x-dirty-bitmap=thinstore:diff:small@a")
    out = run(["qemu-img", "map", "--output=json", "--image-opts", opts]).stdout
    extents = [(e["start"], e["length"], 0 if e["data"] else 1) for e in json.loads(out)]
    assert changed(extents) == diff_ranges(srv, "small@a", "small@b")
    assert sum(n for _, n, _ in extents) == 8 * MiB


def test_list_offers_the_volume_s_snapshots_and_set_takes_any_snapshot(srv):
    c = RawClient(srv.sock)
    try:
        c.greet()
        c.option(P.Opt.STRUCTURED_REPLY)

        def contexts(option, export, queries):
            replies = c.option(option, meta_request(export, queries))
            assert replies[-1][0] == P.Rep.ACK, replies
            return [(int.from_bytes(p[:4], "big"), p[4:].decode()) for k, p in replies[:-1]]

        listed = contexts(P.Opt.LIST_META_CONTEXT, "small", [])
        assert listed == [(0, "base:allocation"), (0, "thinstore:diff:small@a"),
                          (0, "thinstore:diff:small@b")]
        assert contexts(P.Opt.LIST_META_CONTEXT, "small@b", ["thinstore:diff:"]) == [
            (0, "thinstore:diff:small@a")]
        assert contexts(P.Opt.LIST_META_CONTEXT, "small", ["base:"]) == [(0, "base:allocation")]
        chosen = contexts(P.Opt.SET_META_CONTEXT, "small",
                          ["thinstore:diff:big@a", "thinstore:diff:nope", "base:allocation",
                           "thinstore:diff:small"])         # a volume is no base
        assert chosen == [(2, "thinstore:diff:big@a"), (1, "base:allocation")]
    finally:
        c.close()


def test_block_status_answers_every_negotiated_context(srv):
    c = RawClient(srv.sock)
    try:
        c.greet()
        c.option(P.Opt.STRUCTURED_REPLY)
        c.option(P.Opt.SET_META_CONTEXT,
                 meta_request("small@b", ["base:allocation", "thinstore:diff:small@a"]))
        c.go("small@b", meta=False)
        c.request(P.Cmd.BLOCK_STATUS, 0, 8 * MiB, cookie=9)
        cookie, chunks = c.structured_reply()
    finally:
        c.close()
    assert cookie == 9 and [k for k, _ in chunks] == [P.REPLY_TYPE_BLOCK_STATUS] * 2
    by_id = {}
    for _, payload in chunks:
        cid = int.from_bytes(payload[:4], "big")
        body = payload[4:]
        by_id[cid] = [(int.from_bytes(body[i:i + 4], "big"), int.from_bytes(body[i + 4:i + 8], "big"))
                      for i in range(0, len(body), 8)]
    assert set(by_id) == {1, 2}
    assert (2 * CS, P.STATE_HOLE | P.STATE_ZERO) in by_id[1], "the trimmed chunks"
    pos, ranges = 0, []
    for n, flags in by_id[2]:
        if flags == 1:
            ranges.append((pos, n))
        pos += n
    assert ranges == diff_ranges(srv, "small@a", "small@b")


def test_a_destroyed_base_gets_an_error_not_a_wrong_answer(srv):
    pool = srv.pool
    pool.snapshot("small@gone")
    c = RawClient(srv.sock)
    try:
        c.greet()
        c.option(P.Opt.STRUCTURED_REPLY)
        c.option(P.Opt.SET_META_CONTEXT, meta_request("small", ["thinstore:diff:small@gone"]))
        c.go("small", meta=False)
        pool.destroy("small@gone")
        c.request(P.Cmd.BLOCK_STATUS, 0, MiB, cookie=3)
        _, chunks = c.structured_reply()
    finally:
        c.close()
    assert chunks[-1][0] == P.REPLY_TYPE_ERROR
    assert int.from_bytes(chunks[-1][1][:4], "big") == P.EIO
    assert b"small@gone" in chunks[-1][1]


def test_an_image_brought_up_to_date_by_copying_only_the_diff_ranges(srv, tmp_path):
    """docs/replication.md's third way: tools/nbd_diff_copy.py (libnbd) on small@b."""
    need_libnbd_python()
    image = tmp_path / "small.img"
    cli("--pool", srv.pool.path, "export", "small@a", str(image))
    out = system_python_file(os.path.join(ROOT, "tools", "nbd_diff_copy.py"),
                             srv.uri("small@b"), "small@a", str(image)).stdout
    with srv.pool.open_device("small@b") as b:
        assert image.read_bytes() == b.pread(0, 8 * MiB)
    copied = sum(n for _, n in diff_ranges(srv, "small@a", "small@b"))
    assert out.split() == ["copied", str(copied), "of", str(8 * MiB), "bytes"]


def system_python_file(path: str, *args: str):
    return run([SYSTEM_PYTHON, path, *args])


def test_a_volume_of_many_snapshots_lists_the_diff_namespace_once(tmp_path):
    """'nbdinfo --list' asks every export's contexts with no query: one record per other
    snapshot made it N^2 records for a volume of N snapshots (3,000: nine million, and
    the listing died at the handshake's time limit). Past 64 snapshots the diff contexts
    are listed as their namespace alone; each is still selected by its full name."""
    need("nbdinfo")
    with served(capacity=256 * MiB, chunk_size=CS) as s:
        pool = s.pool
        pool.create_volume("many", 4 * MiB)
        with pool.open_device("many") as dev:
            dev.pwrite(b"a" * CS, 0)
        with pool.batch():
            for i in range(100):
                pool.snapshot(f"many@s{i:03d}")
        with pool.open_device("many") as dev:
            dev.pwrite(b"b" * CS, 2 * CS)
        listed = json.loads(run(["nbdinfo", "--list", "--json", s.uri("")]).stdout)
        exports = {e["export-name"]: e["contexts"] for e in listed["exports"]}
        assert len(exports) == 101
        assert exports["many@s050"] == ["base:allocation", "thinstore:diff:"]
        extents = nbdinfo_map(s, "many", "many@s007")
        assert changed(extents) == [(2 * CS, CS)]
