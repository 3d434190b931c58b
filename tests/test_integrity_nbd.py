"""Over NBD a damaged chunk reads as EIO (qemu-io sees an I/O error), never as bad bytes,
and the server and its other reads carry on."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest
from integrity_helpers import chunk_of, flip_chunk, make_pool

from thinstore import Pool

server_mod = pytest.importorskip("thinstore.nbd.server", reason="the NBD server is not merged")


def _qemu_io(sock: str, export: str, cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(["qemu-io", "-r", "-f", "raw", "-c", cmd,
                           f"nbd+unix:///{export}?socket={sock}"],
                          capture_output=True, text=True, timeout=60)


def test_damaged_chunk_is_eio_over_nbd(tmp_path, caplog):
    if not shutil.which("qemu-io"):
        pytest.skip("qemu-io is not installed")
    path = str(tmp_path / "pool")
    make_pool(path)
    flip_chunk(path, chunk_of(path, "vol", 2))
    caplog.set_level(logging.WARNING, logger="thinstore.nbd.transmission")
    with Pool.open(path, commit_interval=0) as pool:
        server = server_mod.NBDServer(pool)
        sock = server.listen_unix(str(tmp_path / "nbd.sock"))
        server.start()
        try:
            bad = _qemu_io(sock, "vol", "read 8192 4096")
            good = _qemu_io(sock, "vol", "read -P 0 0 0")       # the server still serves
            snap = _qemu_io(sock, "vol@snap", "read 8192 512")  # shared chunk: same error
        finally:
            server.shutdown()
    assert "Input/output error" in bad.stdout + bad.stderr, bad
    assert good.returncode == 0, good
    assert "Input/output error" in snap.stdout + snap.stderr, snap
    # the operator sees the cause in the server's log, naming the export and offset
    logged = [r.getMessage() for r in caplog.records]
    assert any("export 'vol': READ at offset 8192 failed" in m and "checksum" in m
               for m in logged), logged
