"""gRPC plumbing shared by the CSI services: one error type, one mapping to status codes.

A handler raises :class:`RPCError` with the gRPC status code the spec names for the case
(spec.md, each call's "Errors" table); :func:`handler` turns it, and every
:class:`thinstore.errors.ThinstoreError` the pool raises, into ``context.abort``::

    NoSuchDevice -> NOT_FOUND            DeviceExists -> ALREADY_EXISTS
    DeviceBusy   -> FAILED_PRECONDITION  PoolFull     -> RESOURCE_EXHAUSTED
    OutOfRange   -> OUT_OF_RANGE         UsageError   -> INVALID_ARGUMENT
    any other ThinstoreError or OSError  -> INTERNAL (logged with its traceback)

so that a bad request gets a clear status and message and the service keeps serving.
"""

from __future__ import annotations

import functools
import logging
import os

import grpc

from thinstore import errors as E

log = logging.getLogger("thinstore.csi")

Code = grpc.StatusCode

_CODES = [
    (E.NoSuchDevice, Code.NOT_FOUND),
    (E.DeviceExists, Code.ALREADY_EXISTS),
    (E.DeviceBusy, Code.FAILED_PRECONDITION),
    (E.PoolFull, Code.RESOURCE_EXHAUSTED),
    (E.OutOfRange, Code.OUT_OF_RANGE),
    (E.UsageError, Code.INVALID_ARGUMENT),
]


class RPCError(Exception):
    """Abort the call with ``code`` and ``message``."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def code_for(err: Exception) -> grpc.StatusCode:
    for cls, code in _CODES:
        if isinstance(err, cls):
            return code
    return Code.INTERNAL


def handler(method):
    """Wrap a unary servicer method: errors become statuses (see the module docstring)."""
    @functools.wraps(method)
    def call(self, request, context):
        try:
            return method(self, request, context)
        except RPCError as err:
            context.abort(err.code, err.message)
        except (E.ThinstoreError, OSError) as err:
            code = code_for(err)
            if code is Code.INTERNAL:
                log.exception("%s failed", method.__name__)
            context.abort(code, str(err))
    return call


def streaming(method):
    """Like :func:`handler`, for a method that yields responses."""
    @functools.wraps(method)
    def call(self, request, context):
        try:
            yield from method(self, request, context)
        except RPCError as err:
            context.abort(err.code, err.message)
        except (E.ThinstoreError, OSError) as err:
            code = code_for(err)
            if code is Code.INTERNAL:
                log.exception("%s failed", method.__name__)
            context.abort(code, str(err))
    return call


def require(value, what: str):
    """INVALID_ARGUMENT unless a required field is set (spec.md "Error Scheme")."""
    if not value:
        raise RPCError(Code.INVALID_ARGUMENT, f"{what} is required")
    return value


def page(ids: list[str], starting_token: str, max_entries: int) -> tuple[list[str], str]:
    """One page of sorted ``ids`` and the token of the next (spec.md ListVolumes).

    The token is the id the next page starts at; ids at or after it are listed, so an
    entry deleted between pages skips nothing and an entry added shows up once.  A token
    that is no id of this plugin's is ABORTED (the CO starts over), a negative
    ``max_entries`` INVALID_ARGUMENT; 0 means every entry.
    """
    if max_entries < 0:
        raise RPCError(Code.INVALID_ARGUMENT, f"max_entries {max_entries} is negative")
    ids = sorted(ids)
    if starting_token:
        from .ids import PREFIX
        if not starting_token.startswith(PREFIX):
            raise RPCError(Code.ABORTED, f"starting_token {starting_token!r} is not one "
                           "this plugin gave out; list again without a token")
        ids = [i for i in ids if i >= starting_token]
    if max_entries and len(ids) > max_entries:
        return ids[:max_entries], ids[max_entries]
    return ids, ""


#: the environment variable that names a crash point (tests/test_csi_crash.py)
CRASH_ENV = "THINSTORE_CSI_CRASH_AT"


def crash_point(name: str) -> None:
    """Die here, at once and without cleanup, when the test asked for this point: the
    way a killed plugin stops between a create and its reply."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(86)
