"""TLS: STARTTLS with X.509, plaintext refused when required, state reset after STARTTLS."""

from __future__ import annotations

import os
import ssl
import subprocess

import pytest

from thinstore.nbd import protocol as P
from nbd_helpers import (MiB, RawClient, ServeProcess, cli, info_request, need,
                         need_libnbd_python, new_pool_dir, reply_error, served, system_python)


def openssl(*args: str, cwd: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for localhost and a client certificate, libnbd's file names."""
    need("openssl")
    d = str(tmp_path_factory.mktemp("pki"))
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
            "-subj", "/CN=thinstore test CA", cwd=d)
    for who, cn, usage in (("server", "localhost", "serverAuth"), ("client", "client", "clientAuth")):
        openssl("req", *ec, "-keyout", f"{who}-key.pem", "-out", f"{who}.csr", "-subj", f"/CN={cn}",
                cwd=d)
        with open(os.path.join(d, f"{who}.ext"), "w") as f:
            f.write(f"subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage={usage}\n")
        openssl("x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
                "-CAcreateserial", "-out", f"{who}-cert.pem", "-days", "2", "-extfile",
                f"{who}.ext", cwd=d)
    return d


def server_context(pki: str, client_certs: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(pki, "server-cert.pem"), os.path.join(pki, "server-key.pem"))
    if client_certs:
        ctx.load_verify_locations(os.path.join(pki, "ca-cert.pem"))
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_context(pki: str, with_cert: bool = True) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=os.path.join(pki, "ca-cert.pem"))
    if with_cert:
        ctx.load_cert_chain(os.path.join(pki, "client-cert.pem"), os.path.join(pki, "client-key.pem"))
    return ctx


def start_tls(c: RawClient, ctx: ssl.SSLContext) -> None:
    assert c.option(P.Opt.STARTTLS) == [(P.Rep.ACK, b"")]
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")


@pytest.fixture(scope="module")
def required(pki):
    with served(tls_context=server_context(pki, client_certs=True), tls_require=True) as s:
        s.pool.create_volume("sec", 8 * MiB)
        yield s


def test_plaintext_options_get_tls_required(required):
    c = RawClient(required.sock)
    c.greet()
    for option, data in ((P.Opt.GO, info_request("sec")), (P.Opt.LIST, b""),
                         (P.Opt.STRUCTURED_REPLY, b""), (4242, b"xyz")):
        assert c.option(option, data)[-1][0] == P.Rep.ERR_TLS_REQD
    assert c.option(P.Opt.ABORT) == [(P.Rep.ACK, b"")]
    c.close()


def test_plaintext_export_name_is_disconnected(required):
    c = RawClient(required.sock)
    c.greet()
    c.send_option(P.Opt.EXPORT_NAME, b"sec")
    assert c.closed_by_server()
    c.close()


def test_a_client_without_a_certificate_is_refused(required, pki):
    c = RawClient(required.sock)
    c.greet()
    with pytest.raises((ssl.SSLError, OSError, ConnectionError)):
        start_tls(c, client_context(pki, with_cert=False))
        c.go("sec")
    c.close()


def test_starttls_then_a_full_session(required, pki):
    c = RawClient(required.sock)
    c.greet()
    start_tls(c, client_context(pki))
    assert c.option(P.Opt.STARTTLS)[-1][0] == P.Rep.ERR_INVALID, "TLS is already running"
    c.go("sec")
    data = os.urandom(64 << 10)
    c.request(P.Cmd.WRITE, 0, len(data), cookie=1, data=data)
    c.request(P.Cmd.READ, 0, len(data), cookie=2)
    assert reply_error(c.structured_reply()[1]) == 0
    cookie, chunks = c.structured_reply()
    assert cookie == 2 and chunks[0][1][8:] == data
    c.request(P.Cmd.DISC)
    c.close()


def test_state_negotiated_before_starttls_is_forgotten(pki):
    with served(tls_context=server_context(pki), tls_require=False) as s:
        s.pool.create_volume("sel", 4 * MiB)
        c = RawClient(s.sock)
        c.greet()
        assert c.option(P.Opt.STRUCTURED_REPLY) == [(P.Rep.ACK, b"")]
        start_tls(c, client_context(pki))
        _, flags = c.go("sel", structured=False)
        assert not flags & P.TF_SEND_DF, "structured replies were forgotten"
        c.request(P.Cmd.READ, 0, 512, cookie=3)
        assert c.simple_reply(512) == (3, 0, bytes(512))
        c.close()
        plain = RawClient(s.sock)
        plain.greet()
        plain.go("sel", structured=False)      # TLS is optional in 'on' mode
        plain.close()


LIBNBD_TLS = r"""
import sys, nbd
h = nbd.NBD()
h.set_tls(nbd.TLS_REQUIRE)
h.set_tls_certificates(sys.argv[2])
h.connect_uri(sys.argv[1])
assert h.get_tls_negotiated()
h.pwrite(b"\x42" * 65536, 65536)
assert h.pread(65536, 65536) == b"\x42" * 65536
h.flush()
h.shutdown()
print("ok")
"""


def test_libnbd_over_tls(required, pki):
    need_libnbd_python()
    out = system_python(LIBNBD_TLS, f"nbds+unix:///sec?socket={required.sock}", pki)
    assert out.stdout.strip() == "ok"


def test_serve_with_a_certificate_requires_tls(pki):
    need_libnbd_python()
    with new_pool_dir() as pool:
        s = ServeProcess(pool, "--tls-cert", os.path.join(pki, "server-cert.pem"),
                         "--tls-key", os.path.join(pki, "server-key.pem"))
        try:
            sock = os.path.join(pool, "nbd.sock")
            assert f"nbds+unix:///NAME?socket={sock}" in s.lines
            cli("--pool", pool, "create", "sec", "--size", "1M")
            plain = RawClient(sock)
            plain.greet()
            assert plain.option(P.Opt.LIST)[-1][0] == P.Rep.ERR_TLS_REQD
            plain.close()
            out = system_python(LIBNBD_TLS, f"nbds+unix:///sec?socket={sock}", pki)
            assert out.stdout.strip() == "ok"
        finally:
            assert s.stop() == 0
