"""fio's nbd engine against exports: verified random writes over two connections,
and snapshots taken through the CLI while fio writes."""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from thinstore.control import ControlServer
from nbd_helpers import MiB, cli, need, served

REGION = 32 * MiB


@pytest.fixture
def srv():
    need("fio")
    with served() as s:
        control = ControlServer(s.pool, s.server)
        control.listen()
        yield s
        control.shutdown()


def fio(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["fio", "--output-format=json", *args], capture_output=True,
                          text=True, timeout=timeout)


def job_errors(proc: subprocess.CompletedProcess) -> list[int]:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = json.loads(proc.stdout[proc.stdout.index("{"):])
    return [job["error"] for job in out["jobs"]]


def common(uri: str) -> list[str]:
    return ["--name=v", "--ioengine=nbd", f"--uri={uri}", "--verify=crc32c",
            "--verify_fatal=1"]


def test_random_writes_on_two_connections_verify(srv):
    srv.pool.create_volume("fio", 2 * REGION)
    proc = fio(*common(srv.uri("fio")), "--rw=randwrite", "--bs=4k", "--iodepth=16",
               "--numjobs=2", f"--size={REGION}", f"--offset_increment={REGION}")
    assert job_errors(proc) == [0, 0]
    with srv.pool.open_device("fio") as dev:
        mapped = sum(n for _, n, m in dev.extents(0, 2 * REGION) if m)
    assert mapped == 2 * REGION, "every block was written once"


def test_snapshots_through_the_cli_while_fio_writes(srv):
    srv.pool.create_volume("live", 2 * REGION)
    writer = subprocess.Popen(
        ["fio", "--output-format=json", *common(srv.uri("live")), "--rw=write", "--bs=64k",
         "--iodepth=4", "--numjobs=2", f"--size={REGION}", f"--offset_increment={REGION}",
         "--do_verify=0", "--rate=4m"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snaps = []
    try:
        for n in range(8):      # no fixed pacing: on a loaded machine the CLI starts slowly
            time.sleep(0.2)
            if writer.poll() is not None:
                break
            cli("--pool", srv.pool.path, "snapshot", f"live@t{n}")
            snaps.append(f"live@t{n}")
    finally:
        out, err = writer.communicate(timeout=120)
    assert writer.returncode == 0, err
    assert len(snaps) >= 3, "fio finished before the snapshots could interleave"
    last = [0, 0]
    for name in snaps:
        prefixes = [written_prefix(srv.pool, name, job * REGION) for job in (0, 1)]
        assert prefixes[0] >= last[0] and prefixes[1] >= last[1], "snapshots move forward"
        last = prefixes
        for job, prefix in enumerate(prefixes):
            if prefix:
                verify(srv.uri(name), job * REGION, prefix)
    verify(srv.uri("live"), 0, REGION)
    verify(srv.uri("live"), REGION, REGION)


def written_prefix(pool, name: str, start: int) -> int:
    """Bytes mapped contiguously from ``start`` (fio writes each region in order)."""
    with pool.open_device(name) as dev:
        extents = dev.extents(start, REGION)
    first = extents[0]
    return first[1] if first[2] else 0


def verify(uri: str, offset: int, size: int) -> None:
    """fio re-reads [offset, offset+size) and checks every block's header and crc32c."""
    proc = fio(*common(uri), "--rw=write", "--bs=64k", "--verify_only=1",
               f"--offset={offset}", f"--size={size}")
    assert job_errors(proc) == [0], f"{uri} {offset}+{size}"
