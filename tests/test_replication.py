"""Diff, send and receive between real pools, through the Python API and the CLI.

What a user would notice: received snapshots read exactly as their sources, holes stay
holes, a diff costs what changed, and every bad stream is refused leaving the target
pool as it was (or resumable, when the stream was only cut off).
"""

import io
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import ROOT, pattern
from thinstore import Pool, replication as RP, resume as R, stream as S
from thinstore.storage import runtime_dir
from thinstore.errors import DeviceBusy, DeviceExists, StreamError, StreamTruncated, UsageError

MiB = 1 << 20
GiB = 1 << 30
CS = 64 << 10
VOL = 32 * MiB
SNAPS = ["s1", "s2", "s3", "s4", "s5"]


def new_pool(path, capacity=512 * MiB):
    return Pool.create(str(path), capacity, CS, commit_interval=0)


def random_history(pool, name="v", writes=200, seed=7):
    """200 random writes (and some discards) across snapshots s1..s5."""
    rng = np.random.default_rng(seed)
    pool.create_volume(name, VOL)
    per = writes // len(SNAPS)
    with pool.open_device(name) as dev:
        for i, snap in enumerate(SNAPS):
            for j in range(per):
                off = int(rng.integers(0, VOL - 200_000))
                n = int(rng.integers(1, 200_000))
                if j % 10 == 9:
                    dev.discard(off, n)
                else:
                    dev.pwrite(pattern(i * 1000 + j, n), off)
            pool.snapshot(f"{name}@{snap}")


def stream_of(pool, snap, base=None):
    out = io.BytesIO()
    RP.send(pool, snap, out, base)
    return out.getvalue()


def content(pool, name):
    with pool.open_device(name) as dev:
        return dev.pread(0, dev.size)


def holes(pool, name):
    with pool.open_device(name) as dev:
        return [(o, n) for o, n, mapped in dev.extents(0, dev.size) if not mapped]


def covered(ranges, offset, length):
    return any(o <= offset and offset + length <= o + n for o, n in ranges)


def state(pool, path):
    """What a user sees of a pool: devices, their contents' digests, pending tokens."""
    devs = {i.name: (i.kind, i.size, i.uuid, hash(content(pool, i.name))) for i in pool.list()}
    tokens = sorted(os.listdir(os.path.join(pool.local_dir, "resume"))) if os.path.isdir(
        os.path.join(pool.local_dir, "resume")) else []
    return devs, [t for t in tokens if t.endswith(".json")]


@pytest.fixture
def src(pool_location):
    pool = new_pool(pool_location("src"))
    random_history(pool)
    yield pool
    pool.close()


@pytest.fixture
def dst_path(pool_location):
    return pool_location("dst")


@pytest.fixture
def dst(dst_path):
    pool = new_pool(dst_path)
    yield pool
    pool.close()


# --- 1. round trip ----------------------------------------------------------------------


def test_full_then_incrementals_reproduce_every_snapshot(src, dst):
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s1")))
    for prev, snap in zip(SNAPS, SNAPS[1:]):
        RP.receive(dst, "w", io.BytesIO(stream_of(src, f"v@{snap}", f"v@{prev}")))
    for snap in SNAPS:
        assert content(dst, f"w@{snap}") == content(src, f"v@{snap}"), snap
        for off, n in holes(src, f"v@{snap}"):
            assert covered(holes(dst, f"w@{snap}"), off, n), (snap, off, n)
        assert dst.info(f"w@{snap}").uuid == src.info(f"v@{snap}").uuid
    assert content(dst, "w") == content(src, "v@s5")
    assert [i.name for i in dst.list()] == ["w"] + [f"w@{s}" for s in SNAPS]


def test_incremental_stream_is_proportional_to_the_change(src):
    full = stream_of(src, "v@s5")
    inc = stream_of(src, "v@s5", "v@s4")
    changed = RP.diff(src, "v@s5", "v@s4").changed_bytes
    assert len(inc) < len(full) / 2
    assert len(inc) <= changed + 200 * (S.RECORD.size + 64)


