"""``thinstore serve``: export every device of the pool over NBD.

The server holds the pool (its exclusive lock) until SIGINT/SIGTERM; meanwhile
the other commands reach the pool through the control socket it opens in the
pool directory.  Listens on a unix socket (mode 0600) in the pool directory;
TCP only with ``--listen``, where a bare port binds loopback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import ssl
import sys
import threading

from thinstore.errors import UsageError

DEFAULT_SOCKET = "nbd.sock"
log = logging.getLogger("thinstore.serve")


def register(subparsers) -> None:
    from thinstore import frontends

    p = subparsers.add_parser(
        "serve", help="export every volume and snapshot over NBD",
        description="Serve every device of the pool as an NBD export named by the device "
        "(vol, vol@snap; snapshots read-only) until interrupted; with --frontend, also the "
        "named frontends in the same process.")
    found = frontends.available()
    p.add_argument("--frontend", action="append", default=[], choices=sorted(found),
                   metavar="NAME", help="also serve this frontend: "
                   + (", ".join(sorted(found)) or "none installed") + " (repeatable)")
    add_serve_arguments(p)
    for name in sorted(found):
        frontends.load(name).add_arguments(p)
    p.set_defaults(func=cmd_serve)
    for name, (_module, _cls, command) in sorted(found.items()):
        cls = frontends.load(name)
        sub = subparsers.add_parser(
            command, help=f"serve with the {name} frontend (serve --frontend {name})",
            description=(cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else None)
        add_serve_arguments(sub)
        cls.add_arguments(sub)
        sub.set_defaults(func=cmd_serve, frontend=[name])


def add_serve_arguments(p) -> None:
    """serve's own options, shared by every frontend's command."""
    p.add_argument("--socket", metavar="PATH", help="unix socket path (default POOL/nbd.sock; for a "
                   "rados:// pool, in a runtime directory: see docs/rados.md)")
    p.add_argument("--listen", metavar="[HOST:]PORT", action="append", default=[],
                   help="also listen on TCP; a bare port binds 127.0.0.1 (repeatable)")
    p.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM)")
    p.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE", help="CA that client certificates must chain to")
    p.add_argument("--tls", choices=("require", "on"),
                   help="with a certificate: 'require' (default) refuses plaintext, "
                   "'on' lets clients choose")
    p.add_argument("--read-only", action="store_true", help="export every device read-only")
    p.add_argument("--max-connections", type=_positive(int), default=64, metavar="N",
                   help="clients at once (default 64)")
    p.add_argument("--handshake-timeout", type=_positive(float), default=10.0,
                   metavar="SECONDS", help="for the whole handshake (default 10)")
    p.add_argument("--workers", type=_positive(int), default=4, metavar="N",
                   help="I/O threads per connection (default 4)")
    p.add_argument("--takeover", action="store_true",
                   help="rados:// pools: if another process holds the pool, fence it (OSD "
                   "blocklist) and take the pool over; for a holder that is dead or hung")
    p.add_argument("-v", "--verbose", action="store_true", help="log connections to stderr")


def _positive(kind):
    """An argparse type for a count or time that must be > 0: '--handshake-timeout -1'
    started a server that dropped every client, '--max-connections 0' one that took none."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text} is not a positive number")
        return value
    parse.__name__ = kind.__name__
    return parse


