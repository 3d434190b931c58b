"""The control socket: pool management while a server holds the pool.

A running ``thinstore serve`` holds the pool's exclusive lock, so the CLI cannot
open the pool itself.  Instead the server listens on ``POOL/control.sock``
(mode 0600; each side checks the other's SO_PEERCRED: root, the pool directory's
owner or its own user, see thinstore/sockets.py) and runs management calls for it; :class:`RemotePool` is the client,
with the same management methods as :class:`thinstore.Pool`.  Both sides share
the pool lock discipline of the core, so a snapshot taken here holds every
write the NBD server acknowledged before it.

Wire format: JSON lines.  A request is ``{"op": NAME, "args": {...}}``; the
answer is ``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"type":
CLASS, "message": TEXT, "errno": N, "exit_code": N}}``.  Errors come back as
the same :mod:`thinstore.errors` class, so the CLI reports them unchanged.

The read-only commands and receive (thinstore/online.py) are ops too: their
request line may carry file descriptors (SCM_RIGHTS: the client's stdout for a
send, its stdin for a receive) and ``"fds": N`` says how many; before the answer
the server may send ``{"event": {...}}`` lines (progress).

The package: the wire format both sides share, then each side::

    wire.py     the JSON-lines format: ops, limits, socket path, errors to and from dicts
    server.py   ControlServer: the listener, peer checks, request dispatch
    guards.py   the ops the server refuses while a device is in use (a mixin of it)
    client.py   RemotePool, the client with Pool's management methods
"""

from thinstore.sockets import short_socket_path  # noqa: F401  (kept importable from here)

from .client import RemotePool
from .guards import RELEASE_POLLS
from .server import ControlServer
from .wire import (IDLE_TIMEOUT, MAX_CLIENTS, MAX_FDS, MAX_LINE, OPS, SOCKET_NAME,
                   socket_path)

__all__ = ["ControlServer", "RemotePool", "socket_path", "short_socket_path", "OPS",
           "SOCKET_NAME", "MAX_LINE", "MAX_CLIENTS", "MAX_FDS", "IDLE_TIMEOUT",
           "RELEASE_POLLS"]
