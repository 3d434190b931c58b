"""thinstore iostat: the serving process's per-device counters, read over the control
socket while fio runs, agree with fio's own totals and stay at zero elsewhere."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import pytest

from thinstore import Pool
from thinstore.cli.iostat import split_operands
from thinstore.errors import UsageError
from nbd_helpers import MiB, ROOT, cli, need, short_tmpdir, uri


@pytest.fixture
def server():
    """``thinstore serve`` on a pool with volumes a and b, as a user would run it."""
    base = short_tmpdir()
    path = os.path.join(base, "p")
    with Pool.create(path, 256 * MiB, 64 << 10) as pool:
        pool.create_volume("a", 32 * MiB)
        pool.create_volume("b", 32 * MiB)
    sock = os.path.join(base, "nbd.sock")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", path, "serve",
                             "--socket", sock], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline()
    yield path, sock
    proc.terminate()
    proc.wait(30)
    shutil.rmtree(base, ignore_errors=True)


def _wait_reports(reports: list, n: int, watch: subprocess.Popen) -> None:
    """Until `reports` has `n` (bounded: 60 s; a loaded host starts Python slowly)."""
    deadline = time.monotonic() + 60
    while len(reports) < n:
        assert watch.poll() is None and time.monotonic() < deadline, "iostat stopped reporting"
        time.sleep(0.05)


def test_iostat_follows_fio_on_one_device_and_agrees_with_its_totals(server):
    need("fio")
    path, sock = server
    env = dict(os.environ, PYTHONPATH=ROOT)
    watch = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", path, "iostat",
                              "a", "b", "0.3", "--json"], stdout=subprocess.PIPE, text=True,
                             env=env)
    reports: list[dict] = []
    reader = threading.Thread(target=lambda: reports.extend(
        json.loads(line) for line in watch.stdout), daemon=True)
    reader.start()
    _wait_reports(reports, 1, watch)      # iostat is up before fio starts
    fio = subprocess.run(["fio", "--output-format=json", "--name=io", "--ioengine=nbd",
                          f"--uri={uri(sock, 'a')}", "--rw=randrw", "--bs=4k",
                          "--iodepth=8", "--size=32M", "--io_size=24M", "--fsync=64",
                          "--randrepeat=0", "--norandommap"],
                         capture_output=True, text=True, timeout=120)
    assert fio.returncode == 0, fio.stderr
    job = json.loads(fio.stdout[fio.stdout.index("{"):])["jobs"][0]
    done = job["read"]["io_bytes"] + job["write"]["io_bytes"]
    deadline = time.monotonic() + 15      # a report after fio's last request, however slow
    while time.monotonic() < deadline and sum(
            r["devices"]["a"]["read_bytes"] + r["devices"]["a"]["write_bytes"]
            for r in list(reports)) < done:
        time.sleep(0.1)
    _wait_reports(reports, len(reports) + 1, watch)   # and one more, which must add nothing
    watch.terminate()
    watch.wait(30)
    reader.join(10)
    assert len(reports) >= 3

    def total(device: str, field: str) -> int:
        return sum(r["devices"][device][field] for r in reports)

    for field, expected in (("read_bytes", job["read"]["io_bytes"]),
                            ("write_bytes", job["write"]["io_bytes"]),
                            ("read_ops", job["read"]["total_ios"]),
                            ("write_ops", job["write"]["total_ios"])):
        assert expected > 0
        assert total("a", field) == pytest.approx(expected, rel=0.05), field
        assert total("b", field) == 0, field
    assert total("a", "flush_ops") > 0 and total("b", "flush_ops") == 0
    busy = [r["devices"]["a"] for r in reports if r["devices"]["a"]["write_ops"]]
    assert busy and all(d["write_iops"] > 0 and d["write_latency_us"] > 0 for d in busy)
    assert all(r["devices"]["b"]["read_iops"] == r["devices"]["b"]["write_iops"] == 0
               for r in reports)


def test_iostat_table_and_errors(server):
    path, sock = server
    proc = cli("--pool", path, "iostat")
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("over ") and lines[1].split()[:4] == [
        "DEVICE", "CONN", "READ/S", "WRITE/S"]
    assert [line.split()[0] for line in lines[2:] if line] == ["a", "b", "(all)"]
    missing = cli("--pool", path, "iostat", "nosuch", check=False)
    assert missing.returncode == 3
    bad = cli("--pool", path, "iostat", "a", "1", "0", check=False)
    assert bad.returncode == 2 and "COUNT" in bad.stderr


def test_iostat_shows_how_long_commits_held_the_pool_lock(server):
    from thinstore.control import RemotePool
    path, sock = server
    remote = RemotePool.connect(path)
    try:
        remote.commit()
        remote.commit()
    finally:
        remote.close()
    text = cli("--pool", path, "iostat").stdout
    line = [ln for ln in text.splitlines() if ln.startswith("commits ")]
    assert line and line[0].startswith("commits 2, lock held ") and "longest" in line[0], text
    report = json.loads(cli("--pool", path, "iostat", "--json").stdout)
    pool = report["pool"]
    assert pool["commits"] == 2 and pool["commit_hold_us_max"] > 0
    assert pool["commit_hold_us"] >= pool["commit_data_sync_us"] + pool["commit_tree_us"]


def test_iostat_shows_the_intent_logs_records_of_the_period(server):
    """A FLUSH after writes appends an intent-log record; iostat's text and JSON say so."""
    from thinstore.nbd.client import NBDDevice
    path, sock = server
    dev = NBDDevice(sock, "a")
    try:
        for i in range(4):
            dev.pwrite(os.urandom(4096), i * 65536)
            dev.flush()
    finally:
        dev.close()
    report = json.loads(cli("--pool", path, "iostat", "--json").stdout)
    log = report["log"]
    assert log["records"] >= 1 and log["syncs"] >= 1 and log["record_bytes"] >= 4096, log
    text = cli("--pool", path, "iostat").stdout
    line = [ln for ln in text.splitlines() if ln.startswith("intent log ")]
    assert line and f"{log['records']} records" in line[0], text
    # the log's file and the size it may reach (its cap follows the host's free space)
    assert 0 < log["size_now"] <= log["cap_now"], log
    assert "of at most" in line[0], text


