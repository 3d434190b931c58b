"""How a command reaches the pool it manages.

Handlers get the pool only from :func:`open_pool` and call only the management methods of
docs/api.md (create_volume, snapshot, clone, destroy, rename, rollback, resize, list, info,
status, open_device), so that a proxy with those methods can stand in for a pool that a
running server holds.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time

from thinstore.errors import CorruptMetadata, PoolLocked, UsageError


@contextlib.contextmanager
def open_pool(args):
    """Yield the pool named by ``args.pool``; closing it commits and releases the lock.

    While ``thinstore serve`` holds the pool, its control socket answers and the
    commands go through it (a :class:`thinstore.control.RemotePool`) instead.
    """
    path = pool_path(args)
    remote = connect(path)
    if remote is not None:
        with remote:
            yield remote
        return
    from thinstore import Pool

    with _opening(path):
        try:
            pool = Pool.open(path)
        except PoolLocked as err:
            pool = connect(path)                # a server started while this one waited
            if pool is None:
                silent = _silent_server(path)
                if silent is None:
                    raise
                raise PoolLocked(f"{err}; {silent}") from err
        with pool:
            yield pool


def _silent_server(path: str) -> str | None:
    """Why commands did not go through the holder's server, when its control socket takes
    connections but does not answer (the process is stopped, SIGSTOP, or hung): a
    stopped server's socket still accepts, so the plain "in use" said nothing of it."""
    import socket

    from thinstore import sockets
    from thinstore.control import socket_path
    where = socket_path(path)
    if not os.path.exists(where):
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(where)
        pid = sockets.peer_credentials(s)[0]
    except OSError:
        return None
    finally:
        s.close()
    return (f"its server (process {pid}) takes connections on {where} but did not answer "
            f"in {answer_timeout():g} s: it is stopped or hung (resume it with 'kill -CONT {pid}', or stop it)")


#: How long a command waits for another process's pool lock unless --wait says otherwise.
DEFAULT_WAIT = 10.0
_NOTE_AFTER = 1.0       # a wait longer than this is said on stderr, once
_MIN_ANSWER = 0.5       # a live server answers a ping in milliseconds; --no-wait gives it this
_WAIT = {"seconds": None}    # the command's --wait, while lock_wait runs


def answer_timeout() -> float:
    """How long to wait for a server's answer on the control socket: within the command's
    --wait (a stopped server once cost 5 s per try whatever --wait said), at least
    _MIN_ANSWER, at most the client's default."""
    from thinstore.control import RemotePool
    seconds = _WAIT["seconds"]
    if seconds is None:
        return RemotePool.ANSWER_TIMEOUT
    return min(RemotePool.ANSWER_TIMEOUT, max(seconds, _MIN_ANSWER))


def connect(path: str, timeout: float | None = None):
    """The RemotePool of the server answering for ``path`` within answer_timeout(), or
    None. A server that let one try time out is not asked again by this command: it is
    stopped or hung, and each try cost the whole timeout."""
    from thinstore.control import RemotePool
    if path in _WAIT.setdefault("silent", set()):
        return None
    timeout = answer_timeout() if timeout is None else timeout
    started = time.monotonic()
    remote = RemotePool.connect(path, timeout=timeout)
    if remote is None and time.monotonic() - started >= timeout * 0.9:
        _WAIT["silent"].add(path)
    return remote


@contextlib.contextmanager
def lock_wait(seconds: float):
    """While inside, opening a pool that another process holds waits up to ``seconds`` for
    it (LVM waits for its lock likewise), polling; it gives up at once when a server
    answers on the pool's control socket, since a server holds its pool until stopped
    (and the commands it carries go through it). After a second it says on stderr whom
    it waits for."""
    from thinstore.storage import DirLock

    state = {"said": False, "asked": -1.0, "start": time.monotonic()}

    def keep_waiting(path: str, holder: str, waited: float) -> bool:
        waited = max(waited, time.monotonic() - state["start"])   # a silent server's too
        if waited >= seconds:
            return False
        if waited - state["asked"] >= 1.0:         # at once, then once a second
            state["asked"] = waited
            remote = connect(path, min(answer_timeout(), max(seconds - waited, 0.05)))
            if remote is not None:
                remote.close()
                return False
        if waited >= _NOTE_AFTER and not state["said"]:
            state["said"] = True
            print(f"thinstore: note: pool {path} is held by process {holder}; waiting up to "
                  f"{seconds:g} s for it (--wait SECONDS, --no-wait)", file=sys.stderr)
        return True

    before, wait_before = DirLock.waiting, _WAIT["seconds"]
    DirLock.waiting = keep_waiting if seconds > 0 else None
    _WAIT["seconds"] = seconds
    try:
        yield
    finally:
        DirLock.waiting, _WAIT["seconds"] = before, wait_before


@contextlib.contextmanager
def served_pool(args):
    """Yield the RemotePool of the server holding ``args.pool``, or None if none does.

    send, receive, diff, check, dump and scrub run inside that server when there is
    one (thinstore/online.py); otherwise they open the pool themselves.
    """
    remote = connect(pool_path(args))
    if remote is None:
        yield None
        return
    with remote:
        yield remote


@contextlib.contextmanager
def open_local_pool(args, command: str):
    """Yield the pool itself, for commands the control socket does not carry.

    diff, send and receive read and write block maps directly, which a
    :class:`thinstore.control.RemotePool` cannot offer; while a server holds the pool
    they stop with exit 5 and say so, instead of failing half way through a proxy.
    """
    path = pool_path(args)
    remote = connect(path)
    if remote is not None:
        remote.close()
        raise PoolLocked(f"pool {path} is being served (thinstore serve holds it); "
                         f"'{command}' needs the pool itself: stop the server first")
    from thinstore import Pool

    with _opening(path), Pool.open(path) as pool:
        yield pool


@contextlib.contextmanager
def needs_pool_itself(args, command: str):
    """For commands that work on the pool's files (check, repair, dump, restore, scrub):
    while another process holds the pool, say that this command cannot go through a
    server's control socket (the core's message suggests it), and what to do instead."""
    try:
        yield
    except PoolLocked as err:
        path = pool_path(args)
        from thinstore.storage import is_rados
        if is_rados(path):
            raise PoolLocked(f"{err}; '{command}' needs the pool itself, not a server's "
                             "control socket") from err
        try:
            with open(os.path.join(path, "lock")) as f:
                holder = f.read().strip() or "another process"
        except OSError:
            raise err from None
        raise PoolLocked(f"pool {path} is in use by process {holder}: '{command}' needs the "
                         "pool itself, not a server's control socket: stop that process "
                         "(e.g. the 'thinstore serve') first") from err


@contextlib.contextmanager
def _opening(path: str):
    """Say which pool is damaged and what to do: the core's message names only the block."""
    try:
        yield
    except CorruptMetadata as err:
        if path in str(err):
            raise
        raise CorruptMetadata(f"pool {path}: metadata damaged ({err}); "
                              "run 'thinstore check' or restore from a replica") from err


def pool_path(args) -> str:
    """The pool directory from ``--pool`` or THINSTORE_POOL; a usage error when neither."""
    if not getattr(args, "pool", None):
        raise UsageError("no pool given: pass --pool DIR (or rados://CEPHPOOL/NAME) "
                         "or set THINSTORE_POOL")
    if os.path.exists(args.pool) and not os.path.isdir(args.pool):   # a file, FIFO, device
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), args.pool)
    return args.pool
