"""thinstore bench: every option on a small pool, short runs; figures that add up;
user data never overwritten; snapshots read-only; busy devices refused."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import shutil

import pytest

from thinstore import Pool
from thinstore.cli.main import main
from thinstore.control import ControlServer
from thinstore.nbd.client import NBDDevice
from thinstore.nbd.server import NBDServer
from nbd_helpers import MiB, need, short_tmpdir

SIZE = 8 * MiB


def make_pool(path: str) -> None:
    """Volume v (8 MiB, its first 2 MiB a pattern) and its snapshot v@s."""
    with Pool.create(path, 256 * MiB, 64 << 10, commit_interval=0) as pool:
        pool.create_volume("v", SIZE)
        with pool.open_device("v") as dev:
            dev.pwrite(bytes(range(256)) * (2 * MiB // 256), 0)
        pool.snapshot("v@s")


@pytest.fixture
def pool_dir():
    base = short_tmpdir()
    make_pool(os.path.join(base, "p"))
    yield os.path.join(base, "p")
    shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def serving(path: str):
    """The pool served in this process, its control socket in the pool directory."""
    pool = Pool.open(path, commit_interval=0)
    server = NBDServer(pool)
    sock = server.listen_unix(os.path.join(os.path.dirname(path), "nbd.sock"))
    server.start()
    control = ControlServer(pool, server, nbd_socket=sock)
    control.listen()
    try:
        yield sock
    finally:
        control.shutdown()
        server.shutdown()
        pool.close()


def bench(capsys, path: str, *args: str) -> tuple[int, str, str]:
    code = main(["--pool", path, "bench", *args])
    out, err = capsys.readouterr()
    return code, out, err


def bench_json(capsys, path: str, *args: str) -> dict:
    code, out, err = bench(capsys, path, *args, "--json")
    assert code == 0, err
    return json.loads(out)


def check_figures(r: dict, io_type: str, io_size: int, sync: str, total: int | None) -> None:
    """What --json promises: bytes = IOPS x size x time; directions as asked; flushes;
    a run by time stops when asked (loosely: a late stop, not a slow one, fails)."""
    t = r["total"]
    if r["workload"]["seconds"]:
        assert r["workload"]["seconds"] * 0.9 <= r["elapsed_s"] < r["workload"]["seconds"] + 5
    assert t["ops"] > 0 and t["bytes"] == t["ops"] * io_size
    assert t["bytes"] == pytest.approx(t["iops"] * io_size * r["elapsed_s"], rel=1e-6)
    assert t["ops"] == r["read"]["ops"] + r["write"]["ops"]
    if io_type == "read":
        assert r["write"]["ops"] == 0
    if io_type == "write":
        assert r["read"]["ops"] == 0
    if io_type == "readwrite" and t["ops"] >= 64:
        assert r["read"]["ops"] and r["write"]["ops"]
    if total is not None:
        assert t["bytes"] == total
    every = int(sync.split("-")[1]) if sync.startswith("every-") else 0
    if every and r["write"]["ops"] >= 16 * every:
        assert r["flushes"]["ops"] > 0
    if not every:
        assert r["flushes"]["ops"] == 0
    lat = t["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["p99.9"] <= lat["max"] * 1.0001
    assert sum(r["histogram"]["read"]) + sum(r["histogram"]["write"]) in (t["ops"], ) \
        or r["engine"] == "fio"
    assert r["counters"], "the pool's counters for the run"


DIRECT = list(itertools.product(("read", "write", "readwrite"), ("rand", "seq"),
                                ("none", "fua", "every-4")))


@pytest.mark.parametrize("io_type,pattern,sync", DIRECT)
def test_direct_runs_every_combination(capsys, pool_dir, io_type, pattern, sync):
    by_time = bench_json(capsys, pool_dir, "v", "--via", "direct", "--io-type", io_type,
                         "--io-pattern", pattern, "--sync", sync, "--time", "150ms",
                         "--io-depth", "4")
    check_figures(by_time, io_type, 4096, sync, None)
    assert by_time["via"] == "direct" and by_time["engine"] == "direct"
    assert 0.15 <= by_time["elapsed_s"] < 5
    by_total = bench_json(capsys, pool_dir, "v", "--via", "direct", "--io-type", io_type,
                          "--io-pattern", pattern, "--sync", sync, "--io-total", "512K",
                          "--io-size", "16K", "--io-depth", "3")
    check_figures(by_total, io_type, 16384, sync, 512 << 10)


NBD = [("read", "rand", "none", "fio"), ("write", "seq", "every-8", "fio"),
       ("readwrite", "rand", "none", "fio"), ("read", "seq", "none", "builtin"),
       ("write", "rand", "fua", "builtin"), ("readwrite", "seq", "every-4", "builtin"),
       ("readwrite", "rand", "fua", "auto")]


@pytest.mark.parametrize("io_type,pattern,sync,client", NBD)
def test_nbd_runs_through_the_running_server(capsys, pool_dir, io_type, pattern, sync, client):
    if client == "fio":
        need("fio")
    with serving(pool_dir):
        r = bench_json(capsys, pool_dir, "v", "--io-type", io_type, "--io-pattern", pattern,
                       "--sync", sync, "--client", client, "--time", "300ms", "--io-depth", "4")
    check_figures(r, io_type, 4096, sync, None)
    assert r["via"] == "nbd" and r["server"] == "running"      # auto picks nbd when served
    expected = {"fio": "fio", "builtin": "builtin-client", "auto": "builtin-client"}[client]
    assert r["engine"] == expected                           # fio has no per-write FUA


def test_a_ramp_runs_first_unmeasured(capsys, pool_dir):
    """The ramp's writes reach the pool (its counters) but not the figures."""
    for extra in (["--via", "direct"], ["--via", "nbd", "--client", "fio"]):
        if "fio" in extra:
            need("fio")
        # a 1 s ramp: fio, starting on a loaded machine, issued too few writes in 300 ms
        r = bench_json(capsys, pool_dir, "v", "--io-type", "write", "--time", "300ms",
                       "--ramp", "1s", "--io-depth", "4", *extra)
        check_figures(r, "write", 4096, "none", None)
        assert r["workload"]["ramp"] == 1.0
        unmeasured = r["counters"]["bytes_written"] - r["write"]["bytes"]
        # more than the few requests in flight when a run stops: the ramp's writes
        assert unmeasured > 4 * 4096, r["counters"]
    plain = bench_json(capsys, pool_dir, "v", "--io-type", "write", "--time", "100ms",
                       "--via", "direct")
    assert plain["counters"]["bytes_written"] == plain["write"]["bytes"]   # no ramp: all


