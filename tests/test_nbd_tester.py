"""The NBD project's reference test client (nbd-tester-client, from NetworkBlockDevice/nbd's
tests/run) against ``thinstore serve``: the tests the NBD project runs its own server
through, with thinstore as the server.

- integrity (``-i -t TRACE``): replays a recorded trace of reads, writes (up to 47.5 MiB in
  one request in the huge trace), FUA writes and FLUSHes, many in flight at once; every
  block read must hold what the last completed write put there (zeros where none did).
  On a fresh volume, and on a clone of a snapshot whose chunks all hold other data, so
  that every write copies on write; the snapshot and the clone's blocks the trace did not
  write must then still hold the old data.
- read-only (``-w -F``): the write throughput test on a snapshot must get an error reply,
  which is what the client's ``rowrite`` test expects of a read-only export.
- oversize (``-o``), handshake (``-h``), and the write and write-with-flushes throughput
  modes (``-w``, ``-w -f``) on a fresh volume, whose data is then checked.
- TLS over TCP (the NBD project's ``tls``, ``tlshuge`` and ``tlswrongcert`` tests): both
  traces through STARTTLS with a client certificate, and a certificate from another CA
  refused. Skipped when the client was built without GnuTLS.

One ``thinstore serve`` for the module: the pool's unix socket, and TCP on loopback with
TLS offered (``--tls on``: the unix-socket tests stay plaintext) and client certificates
checked against a test CA.

The binary: $THINSTORE_NBD_TESTER, else nbd-tester-client on PATH, with the release's
integrity traces (integrity-test.tr, integrityhuge-test.tr) in its directory, as
tools/build_nbd_tester.sh DIR leaves them. CI builds it so; where that build could not
run, CI sets $THINSTORE_NBD_TESTER_UNAVAILABLE to the reason and these tests skip with it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess

import numpy as np
import pytest

from thinstore.nbd import protocol as P
from nbd_helpers import MiB, ServeProcess, cli, new_pool_dir
from test_nbd_tls import openssl, pki  # noqa: F401  (pki: a fixture, used below)

pytestmark = pytest.mark.integration

SIZE = 50 * MiB                 # the export size the NBD project's integrity tests use
BLOCK = 512                     # the client's unit of checking
TRACES = {"normal": "integrity-test.tr", "huge": "integrityhuge-test.tr"}


def client_path() -> str:
    reason = os.environ.get("THINSTORE_NBD_TESTER_UNAVAILABLE")
    if reason:
        pytest.skip(f"nbd-tester-client unavailable: {reason}")
    path = os.environ.get("THINSTORE_NBD_TESTER") or shutil.which("nbd-tester-client")
    if not path:
        pytest.skip("nbd-tester-client not found: set THINSTORE_NBD_TESTER "
                    "(tools/build_nbd_tester.sh DIR builds it)")
    assert os.access(path, os.X_OK), f"THINSTORE_NBD_TESTER={path} is not executable"
    return path


def trace(kind: str) -> str:
    path = os.path.join(os.path.dirname(client_path()), TRACES[kind])
    if not os.path.exists(path):
        pytest.skip(f"{TRACES[kind]} is not beside the client (tools/build_nbd_tester.sh "
                    f"puts it there)")
    return path


def run_client(where, export: str, *args: str, timeout: float = 300):
    """The client on export `export` of `where` (a unix socket path, or a TCP port on
    127.0.0.1); (exit code, its stdout and stderr together)."""
    address = ["-u", where] if isinstance(where, str) else ["127.0.0.1", str(where)]
    proc = subprocess.run([client_path(), *address, "-N", export, *args], capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, NBD_TEST_SILENT="1"))
    return proc.returncode, proc.stdout + proc.stderr


def need_client_tls() -> None:
    """Skip unless the client has TLS: without GnuTLS it exits 77 at once on -C."""
    code, out = run_client("/nonexistent", "x", "-C", "/nonexistent", timeout=30)
    if code == 77:
        pytest.skip("nbd-tester-client was built without GnuTLS (libgnutls28-dev)")


def trace_blocks(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Two masks over the export's 512-byte blocks: those the trace writes, and those it
    reads before any write of the trace reached them (the client expects zeros there).
    The trace is a sequence of NBD requests and simple-reply headers, as on the wire."""
    data = open(path, "rb").read()
    written = np.zeros(SIZE // BLOCK, bool)
    read_unwritten = np.zeros(SIZE // BLOCK, bool)
    at = 0
    while at < len(data):
        magic = int.from_bytes(data[at:at + 4], "big")
        if magic == P.SIMPLE_REPLY_MAGIC:
            at += P.SIMPLE_REPLY.size
            continue
        assert magic == P.REQUEST_MAGIC, f"{path}: unknown record at {at}"
        _, _, kind, _, offset, length = P.REQUEST.unpack_from(data, at)
        at += P.REQUEST.size
        blocks = slice(offset // BLOCK, (offset + length) // BLOCK)
        if kind == P.Cmd.WRITE:
            written[blocks] = True
        elif kind == P.Cmd.READ:
            read_unwritten[blocks] |= ~written[blocks]
    return written, read_unwritten


def blocks_of(path: str) -> np.ndarray:
    return np.fromfile(path, np.uint8).reshape(-1, BLOCK)


@pytest.fixture(scope="module")
def served(pki):  # noqa: F811
    """(pool, unix socket, TCP port with TLS offered, the test CA's directory)."""
    client_path()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tls = ["--tls", "on", "--tls-cert", os.path.join(pki, "server-cert.pem"),
           "--tls-key", os.path.join(pki, "server-key.pem"),
           "--tls-ca", os.path.join(pki, "ca-cert.pem")]
    with new_pool_dir("2G") as pool:
        serve = ServeProcess(pool, "--listen", str(port), *tls)
        try:
            yield pool, os.path.join(pool, "nbd.sock"), port, pki
        finally:
            serve.stop()
        assert cli("--pool", pool, "check").returncode == 0


@pytest.fixture
def server(served):
    return served[:2]


@pytest.mark.parametrize("kind", TRACES)
def test_integrity_trace_passes_on_a_fresh_volume(server, kind):
    pool, sock = server
    path = trace(kind)
    cli("--pool", pool, "create", "--size", str(SIZE), f"vol-{kind}")
    code, out = run_client(sock, f"vol-{kind}", "-i", "-t", path)
    assert code == 0, out
    assert "Integrity read test complete" in out, out


@pytest.mark.parametrize("kind", TRACES)
def test_integrity_trace_passes_on_a_clone_and_leaves_the_snapshot_whole(server, kind, tmp_path):
    """Every chunk of the clone is shared with the snapshot and holds random data, except
    the blocks the trace reads before writing (zeros, as the client expects): every write
    copies a shared chunk, keeping the parts it does not cover."""
    pool, sock = server
    path = trace(kind)
    base, written = based_on(pool, kind, f"base-{kind}", tmp_path)
    cli("--pool", pool, "clone", f"base-{kind}@gold", f"clone-{kind}")

    code, out = run_client(sock, f"clone-{kind}", "-i", "-t", path)
    assert code == 0, out
    assert "Integrity read test complete" in out, out

    cli("--pool", pool, "export", f"base-{kind}@gold", str(tmp_path / "snap.raw"))
    cli("--pool", pool, "export", f"clone-{kind}", str(tmp_path / "clone.raw"))
    assert np.array_equal(blocks_of(tmp_path / "snap.raw"), base), "the snapshot changed"
    clone = blocks_of(tmp_path / "clone.raw")
    kept = ~written
    assert kept.any() and written.any()
    assert np.array_equal(clone[kept], base[kept]), \
        "blocks the trace never wrote lost the snapshot's data in the clone"
    assert not np.array_equal(clone[written], base[written])


def based_on(pool: str, kind: str, name: str, tmp_path) -> tuple[np.ndarray, np.ndarray]:
    """A volume `name` of random data, zeros where the trace reads before writing, and
    its snapshot NAME@gold; (its 512-byte blocks, the mask of blocks the trace writes)."""
    written, zeros = trace_blocks(trace(kind))
    base = np.frombuffer(os.urandom(SIZE), np.uint8).reshape(-1, BLOCK).copy()
    base[zeros] = 0
    image = tmp_path / f"{name}.raw"
    base.tofile(image)
    cli("--pool", pool, "import", name, str(image))
    cli("--pool", pool, "snapshot", f"{name}@gold")
    image.unlink()
    return base, written


def test_four_clients_at_once_on_four_clones_of_one_snapshot(server, tmp_path):
    """Four connections copying the same shared chunks on write at the same time (one
    clone each): every trace passes, and each clone keeps the snapshot's data where its
    trace did not write."""
    pool, sock = server
    base, written = based_on(pool, "normal", "shared", tmp_path)
    names = [f"shared-c{i}" for i in range(4)]
    for name in names:
        cli("--pool", pool, "clone", "shared@gold", name)
    env = dict(os.environ, NBD_TEST_SILENT="1")
    procs = [subprocess.Popen([client_path(), "-u", sock, "-N", name, "-i", "-t", trace("normal")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for name in names]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    for name in names:
        cli("--pool", pool, "export", name, str(tmp_path / "clone.raw"))
        assert np.array_equal(blocks_of(tmp_path / "clone.raw")[~written], base[~written]), name
    cli("--pool", pool, "export", "shared@gold", str(tmp_path / "snap.raw"))
    assert np.array_equal(blocks_of(tmp_path / "snap.raw"), base), "the snapshot changed"


def test_snapshot_export_refuses_writes_as_the_client_expects(server, tmp_path):
    """The client's rowrite test (``-w -F``) passes: the first write gets an error reply.
    Without -F the same run fails, naming the server's EPERM; the snapshot is unchanged."""
    pool, sock = server
    cli("--pool", pool, "create", "--size", str(4 * MiB), "ro")
    cli("--pool", pool, "snapshot", "ro@s")
    code, out = run_client(sock, "ro@s", "-w", "-F")
    assert code == 0, out
    code, out = run_client(sock, "ro@s", "-w")
    assert code != 0
    assert "Received error from server: 1 " in out, out       # 1: EPERM
    cli("--pool", pool, "export", "ro@s", str(tmp_path / "snap.raw"))
    assert not np.fromfile(tmp_path / "snap.raw", np.uint8).any()


def test_oversize_and_handshake_tests_pass(server):
    """-o: reads of 1 MiB, 1 MiB + 14 and 2 MiB + 28 bytes are all answered alike;
    -h: an unknown option gets NBD_REP_ERR_UNSUP and NBD_OPT_ABORT ends the session."""
    pool, sock = server
    cli("--pool", pool, "create", "--size", str(8 * MiB), "small")
    code, out = run_client(sock, "small", "-o")
    assert code == 0, out
    assert out.count(": OK") == 3, out
    code, out = run_client(sock, "small", "-h")
    assert code == 0, out
    assert "Handshake test completed. No errors encountered." in out, out


@pytest.mark.parametrize("flags", [["-w"], ["-w", "-f"]], ids=["write", "write-flushes"])
def test_write_throughput_modes_write_the_whole_volume(server, flags, tmp_path):
    """The throughput modes write 1 KiB of 'X' at every offset, many requests in flight
    (with -f a FUA write and a FLUSH in every 16); the volume then holds nothing else."""
    pool, sock = server
    name = "tp" + "".join(flags).replace("-", "")
    cli("--pool", pool, "create", "--size", str(4 * MiB), name)
    code, out = run_client(sock, name, *flags)
    assert code == 0, out
    assert "Throughput write test" in out, out
    cli("--pool", pool, "export", name, str(tmp_path / "out.raw"))
    assert (np.fromfile(tmp_path / "out.raw", np.uint8) == ord("X")).all()


def tls_args(ca_dir: str, who: str = "client") -> list:
    """The client's TLS options: `who`'s certificate and key, the test CA, the server's name."""
    return ["-C", os.path.join(ca_dir, f"{who}-cert.pem"),
            "-K", os.path.join(ca_dir, f"{who}-key.pem"),
            "-A", os.path.join(ca_dir, "ca-cert.pem"), "-H", "localhost"]


@pytest.mark.parametrize("kind", TRACES)
def test_integrity_trace_passes_over_tls_on_tcp(served, kind):
    """The NBD project's tls and tlshuge tests: STARTTLS, the client's certificate
    checked against the CA, then the trace (a 47.5 MiB write in the huge one)."""
    need_client_tls()
    pool, _, port, ca_dir = served
    path = trace(kind)
    cli("--pool", pool, "create", "--size", str(SIZE), f"tls-{kind}")
    code, out = run_client(port, f"tls-{kind}", "-i", "-t", path, *tls_args(ca_dir))
    assert code == 0, out
    assert "Integrity read test complete" in out, out


def test_a_client_certificate_from_another_ca_is_refused(served, tmp_path):
    """The tlswrongcert test: a self-signed client certificate does not get in (-F:
    the client expects the failure), and without -F the client says it could not."""
    need_client_tls()
    pool, _, port, ca_dir = served
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "rogue-key.pem", "-out", "rogue-cert.pem",
            "-days", "2", "-subj", "/CN=client", cwd=str(tmp_path))
    cli("--pool", pool, "create", "--size", str(4 * MiB), "guarded")
    rogue = ["-C", str(tmp_path / "rogue-cert.pem"), "-K", str(tmp_path / "rogue-key.pem"),
             "-A", os.path.join(ca_dir, "ca-cert.pem"), "-H", "localhost"]
    code, out = run_client(port, "guarded", "-w", "-F", *rogue)
    assert code == 0, out
    code, out = run_client(port, "guarded", "-w", *rogue)
    assert code != 0
    assert "TLS handshake failed" in out and "Could not open socket" in out, out
    cli("--pool", pool, "export", "guarded", str(tmp_path / "out.raw"))
    assert not np.fromfile(tmp_path / "out.raw", np.uint8).any(), "a rogue client wrote"
