"""How a command reaches the pool it manages.

Handlers get the pool only from :func:`open_pool` and call only the management methods of
docs/api.md (create_volume, snapshot, clone, destroy, rename, rollback, resize, list, info,
status, open_device), so that a proxy with those methods can stand in for a pool that a
running server holds.
"""

from __future__ import annotations

import contextlib
import os

from thinstore.errors import CorruptMetadata, PoolLocked, UsageError


@contextlib.contextmanager
def open_pool(args):
    """Yield the pool named by ``args.pool``; closing it commits and releases the lock.

    While ``thinstore serve`` holds the pool, its control socket answers and the
    commands go through it (a :class:`thinstore.control.RemotePool`) instead.
    """
    path = pool_path(args)
    from thinstore.control import RemotePool

    remote = RemotePool.connect(path)
    if remote is not None:
        with remote:
            yield remote
        return
    from thinstore import Pool

    with _opening(path), Pool.open(path) as pool:
        yield pool


@contextlib.contextmanager
def served_pool(args):
    """Yield the RemotePool of the server holding ``args.pool``, or None if none does.

    send, receive, diff, check, dump and scrub run inside that server when there is
    one (thinstore/online.py); otherwise they open the pool themselves.
    """
    from thinstore.control import RemotePool

    remote = RemotePool.connect(pool_path(args))
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
    from thinstore.control import RemotePool

    remote = RemotePool.connect(path)
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
        raise UsageError("no pool given: pass --pool DIR or set THINSTORE_POOL")
    return args.pool
