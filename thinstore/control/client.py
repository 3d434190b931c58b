"""The control socket's client: RemotePool, a pool a running server holds.

The CLI uses it when a server holds the pool's lock: the same management methods as
thinstore.Pool, the same results (DeviceInfo, the status dict) and exceptions (the
error's class is sent by name, wire.py). `stream` also passes descriptors and
relays the event lines of the online ops (thinstore/online.py).
"""

from __future__ import annotations

import json
import os
import socket
import threading

from thinstore import errors, sockets
from thinstore.errors import DeviceBusy, ServerGone, ThinstoreError
from thinstore.sockets import short_socket_path

from .wire import error_from_dict, socket_path


class RemotePool:
    """A pool held by a running server, managed over its control socket.

    Offers the management methods of :class:`thinstore.Pool` with the same
    results (DeviceInfo objects, the status dict) and the same exceptions.
    """

    def __init__(self, path: str, timeout: float = 60.0):
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        with short_socket_path(socket_path(path)) as short:
            self._sock.connect(short)
        self._check_server()
        self._reader = self._sock.makefile("rb")
        self._lock = threading.Lock()

    def _check_server(self) -> None:
        """Trust the answers only of a server run by root or the pool's owner (SO_PEERCRED):
        in a directory others could write to, anyone could have planted this socket."""
        _pid, uid, _gid = sockets.peer_credentials(self._sock)
        if uid not in sockets.trusted_uids(self.path):
            self._sock.close()
            where = socket_path(self.path)
            raise errors.UntrustedPeer(
                f"{where} is served by {sockets.user_name(uid)}, neither root nor the owner "
                f"of pool {self.path}: not trusting it; remove that socket and make the pool "
                f"directory writable by its owner only (chmod 700 {self.path})")

    #: how long connect() waits for a server's answer by default
    ANSWER_TIMEOUT = 5.0

    @classmethod
    def connect(cls, path: str, timeout: float | None = None) -> "RemotePool | None":
        """A RemotePool if a live server answers in ``path`` within ``timeout`` seconds
        (default ANSWER_TIMEOUT), else None."""
        if not os.path.exists(socket_path(path)):
            return None
        try:
            remote = cls(path, timeout=cls.ANSWER_TIMEOUT if timeout is None else timeout)
            remote.ping()
        except errors.UntrustedPeer:
            raise                       # a planted or refusing socket: say so, do not fall back
        except (OSError, ThinstoreError):
            return None
        remote._sock.settimeout(None)
        return remote

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def request(self, op: str, **args):
        return self.stream(op, **args)

    def stream(self, op: str, fds=(), on_event=None, **args):
        """Run `op` with `args`, passing descriptors `fds` (the server uses them, the
        caller keeps its own); each event line before the answer goes to on_event."""
        message = {"op": op, "args": args}
        if fds:
            message["fds"] = len(fds)
        with self._lock:
            data = json.dumps(message).encode() + b"\n"
            if fds:
                sent = socket.send_fds(self._sock, [data], list(fds))
                self._sock.sendall(data[sent:])
            else:
                self._sock.sendall(data)
            while True:
                line = self._reader.readline()
                if not line:
                    raise ServerGone("the server closed the control connection "
                                     f"during {op!r} (did it stop?)")
                answer = json.loads(line)
                if "event" not in answer:
                    break
                if on_event is not None:
                    on_event(answer["event"])
        if not answer.get("ok"):
            raise error_from_dict(answer.get("error") or {})
        return answer.get("result")

    # -- the Pool management API ---------------------------------------------------
    def create_volume(self, name, size):
        return _info(self.request("create_volume", name=name, size=int(size)))

    def snapshot(self, name):
        return _info(self.request("snapshot", name=name))

    def clone(self, snapshot, name):
        return _info(self.request("clone", snapshot=snapshot, name=name))

    def destroy(self, name, force=False):
        return self.request("destroy", name=name, force=bool(force))

    def rename(self, old, new):
        return _info(self.request("rename", old=old, new=new))

    def rollback(self, snapshot):
        return _info(self.request("rollback", snapshot=snapshot))

    def resize(self, name, size, shrink=False):
        return _info(self.request("resize", name=name, size=int(size), shrink=bool(shrink)))

    def list(self):
        return [_info(item) for item in self.request("list")]

    def info(self, name):
        return _info(self.request("info", name=name))

    def status(self):
        return self.request("status")

    def grow(self, capacity):
        return self.request("grow", capacity=int(capacity))

    @property
    def capacity(self) -> int:
        return int(self.status()["capacity"])

    @property
    def chunk_size(self) -> int:
        return int(self.status()["chunk_size"])

    def commit(self):
        return self.request("commit")

    def connections(self):
        return self.request("connections")

    def ping(self):
        return self.request("ping")

    def iostat(self):
        return self.request("iostat")

    def holds(self) -> list:
        """The frontends' holds on the served pool's devices: [Hold]
        (thinstore/frontends/holds.py)."""
        from thinstore.frontends.holds import Hold
        return [Hold.from_dict(h) for h in self.request("holds")]

    def counters(self) -> dict:
        """The serving pool's data-path counters (as :attr:`thinstore.Pool.counters`)."""
        return self.request("iostat")["pool"]

    def open_device(self, name):
        """A Device-like NBD connection to the server's export ``name``."""
        from thinstore.nbd.client import NBDDevice
        endpoint = self.ping().get("nbd_socket")
        if not endpoint:
            raise DeviceBusy(f"the server holding {self.path} exports no unix socket: "
                             "stop it to reach device data directly")
        return NBDDevice(endpoint, name, self.chunk_size)


def _info(data):
    """A DeviceInfo again (the core's class), so callers see what Pool returns."""
    if not isinstance(data, dict):
        return data
    from thinstore.device import DeviceInfo
    return DeviceInfo(**data)