def parse_listen(text: str) -> tuple[str, int]:
    """``PORT`` -> loopback; ``HOST:PORT``; ``[V6]:PORT``."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host = "127.0.0.1"
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise UsageError(f"invalid --listen {text!r}: use PORT or HOST:PORT") from None
    if not 0 <= number <= 65535:
        raise UsageError(f"invalid port in --listen {text!r}")
    return host, number


def tls_context(args) -> tuple[ssl.SSLContext | None, bool]:
    """The server's TLS context and whether TLS is required (None, False without TLS)."""
    if not args.tls_cert and not args.tls_key:
        if args.tls or args.tls_ca:
            raise UsageError("--tls and --tls-ca need --tls-cert and --tls-key")
        return None, False
    if not (args.tls_cert and args.tls_key):
        raise UsageError("give both --tls-cert and --tls-key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    from thinstore.cli.files import check_input
    for name in (args.tls_cert, args.tls_key, args.tls_ca):
        if name:
            check_input(name)                  # a directory: "Is a directory"
        if name and not os.path.isfile(name):  # ssl's own error names no file
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), name)
    ctx.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_ca:
        ctx.load_verify_locations(args.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx, (args.tls or "require") == "require"


def cmd_serve(args) -> int:
    from thinstore import Pool
    from thinstore.cli.context import pool_path
    from thinstore.control import ControlServer, socket_path as control_socket_path
    from thinstore import frontends
    from thinstore.frontends import ServeContext
    from thinstore.nbd.server import NBDServer

    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s thinstore serve: %(message)s")  # a daemon's log
    path = pool_path(args)
    listens = [parse_listen(text) for text in args.listen]
    config = server_config(args)
    with Pool.open(path, takeover=getattr(args, "takeover", False)) as pool:
        server = NBDServer(pool, config)
        where = os.path.abspath(args.socket or os.path.join(pool.local_dir, DEFAULT_SOCKET))
        sock = _bind(where, server.listen_unix, where, args.socket is None)
        control = ControlServer(pool, server, nbd_socket=sock)
        running = []
        stop = stop_on_signal()
        try:  # a failed start (a TCP port in use) must not leave the unix socket behind
            bound = [_bind(f"{host}:{port}", server.listen_tcp, host, port)
                     for host, port in listens]
            warn_if_exposed(bound, config.tls_context is not None, config.tls_require)
            _bind(control_socket_path(path), control.listen)
            server.start()
            context = ServeContext(pool=pool, pool_dir=os.path.abspath(pool.local_dir),
                                   nbd_socket=sock,
                                   nbd_server=server, control=control)
            for name in dict.fromkeys(getattr(args, "frontend", None) or []):
                frontend = frontends.load(name)(context, args)
                running.append(frontend)
                frontend.start()
                control.hold_sources[name] = frontend.holds
            announce(sock, bound, config.tls_context is not None, control.path,
                     [d.name for d in pool.list()])
            for frontend in running:
                for line in frontend.describe():
                    print(line)
            sys.stdout.flush()
            wait_for_signal(stop)
        finally:
            for frontend in reversed(running):  # frontends unmount before NBD goes away
                control.hold_sources.pop(frontend.name, None)
                frontend.stop()
            control.shutdown()
            server.shutdown()
            server.release_unix()
    return 0


def _bind(where: str, listen, *args):
    """Run ``listen(*args)``; an OS error names the socket or address it was about
    ("Address already in use" alone does not say which of several)."""
    try:
        return listen(*args)
    except OSError as err:
        reason = err.strerror or str(err)
        if "too long" in reason:
            reason += " (a unix socket path has at most 107 bytes: serve a pool with a shorter path)"
        raise OSError(err.errno, reason, where) from err


def warn_if_exposed(bound, tls: bool, required: bool = True) -> None:
    """Without TLS, a TCP listener beyond loopback hands every volume, read-write, to
    anyone who can reach the port (NBD has no other authentication); say so, as the
    nbdkit and qemu-nbd manuals do, and name the fix.  ``--tls on`` leaves plaintext to
    the client's choice, which is the same exposure."""
    if tls and required:
        return
    how = "with TLS optional (--tls on)" if tls else "without TLS"
    fix = ("use --tls require" if tls else "give --tls-cert and --tls-key (and --tls-ca to "
           "demand client certificates)")
    for host, port in bound:
        if not _loopback(host):
            shown = f"[{host}]" if ":" in host else host
            log.warning("warning: listening on %s:%d %s: anyone who can reach this port can "
                        "read and write every volume; %s, or listen on 127.0.0.1",
                        shown, port, how, fix)


def _loopback(host: str) -> bool:
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def server_config(args):
    from thinstore.nbd.server import ServerConfig

    context, require = tls_context(args)
    return ServerConfig(read_only=args.read_only, tls_context=context, tls_require=require,
                        handshake_timeout=args.handshake_timeout,
                        max_connections=args.max_connections, workers=args.workers)


UNIX_PATH_MAX = 107      # bytes of sockaddr_un.sun_path a client can connect to (108 - NUL)
ANNOUNCED_DEVICES = 50   # a pool of 10,000 snapshots must not print 10,000 lines at start


def announce(sock: str, bound, tls: bool, control: str, devices=()) -> None:
    """Print the URIs clients use (NAME stands for a device name), then one per device,
    the first ANNOUNCED_DEVICES of them and a count of the rest (``thinstore list`` and
    ``nbdinfo --list`` name them all).

    Socket paths are printed absolute: the URI is pasted into another terminal, whose
    working directory is not the server's (``--pool demo-pool`` gave a relative socket).
    A pool of thousands of devices printed hundreds of KiB here, which blocked a server
    whose stdout is a pipe no one drains, and a SIGTERM could not stop it meanwhile.
    """
    scheme = "nbds" if tls else "nbd"
    sock, control = os.path.abspath(sock), os.path.abspath(control)
    if len(os.fsencode(sock)) > UNIX_PATH_MAX:
        print(f"thinstore serve: warning: the socket path is {len(os.fsencode(sock))} bytes; "
              f"clients that connect by path (nbdinfo, qemu, the kernel's) take at most "
              f"{UNIX_PATH_MAX}: give --socket a shorter path", file=sys.stderr)
    print(f"{scheme}+unix:///NAME?socket={sock}")
    for host, port in bound:
        shown = f"[{host}]" if ":" in host else host
        print(f"{scheme}://{shown}:{port}/NAME")
    print(f"control socket: {control}")
    devices = list(devices)
    for name in devices[:ANNOUNCED_DEVICES]:
        print(f"  {name}: {scheme}+unix:///{name}?socket={sock}")
    if len(devices) > ANNOUNCED_DEVICES:
        print(f"  ... and {len(devices) - ANNOUNCED_DEVICES} more devices "
              "('thinstore list' names them all)")
    sys.stdout.flush()


def stop_on_signal() -> threading.Event:
    """An event SIGINT and SIGTERM set: installed before the announce, so that a
    supervisor's SIGTERM right after it stops the server cleanly (closing the pool),
    not by the default action."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def wait_for_signal(stop: threading.Event | None = None) -> None:
    stop = stop or stop_on_signal()
    while not stop.wait(1.0):
        pass
