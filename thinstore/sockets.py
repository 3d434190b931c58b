"""Unix sockets that a pool's servers bind and its clients trust.

Three rules, shared by the NBD socket and the control socket:

- A path is only ever replaced when it is a socket nobody answers on (a server that
  died left it).  A regular file, a directory or any other non-socket is never
  removed, and a live socket (another server listens there) is never taken over;
  :class:`SocketInUse` says which of the two it is.
- A server removes its socket at exit only if the path is still the socket it bound
  (same device and inode), so it never deletes a successor's.
- Trust goes by the peer's credentials (SO_PEERCRED, socket(7)): a pool's sockets
  are served by root or the pool directory's owner, and answer only those.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
import struct

from thinstore.errors import SocketInUse, UntrustedPeer

_UCRED = struct.Struct("3i")   # struct ucred {pid_t pid; uid_t uid; gid_t gid;}
__all__ = ["SocketInUse", "UntrustedPeer", "clear_stale", "bind_private", "release",
           "peer_credentials", "trusted_uids", "untrusted_peer", "short_socket_path"]


@contextlib.contextmanager
def short_socket_path(path: str):
    """A name for `path` that fits a sockaddr_un (107 bytes): a pool may live deep.

    Linux resolves /proc/self/fd/N/NAME through the open directory N, so binding or
    connecting there reaches the same socket file whatever the directory's length.
    """
    if len(os.fsencode(path)) < 100:
        yield path
        return
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)


def clear_stale(path: str, what: str = "socket", owned: bool = False) -> None:
    """Make `path` free for bind(): remove it only if it is a socket nobody listens on.

    Raises SocketInUse for a path that is not a socket (never removed) or a socket
    where a server answers (another server is live there) -- unless `owned`: a socket in
    the pool's own directory, bound by the process that now holds the pool's lock, whose
    answering server is a holder that lost the pool (a rados:// pool taken over from a
    paused or fenced process) and may no longer serve it.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a socket"
        raise SocketInUse(f"{path} exists and is {kind}: refusing to replace it with the "
                          f"{what}; remove it yourself or choose another path")
    if not owned and _answers(path):
        raise SocketInUse(f"{path}: another server is listening on this socket: stop it "
                          f"first, or give this {what} another path")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _answers(path: str) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        with short_socket_path(path) as short:
            probe.connect(short)
        return True
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as err:      # EACCES: someone else's socket; EAGAIN: a full backlog
        return err.errno != errno.ECONNREFUSED
    finally:
        probe.close()


def bind_private(path: str, what: str = "socket",
                 owned: bool = False) -> tuple[socket.socket, tuple[int, int]]:
    """A listening-ready AF_UNIX socket at `path`, mode 0600 whatever the umask.

    Returns the socket and the (st_dev, st_ino) of the file it made, for :func:`release`.
    """
    clear_stale(path, what, owned)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with short_socket_path(path) as short:
            sock.bind(short)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old)
    st = os.lstat(path)
    return sock, (st.st_dev, st.st_ino)


def release(path: str, identity: tuple[int, int] | None) -> None:
    """Remove the socket file at `path` if it is still the one bound (same inode)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if identity is None or (st.st_dev, st.st_ino) == tuple(identity):
        with contextlib.suppress(OSError):
            os.unlink(path)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process on the other end of a connected AF_UNIX socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return _UCRED.unpack(raw)


def trusted_uids(pool_dir: str) -> set[int]:
    """Who may serve a pool or talk to its server: root, the pool directory's owner, and
    this process's own user (who could open the pool files directly anyway)."""
    uids = {0, os.geteuid()}
    with contextlib.suppress(OSError):
        uids.add(os.stat(pool_dir).st_uid)
    return uids


def untrusted_peer(sock: socket.socket, pool_dir: str) -> int | None:
    """The uid of the peer of an accepted AF_UNIX connection that :func:`trusted_uids`
    does not list, else None (a trusted peer, or not a unix socket: TCP has its own
    guard, TLS).  A server closes such a connection before reading from it: the socket's
    0600 mode is the first fence, this the second when someone loosened the mode."""
    if sock.family != socket.AF_UNIX:
        return None
    _pid, uid, _gid = peer_credentials(sock)
    return None if uid in trusted_uids(pool_dir) else uid


def user_name(uid: int) -> str:
    try:
        import pwd
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except (KeyError, ImportError):
        return f"uid {uid}"