def test_nbd_starts_a_server_when_none_runs(capsys, pool_dir):
    r = bench_json(capsys, pool_dir, "v@s", "--via", "nbd", "--client", "builtin",
                   "--io-total", "1M", "--io-size", "64K", "--io-pattern", "seq")
    check_figures(r, "read", 65536, "none", 1 << 20)
    assert r["server"] == "started" and r["target"] == "v@s"
    with Pool.open(pool_dir) as pool:       # the started server is gone: the pool is free
        assert [d.name for d in pool.list()] == ["v", "v@s"]


def digest(path: str) -> tuple[str, list[str]]:
    with Pool.open(path) as pool:
        with pool.open_device("v") as dev:
            data = dev.pread(0, SIZE)
        return hashlib.sha256(data).hexdigest(), sorted(d.name for d in pool.list())


@pytest.mark.parametrize("via", ["direct", "nbd"])
def test_a_write_bench_leaves_the_volume_bytes_unchanged(capsys, pool_dir, via):
    before = digest(pool_dir)
    r = bench_json(capsys, pool_dir, "v", "--via", via, "--client", "builtin", "--io-type",
                   "write", "--io-pattern", "seq", "--io-total", str(SIZE), "--io-size", "64K")
    assert r["write"]["bytes"] == SIZE          # every byte of the device was written ...
    assert r["target"] != "v" and r["target"].startswith("v.bench-")
    assert digest(pool_dir) == before           # ... on a clone, gone afterwards


def test_in_place_writes_the_device_itself(capsys, pool_dir):
    before = digest(pool_dir)
    r = bench_json(capsys, pool_dir, "v", "--via", "direct", "--io-type", "write",
                   "--in-place", "--io-total", "256K")
    assert r["target"] == "v"
    assert digest(pool_dir)[0] != before[0]