def test_iostat_without_a_server_says_so(tmp_path):
    Pool.create(str(tmp_path / "p"), 64 * MiB).close()
    proc = cli("--pool", str(tmp_path / "p"), "iostat", check=False)
    assert proc.returncode == 1 and "no server is serving" in proc.stderr
    nopool = cli("--pool", str(tmp_path / "nopool"), "iostat", check=False)
    assert nopool.returncode == 9 and "no thinstore pool at" in nopool.stderr, nopool.stderr


def test_operands_split_into_devices_interval_count():
    assert split_operands([]) == ([], None, None)
    assert split_operands(["vm1", "2"]) == (["vm1"], 2.0, None)
    assert split_operands(["vm1", "vm2@s", "0.5", "3"]) == (["vm1", "vm2@s"], 0.5, 3)
    with pytest.raises(UsageError):
        split_operands(["-1"])


def test_the_server_counts_each_kind_of_request_and_keeps_closed_connections():
    from nbd_helpers import RawClient, served
    from thinstore.nbd import protocol as P
    with served() as s:
        s.pool.create_volume("a", 4 * MiB)
        client = RawClient(s.sock)
        client.greet()
        client.go("a", structured=False)
        client.request(P.Cmd.WRITE, 0, 4096, data=b"x" * 4096, cookie=1)
        client.request(P.Cmd.WRITE, 4096, 8192, flags=P.CMD_FLAG_FUA, data=b"y" * 8192, cookie=2)
        client.request(P.Cmd.READ, 0, 512 << 10, cookie=3)          # past the fast path
        client.request(P.Cmd.READ, 0, 4096, cookie=4)
        client.request(P.Cmd.FLUSH, cookie=5)
        client.request(P.Cmd.TRIM, 0, 65536, cookie=6)
        client.request(P.Cmd.READ, 8 * MiB, 4096, cookie=7)          # beyond the end
        lengths = {3: 512 << 10, 4: 4096}     # replies come in any order (workers)
        replies = {}
        for _ in range(7):
            _, error, cookie = P.SIMPLE_REPLY.unpack(client.recv(P.SIMPLE_REPLY.size))
            if not error and cookie in lengths:
                client.recv(lengths[cookie])
            replies[cookie] = error
        assert [replies[c] for c in range(1, 8)] == [0] * 6 + [P.EINVAL]
        for _ in range(1500):     # a worker counts its request just after replying (30 s)
            live = s.server.iostat()["devices"]["a"]
            if live["other_ops"] and live["flush_ops"] and live["write_ops"] == 2:
                break
            time.sleep(0.02)
        client.request(P.Cmd.DISC)
        client.close()
        for _ in range(1500):                   # the session ends in its own thread (30 s)
            if not s.server.connections():
                break
            time.sleep(0.02)
        closed = s.server.iostat()["devices"]["a"]
    assert live["connections"] == 1 and closed["connections"] == 0
    for counts in (live, closed):
        assert (counts["write_ops"], counts["write_bytes"]) == (2, 12288)
        assert (counts["read_ops"], counts["read_bytes"]) == (2, (512 << 10) + 4096)
        assert (counts["flush_ops"], counts["other_ops"], counts["errors"]) == (1, 1, 1)
        assert counts["write_timed"] >= 1 and counts["write_ns"] > 0
