"""Fuzzing metadata loading with random corruption: only thinstore's own errors come out,
and every case ends in bounded time (hypothesis deadline).

Two kinds of damage: raw byte flips anywhere in ``meta`` (checksums must catch them),
and flips inside the root record *re-sealed* with fresh checksums, so the structural
checks behind the checksums are exercised too.
"""

from __future__ import annotations

import os
import shutil
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from integrity_helpers import make_pool

from thinstore import Pool
from thinstore import format as fmt
from thinstore.check import check_metadata
from thinstore.errors import ThinstoreError
from thinstore.salvage import salvage
from thinstore.storage import FileIO

FUZZ = settings(max_examples=300, deadline=3000, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


class Base(tuple):
    def __repr__(self) -> str:          # keep hypothesis reports short
        return f"Base({self[0]!r})"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzzbase")
    path = str(root / "pool")
    make_pool(path)
    with open(os.path.join(path, "meta"), "rb") as f:
        meta = f.read()
    used = [i for i in range(len(meta) // 4096) if any(meta[i * 4096:(i + 1) * 4096])]
    return Base((path, meta, used))


def _exercise(src: str, meta: bytes, work: str) -> None:
    """Open, read every device, salvage and check a pool whose meta is `meta`."""
    if os.path.exists(work):
        shutil.rmtree(work)
    os.makedirs(work)
    for name in ("data", "intent"):
        os.link(os.path.join(src, name), os.path.join(work, name))
    with open(os.path.join(work, "meta"), "wb") as f:
        f.write(meta)
    failed = _open_and_read(work)
    mfio = FileIO(os.path.join(work, "meta"), readonly=True)
    dfio = FileIO(os.path.join(work, "data"), readonly=True)
    try:
        sv = salvage(mfio, dfio)
        problems = list(sv.problems)
        if sv.md is not None:
            problems += check_metadata(sv.md)
    finally:
        mfio.close()
        dfio.close()
    if failed:           # what stops open or a read, check must report
        assert problems, f"open/read failed ({failed}) but check found nothing"


def _open_and_read(work: str) -> str | None:
    """Open the pool and read every device; the error that stopped it, if any."""
    try:
        pool = Pool.open(work, commit_interval=0)
    except ThinstoreError as e:
        return str(e)
    try:
        for d in pool.list():
            with pool.open_device(d.name) as dev:
                dev.pread(0, dev.size)
    except ThinstoreError as e:
        return str(e)
    finally:                                # never commit a damaged tree back
        pool._closed = True
        pool.md.meta_fio.close()
        pool.md.data_fio.close()
        pool._owner.release()


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 4095),
                                st.integers(1, 255)), min_size=1, max_size=8))
def test_random_byte_flips(base, tmp_path, flips):
    """Flips in blocks that hold something (superblocks, pages, leaves, root)."""
    src, meta, used = base
    buf = bytearray(meta)
    for block, pos, x in flips:
        buf[used[block % len(used)] * 4096 + pos] ^= x
    _exercise(src, bytes(buf), str(tmp_path / "w"))


def _reseal(meta: bytes, root: bytes) -> bytes:
    """Write `root` as the newest generation's root chain with valid checksums."""
    buf = bytearray(meta)
    sbs = sorted((fmt.unpack_superblock(buf[i * 4096:(i + 1) * 4096], i), i) for i in range(2))
    sb, slot = sbs[-1]
    loc, pieces = sb.root_location, [root[i:i + fmt.CHAIN_DATA]
                                     for i in range(0, len(root), fmt.CHAIN_DATA)] or [b""]
    locs = [loc] + [len(buf) // 4096 + i for i in range(len(pieces) - 1)]
    buf += bytes(4096 * (len(pieces) - 1))
    for i, piece in enumerate(pieces):
        block = bytearray(4096)
        payload = fmt.pack_chain_payload(locs[i + 1] if i + 1 < len(locs) else 0, piece)
        block[fmt.HEADER_SIZE:fmt.HEADER_SIZE + len(payload)] = payload
        buf[locs[i] * 4096:(locs[i] + 1) * 4096] = fmt.seal_block(block, fmt.BT_ROOT, locs[i],
                                                                   sb.generation)
    new = sb._replace(root_length=len(root), root_checksum=fmt.checksum(root))
    buf[slot * 4096:(slot + 1) * 4096] = fmt.pack_superblock(new)
    return bytes(buf)


def _root_of(meta: bytes) -> bytes:
    md_sb = max((fmt.unpack_superblock(meta[i * 4096:(i + 1) * 4096], i) for i in range(2)),
                key=lambda s: s.generation)
    out, loc = [], md_sb.root_location
    while loc:
        payload = fmt.open_block(meta[loc * 4096:(loc + 1) * 4096], fmt.BT_ROOT, loc)
        loc, data = fmt.unpack_chain_payload(payload)
        out.append(data)
    return b"".join(out)


@FUZZ
@given(edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from(
    [0x01, 0x80, 0xFF, 0x7F, 0x10])), min_size=1, max_size=6),
    cut=st.integers(0, 40))
def test_resealed_root_record_damage(base, tmp_path, edits, cut):
    src, meta, _ = base
    root = bytearray(_root_of(meta))
    for pos, x in edits:
        root[pos % len(root)] ^= x
    if cut:
        root = root[:-cut]
    _exercise(src, _reseal(meta, bytes(root)), str(tmp_path / "w"))


def test_reseal_helper_round_trips(base, tmp_path):
    src, meta, _ = base
    same = _reseal(meta, _root_of(meta))
    _exercise(src, same, str(tmp_path / "w"))
    assert struct.unpack_from("<I", same, 0)[0] == fmt.SB_MAGIC