def test_received_snapshot_is_shared_not_copied(src, dst):
    """Unchanged data of an incremental receive stays shared with the base."""
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s1")))
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s2", "v@s1")))
    assert dst.info("w@s1").exclusive < dst.info("w@s1").used


# --- 2. piping between processes -------------------------------------------------------


def cli_env():
    """This tree, the caller's backend choice; not its pool or debug settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("THINSTORE_POOL", "THINSTORE_DEBUG")}
    return dict(env, PYTHONPATH=ROOT)


def cli(*args, **kw):
    if "stdout" not in kw:
        kw["capture_output"] = True
    return subprocess.run([sys.executable, "-m", "thinstore", *args], env=cli_env(),
                          timeout=120, **kw)


def pipe(src_path, send_args, dst_path, recv_args):
    """`thinstore send ... | thinstore receive ...`: two processes, one pipe, no file."""
    env = cli_env()
    cmd = [sys.executable, "-m", "thinstore"]
    sender = subprocess.Popen(cmd + ["--pool", src_path, "send", *send_args],
                              stdout=subprocess.PIPE, env=env)
    receiver = subprocess.run(cmd + ["--pool", dst_path, "receive", *recv_args],
                              stdin=sender.stdout, capture_output=True, env=env, timeout=120)
    sender.stdout.close()
    assert sender.wait(timeout=120) == 0
    return receiver


def test_send_pipes_into_receive(src, tmp_path, pool_location):
    src_path = src.path
    expect = {s: content(src, f"v@{s}") for s in ("s1", "s2", "s3")}
    src.close()
    dst_path = pool_location("dst")
    assert cli("--pool", dst_path, "init", "--capacity", "512M").returncode == 0
    r = pipe(src_path, ["v@s1"], dst_path, ["w"])
    assert r.returncode == 0, r.stderr
    r = pipe(src_path, ["v@s3", "--from", "@s1"], dst_path, ["w"])
    assert r.returncode == 0, r.stderr
    assert r.stderr == b""  # quiet when piped: no progress bar
    with Pool.open(dst_path) as dst:
        assert content(dst, "w@s1") == expect["s1"]
        assert content(dst, "w@s3") == expect["s3"] == content(dst, "w")


# --- 3. diff ----------------------------------------------------------------------------


def test_diff_of_a_64g_volume_touches_only_differing_pages(tmp_path):
    pool = new_pool(tmp_path / "p", 256 * MiB)
    pool.create_volume("big", 64 * GiB)
    page_span = 508 * CS  # bytes one map page covers
    with pool.open_device("big") as dev:
        for k in range(0, 2000, 7):  # data in 286 different pages
            dev.pwrite(pattern(k, 4096), k * page_span + 12345)
        pool.snapshot("big@a")
        for k in (14, 700, 1995):  # three chunks change, in two pages
            dev.pwrite(pattern(10_000 + k, 100), k * page_span + 70)
        pool.snapshot("big@b")
    result = RP.diff(pool, "big@a", "big@b")
    c = result.counters
    assert c.pages_compared == 3 and c.pages_skipped == 286 - 3
    assert c.chunks_changed == 3 and c.slots == 64 * GiB // page_span + 1
    assert [(r.offset, r.length) for r in result.ranges] == [
        (k * page_span, CS) for k in (14, 700, 1995)]
    pool.close()
    with Pool.open(str(tmp_path / "p"), commit_interval=0) as pool:  # pages load lazily
        before = pool.md.maps.counters["pages_read"]
        assert RP.diff(pool, "big@a", "big@b").ranges == result.ranges
        assert pool.md.maps.counters["pages_read"] - before == 2 * 3  # 3 pages each side


def test_diff_equals_a_byte_by_byte_comparison(src):
    a, b = content(src, "v@s2"), content(src, "v@s4")
    differ = {i for i in range(VOL // CS) if a[i * CS:(i + 1) * CS] != b[i * CS:(i + 1) * CS]}
    found = set()
    for r in RP.diff(src, "v@s2", "v@s4").ranges:
        found.update(range(r.offset // CS, (r.offset + r.length) // CS))
    assert found == differ and differ


def test_diff_without_b_is_everything_allocated(src):
    with src.open_device("v@s3") as dev:
        mapped = [(o, n) for o, n, m in dev.extents(0, dev.size) if m]
    ranges = RP.diff(src, "v@s3").ranges
    assert [(r.offset, r.length) for r in ranges] == mapped
    assert all(r.a_mapped and not r.b_mapped for r in ranges)


def test_diff_cli_json(src):
    path = src.path
    expect = RP.diff(src, "v@s1", "v").to_dict()
    src.close()
    r = cli("--pool", path, "diff", "v@s1", "v", "--json")
    assert r.returncode == 0, r.stderr
    import json
    assert json.loads(r.stdout) == expect
    table = cli("--pool", path, "diff", "v@s1", "v", "-p").stdout.decode().splitlines()
    assert table[0].split() == ["OFFSET", "LENGTH", "A", "B"]
    assert len(table) == len(expect["ranges"]) + 1


def test_diff_cli_says_when_there_is_no_difference(src):
    """Equal devices: a sentence in text mode (not a lone header), an empty list in JSON."""
    path = src.path
    src.create_volume("empty", VOL)
    src.close()
    for extra in ([], ["-p"]):
        r = cli("--pool", path, "diff", "v@s2", "v@s2", *extra)
        assert r.returncode == 0, r.stderr
        assert r.stdout.decode() == "no differences between v@s2 and v@s2\n"
    r = cli("--pool", path, "diff", "empty")
    assert r.stdout.decode() == "nothing allocated in empty\n"
    r = cli("--pool", path, "diff", "v@s2", "v@s2", "--json")
    assert json.loads(r.stdout)["ranges"] == [] and json.loads(r.stdout)["changed_bytes"] == 0


# --- 4. refusals ------------------------------------------------------------------------


def test_incremental_onto_the_wrong_base_is_refused(src, dst, dst_path):
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s1")))
    before = state(dst, dst_path)
    with pytest.raises(StreamError, match="wrong base"):
        RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s3", "v@s2")))
    assert state(dst, dst_path) == before


def test_incremental_into_a_volume_without_its_base_is_refused(src, dst):
    with pytest.raises(StreamError, match="receive a full stream first"):
        RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s2", "v@s1")))
    assert dst.list() == []


def test_changed_target_needs_force(src, dst):
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s1")))
    with dst.open_device("w") as dev:
        dev.pwrite(b"local change", 0)
    inc = stream_of(src, "v@s2", "v@s1")
    with pytest.raises(UsageError, match="has changed since 'w@s1'"):
        RP.receive(dst, "w", io.BytesIO(inc))
    RP.receive(dst, "w", io.BytesIO(inc), force=True)
    assert content(dst, "w") == content(src, "v@s2")


def test_full_stream_into_an_existing_volume_is_refused(src, dst):
    data = stream_of(src, "v@s1")
    RP.receive(dst, "w", io.BytesIO(data))
    with pytest.raises(DeviceExists):
        RP.receive(dst, "w", io.BytesIO(data))


def cut_points(data):
    """Offsets inside the header, at and inside records, and just before the trailer."""
    return [10, S.header_len(S.read_header(io.BytesIO(data))) + 20, len(data) // 3,
            len(data) // 2, len(data) - 60]


@pytest.mark.parametrize("which", range(5))
def test_truncated_stream_leaves_nothing_and_resume_finishes(src, dst, dst_path, which):
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s1")))
    data = stream_of(src, "v@s3", "v@s1")
    cut = cut_points(data)[which]
    before = state(dst, dst_path)
    with pytest.raises(StreamTruncated):
        RP.receive(dst, "w", io.BytesIO(data[:cut]))
    devs, tokens = state(dst, dst_path)
    assert devs == before[0]  # nothing half-made is visible
    if not tokens:  # cut inside the header: nothing to resume, start again
        RP.receive(dst, "w", io.BytesIO(data))
    else:
        stats = RP.receive(dst, "w", io.BytesIO(data), resume=True)
        assert stats.resumed and RP.pending_receive(dst, "w") is None
    assert content(dst, "w@s3") == content(src, "v@s3") == content(dst, "w")
    assert state(dst, dst_path)[1] == []


def test_resume_from_the_remainder_of_the_stream(src, dst):
    data = stream_of(src, "v@s2")
    with pytest.raises(StreamTruncated, match="from offset"):
        RP.receive(dst, "w", io.BytesIO(data[:len(data) * 2 // 3]))
    token = RP.pending_receive(dst, "w")
    assert 0 < token.seq and token.pos <= len(data) * 2 // 3
    stats = RP.receive(dst, "w", io.BytesIO(data[token.pos:]), resume=True)
    assert stats.skipped == 0 and stats.records > 0
    assert content(dst, "w@s2") == content(src, "v@s2")


def test_resume_with_another_stream_is_refused(src, dst):
    data = stream_of(src, "v@s2")
    with pytest.raises(StreamTruncated):
        RP.receive(dst, "w", io.BytesIO(data[:len(data) // 2]))
    with pytest.raises(StreamError, match="not the stream"):
        RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s3")), resume=True)
    with pytest.raises(UsageError, match="pending"):
        RP.receive(dst, "w", io.BytesIO(data))
    assert RP.abort_receive(dst, "w")
    RP.receive(dst, "w", io.BytesIO(data))
    assert content(dst, "w") == content(src, "v@s2")


def flip(data, pos):
    bad = bytearray(data)
    bad[pos] ^= 0x40
    return bytes(bad)


@pytest.mark.parametrize("where", [0.1, 0.5, 0.9, -20])
def test_flipped_byte_is_refused_and_the_pool_is_left_as_it_was(src, dst, dst_path, where):
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@s1")))
    data = stream_of(src, "v@s4", "v@s1")
    before = state(dst, dst_path)
    pos = int(len(data) * where) if where > 0 else len(data) + where
    with pytest.raises(StreamError) as err:
        RP.receive(dst, "w", io.BytesIO(flip(data, pos)))
    assert not isinstance(err.value, StreamTruncated)
    assert state(dst, dst_path) == before
    assert not dst.hidden_exists(R.hidden_name("w"))


def test_newer_format_version_is_refused(src, dst, dst_path):
    data = bytearray(stream_of(src, "v@s1"))
    data[8:10] = struct.pack("<H", S.VERSION + 1)
    with pytest.raises(StreamError, match="newer"):
        RP.receive(dst, "w", io.BytesIO(bytes(data)))
    assert state(dst, dst_path) == ({}, [])


# --- the same through the CLI, across processes ----------------------------------------


def test_cli_truncated_then_resume(src, tmp_path, pool_location):
    full, inc = stream_of(src, "v@s1"), stream_of(src, "v@s2", "v@s1")
    expect = content(src, "v@s2")
    dst_path = pool_location("dst")
    assert cli("--pool", dst_path, "init", "--capacity", "512M").returncode == 0
    (tmp_path / "full").write_bytes(full)
    (tmp_path / "cut").write_bytes(inc[:len(inc) // 2])
    (tmp_path / "inc").write_bytes(inc)
    assert cli("--pool", dst_path, "receive", "w", "-i", str(tmp_path / "full")).returncode == 0
    r = cli("--pool", dst_path, "receive", "w", "-i", str(tmp_path / "cut"))
    assert r.returncode == 12 and b"truncated" in r.stderr and b"--resume" in r.stderr
    listing = cli("--pool", dst_path, "list", "-H").stdout.decode()
    assert "w@s2" not in listing and ".receive" not in listing
    r = cli("--pool", dst_path, "receive", "w", "--resume", "-i", str(tmp_path / "inc"))
    assert r.returncode == 0, r.stderr
    with Pool.open(dst_path) as dst:
        assert content(dst, "w@s2") == expect


def test_cli_corrupt_stream_exit_code(src, tmp_path, pool_location):
    bad = flip(stream_of(src, "v@s1"), 5000)
    dst_path = pool_location("dst")
    assert cli("--pool", dst_path, "init", "--capacity", "512M").returncode == 0
    r = cli("--pool", dst_path, "receive", "w", input=bad)
    assert r.returncode == 12 and b"checksum mismatch at record" in r.stderr
    assert cli("--pool", dst_path, "list", "-H").stdout == b""


def test_killed_receive_shows_nothing_and_resumes(src, tmp_path, pool_location):
    """SIGKILL in the middle of a receive: no device appears; --resume finishes."""
    data = stream_of(src, "v@s5")
    expect = content(src, "v@s5")
    dst_path = pool_location("dst")
    assert cli("--pool", dst_path, "init", "--capacity", "512M").returncode == 0
    env = cli_env()
    proc = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", dst_path,
                             "receive", "w"], stdin=subprocess.PIPE, env=env)
    proc.stdin.write(data[:len(data) // 2])
    proc.stdin.flush()
    token = os.path.join(runtime_dir(dst_path), "resume", "w.json")
    for _ in range(600):  # bounded: wait until the receive has begun (its first token)
        if os.path.exists(token) or proc.poll() is not None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the receive ended before it was killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert cli("--pool", dst_path, "list", "-H").stdout == b""
    r = cli("--pool", dst_path, "receive", "w", "--resume", input=data)
    assert r.returncode == 0, r.stderr
    with Pool.open(dst_path) as dst:
        assert content(dst, "w@s5") == expect == content(dst, "w")


def test_send_refuses_volumes_and_terminals(src):
    with pytest.raises(UsageError, match="not a snapshot"):
        RP.send(src, "v", io.BytesIO())
    path = src.path
    src.close()
    master, slave = os.openpty()
    try:
        r = cli("--pool", path, "send", "v@s1", stdout=slave, stderr=subprocess.PIPE)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 2 and b"terminal" in r.stderr


def test_a_pending_receive_reserves_its_volume_name(src, dst):
    """A volume created while a full receive was interrupted would make the resume fail
    only after reading the whole stream: the name is refused until the receive ends."""
    data = stream_of(src, "v@s1")
    with pytest.raises(StreamTruncated):
        RP.receive(dst, "w", io.BytesIO(data[:len(data) // 2]))
    with pytest.raises(DeviceBusy, match="receive into 'w' is pending"):
        dst.create_volume("w", MiB)
    RP.receive(dst, "w", io.BytesIO(data), resume=True)
    assert dst.info("w@s1").kind == "snapshot"


def test_progress_bar_on_a_terminal_only(src, tmp_path):
    path = src.path
    src.close()
    master, slave = os.openpty()
    try:
        r = cli("--pool", path, "send", "v@s3", "-o", str(tmp_path / "s"), stdout=slave,
                stderr=slave)
        os.set_blocking(master, False)
        shown = os.read(master, 65536)
    finally:
        os.close(slave)
        os.close(master)
    assert r.returncode == 0 and b"send v@s3" in shown and b"ETA" in shown
    r = cli("--pool", path, "send", "v@s3", "-o", str(tmp_path / "t"))
    assert r.returncode == 0 and r.stderr == b"" and r.stdout == b""


def test_incrementals_across_a_grow_and_a_shrink(tmp_path, dst):
    src = new_pool(tmp_path / "src")
    src.create_volume("v", 8 * MiB)
    with src.open_device("v") as dev:
        dev.pwrite(pattern(1, 8 * MiB), 0)
    src.snapshot("v@a")
    src.resize("v", 12 * MiB + 4096)
    with src.open_device("v") as dev:
        dev.pwrite(pattern(2, 100_000), 10 * MiB)
    src.snapshot("v@b")
    src.resize("v", 3 * MiB + 512, shrink=True)
    src.snapshot("v@c")
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@a")))
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@b", "v@a")))
    RP.receive(dst, "w", io.BytesIO(stream_of(src, "v@c", "v@b")))
    for snap in "abc":
        assert dst.info(f"w@{snap}").size == src.info(f"v@{snap}").size
        assert content(dst, f"w@{snap}") == content(src, f"v@{snap}")
    src.close()