def test_a_snapshot_is_read_only(capsys, pool_dir):
    for via in ("direct", "nbd"):
        code, out, err = bench(capsys, pool_dir, "v@s", "--via", via, "--io-type", "write",
                               "--time", "100ms")
        assert code == 6 and out == ""
        assert "snapshot" in err and "read-only" in err
    assert bench_json(capsys, pool_dir, "v@s", "--time", "100ms")["read"]["ops"] > 0


def test_a_device_with_clients_is_refused_unless_forced(capsys, pool_dir):
    with serving(pool_dir) as sock, NBDDevice(sock, "v"):
        code, out, err = bench(capsys, pool_dir, "v", "--io-type", "write", "--time", "100ms")
        assert code == 5 and "1 open NBD connection" in err and "--force" in err
        r = bench_json(capsys, pool_dir, "v", "--io-type", "write", "--time", "100ms",
                       "--force", "--client", "builtin")
        assert r["write"]["ops"] > 0 and r["target"] != "v"
        # reading beside the client is fine
        assert bench_json(capsys, pool_dir, "v", "--time", "100ms",
                          "--client", "builtin")["read"]["ops"] > 0


def test_direct_while_served_says_to_go_through_the_server(capsys, pool_dir):
    with serving(pool_dir):
        code, _, err = bench(capsys, pool_dir, "v", "--via", "direct", "--time", "100ms")
    assert code == 5 and "--via nbd" in err


def test_bad_options_are_usage_errors(capsys, pool_dir):
    for args in (["--sync", "every-0"], ["--sync", "sometimes"], ["--io-size", "1000"],
                 ["--io-depth", "0"], ["--time", "soon"], ["--io-size", "16M"],
                 ["--io-total", "1K"],
                 ["--report", "out.txt"], ["--compare", "tgtd"], ["--via", "direct",
                                                                  "--compare", "nbdkit"]):
        code, out, err = bench(capsys, pool_dir, "v", *args)
        assert code == 2 and out == "" and err.startswith("thinstore: "), (args, err)
    code, _, err = bench(capsys, pool_dir, "nosuch", "--time", "100ms")
    assert code == 3


@pytest.mark.integration          # qemu-nbd and nbdkit servers: once in CI, not per backend
def test_compare_runs_the_peers_interleaved(capsys, pool_dir):
    need("fio", "qemu-nbd", "nbdkit", "qemu-img")
    r = bench_json(capsys, pool_dir, "v", "--io-type", "readwrite", "--time", "300ms",
                   "--compare", "qemu-nbd,nbdkit", "--rounds", "2", "--io-depth", "4")
    cmp = r["compare"]
    assert set(cmp["servers"]) == {"thinstore", "qemu-nbd", "nbdkit"}
    for name, runs in cmp["servers"].items():
        assert len(runs) == 2 and all(run["total"]["ops"] > 0 for run in runs)
        if name != "thinstore":
            assert cmp["ratios"][name] == pytest.approx(
                cmp["median_iops"]["thinstore"] / cmp["median_iops"][name])
    code, out, err = bench(capsys, pool_dir, "v", "--time", "200ms", "--compare", "nbdkit",
                           "--rounds", "1", "--client", "builtin", "--sync", "fua",
                           "--io-type", "write")
    assert code == 0, err
    assert "builtin-client" in out and "THINSTORE/SERVER" in out and "nbdkit" in out


def test_text_output_and_quiet_progress_when_piped(pool_dir):
    from nbd_helpers import cli
    proc = cli("--pool", pool_dir, "bench", "v", "--io-type", "write", "--time", "200ms")
    assert proc.stderr == ""                    # not a terminal: no progress line
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("bench v.bench-") and "4K randwrite QD16" in lines[0]
    assert lines[1].split()[:3] == ["OPS", "IOPS", "BYTES"]
    assert any(line.startswith("write ") for line in lines)
    assert any(line.startswith("pool counters: ") for line in lines)


def test_progress_line_on_a_terminal(pool_dir):
    import pty
    import subprocess
    import sys
    from nbd_helpers import ROOT
    master, slave = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool_dir, "bench", "v",
                           "--time", "1.2s"], stderr=slave, stdout=subprocess.PIPE, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    os.close(slave)
    seen = os.read(master, 1 << 16).decode()
    os.close(master)
    assert proc.returncode == 0
    assert "bench v" in seen and "IOPS" in seen and "/1.2s]" in seen
