"""QEMU's tools against exports: qemu-img info/convert/compare/map and qemu-io."""

from __future__ import annotations

import json

import pytest

from nbd_helpers import MiB, need, run, served

SIZE = 64 * MiB


@pytest.fixture(scope="module")
def srv(backend):
    need("qemu-img", "qemu-io")
    with served(backend=backend) as s:
        yield s


def qemu_io(uri: str, *commands: str, check: bool = True):
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    return run(args + [uri], check=check)


def test_info_reports_size_and_format(srv):
    srv.pool.create_volume("info", SIZE)
    out = json.loads(run(["qemu-img", "info", "--output=json", srv.uri("info")]).stdout)
    assert out["virtual-size"] == SIZE
    assert out["format"] == "raw"


def test_converted_snapshot_equals_data_written_before_it(srv, tmp_path):
    srv.pool.create_volume("conv", SIZE)
    qemu_io(srv.uri("conv"), "write -P 0x11 0 4M", "write -P 0x22 20M 1M", "flush")
    srv.pool.snapshot("conv@before")
    qemu_io(srv.uri("conv"), "write -P 0x33 0 1M", "write -P 0x44 40M 2M")

    expected = bytearray(SIZE)
    expected[0:4 * MiB] = b"\x11" * (4 * MiB)
    expected[20 * MiB:21 * MiB] = b"\x22" * MiB
    want = tmp_path / "want.raw"
    want.write_bytes(expected)

    got = tmp_path / "snap.raw"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", srv.uri("conv@before"), str(got)])
    assert got.read_bytes() == bytes(expected)
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(want), srv.uri("conv@before")])
    differs = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(want), srv.uri("conv")],
                  check=False)
    assert differs.returncode == 1, "the volume moved on after the snapshot"


def test_map_shows_unmapped_chunks_as_holes(srv):
    srv.pool.create_volume("map", SIZE)
    qemu_io(srv.uri("map"), "write -P 0x5a 1M 1M", "write -P 0x5b 8M 64k")
    entries = json.loads(run(["qemu-img", "map", "-f", "raw", "--output=json",
                              srv.uri("map")]).stdout)
    data = [(e["start"], e["length"]) for e in entries if e["data"]]
    assert data == [(1 * MiB, 1 * MiB), (8 * MiB, 64 << 10)]
    holes = [e for e in entries if not e["data"]]
    assert all(e["zero"] for e in holes)
    assert sum(e["length"] for e in entries) == SIZE


def test_qemu_io_patterns_zeroes_discard_flush(srv):
    srv.pool.create_volume("io", SIZE)
    u = srv.uri("io")
    qemu_io(u, "write -P 0xa5 0 2M", "write -P 0x3c 2M 512", "aio_write -P 0x7e 3M 1M",
            "aio_flush", "flush")
    qemu_io(u, "read -P 0xa5 0 2M", "read -P 0x3c 2M 512", "read -P 0x7e 3M 1M",
            "read -P 0 4M 1M")
    qemu_io(u, "write -z 0 1M", "write -z -u 1M 1M", "discard 3M 1M", "flush")
    qemu_io(u, "read -P 0 0 2M", "read -P 0 3M 1M", "read -P 0x3c 2M 512")
    extents = srv.pool.open_device("io")
    try:
        mapped = [(o, n) for o, n, m in extents.extents(0, SIZE) if m]
    finally:
        extents.close()
    assert (1 * MiB, 1 * MiB) not in mapped, "write -z -u unmaps whole chunks"
    assert mapped and mapped[0][0] == 0, "write -z without -u keeps the range allocated"


def test_qemu_io_verification_catches_wrong_pattern(srv):
    srv.pool.create_volume("verify", SIZE)
    qemu_io(srv.uri("verify"), "write -P 0x01 0 64k")
    bad = qemu_io(srv.uri("verify"), "read -P 0x02 0 64k", check=False)
    assert "Pattern verification failed" in bad.stdout + bad.stderr


def test_writes_to_a_snapshot_fail_with_permission_error(srv):
    srv.pool.create_volume("ro", SIZE)
    qemu_io(srv.uri("ro"), "write -P 0x42 0 1M")
    srv.pool.snapshot("ro@s")
    refused = qemu_io(srv.uri("ro@s"), "write -P 0x43 0 4k", check=False)
    assert refused.returncode != 0
    assert "Permission denied" in refused.stdout + refused.stderr
    forced = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 0 1M", srv.uri("ro@s")])
    assert "read 1048576/1048576" in forced.stdout
    denied = run(["qemu-io", "-r", "-f", "raw", "-c", "write -P 0x43 0 4k", srv.uri("ro@s")],
                 check=False)
    assert "read-only" in denied.stdout + denied.stderr
