"""The control socket's wire format: JSON lines (see the package docstring).

A request is ``{"op": NAME, "args": {...}}`` (``"fds": N`` when it carries
descriptors); the answer ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": {...}}``. Both sides use this module alone for what goes on the wire: the
ops and their parameters, the limits, where the socket is, and how a result and an
error become JSON and an error becomes the same exception class again.
"""

from __future__ import annotations

import json
import os

from thinstore import errors
from thinstore.errors import ThinstoreError

SOCKET_NAME = "control.sock"
MAX_LINE = 64 << 10
MAX_CLIENTS = 128
MAX_FDS = 4               # descriptors one request may pass (SCM_RIGHTS)
IDLE_TIMEOUT = 60.0       # a control client silent this long is dropped

#: op -> (parameter names, whether the result is a DeviceInfo / list of them)
OPS = {
    "create_volume": (("name", "size"), "info"),
    "snapshot": (("name",), "info"),
    "clone": (("snapshot", "name"), "info"),
    "destroy": (("name", "force"), None),
    "rename": (("old", "new"), "info"),
    "rollback": (("snapshot",), "info"),
    "resize": (("name", "size", "shrink"), "info"),
    "list": ((), "infos"),
    "info": (("name",), "info"),
    "status": ((), None),
    "grow": (("capacity",), None),
    "commit": ((), None),
    "connections": ((), None),
    "ping": ((), None),
    "counters": ((), None),
    "iostat": ((), None),
    "holds": ((), None),
}


def socket_path(pool: str) -> str:
    """The control socket of the pool at `pool` (a directory or a rados:// URI)."""
    from thinstore.storage import runtime_dir
    return os.path.join(runtime_dir(pool), SOCKET_NAME)


def to_wire(value, shape):
    if value is None or shape is None:
        return _plain(value)
    if shape == "infos":
        return [item.to_dict() for item in value]
    return value.to_dict() if hasattr(value, "to_dict") else _plain(value)


def _plain(value):
    """JSON-safe copy (numpy scalars and tuples become ints and lists)."""
    return json.loads(json.dumps(value, default=_default))


def _default(value):
    if hasattr(value, "item"):
        return value.item()
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def error_dict(exc: ThinstoreError) -> dict:
    return {"type": type(exc).__name__, "message": str(exc), "errno": exc.errno,
            "exit_code": exc.exit_code}


def error_from_dict(data: dict) -> Exception:
    if data.get("type") == "OSError":
        return OSError(data.get("errno"), data.get("message"), data.get("filename"))
    cls = getattr(errors, str(data.get("type")), None)
    if not (isinstance(cls, type) and issubclass(cls, ThinstoreError)):
        cls = ThinstoreError
    return cls(data.get("message"))
