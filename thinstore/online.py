"""Read-only commands, and receive, while a server holds the pool: run in the server.

``send``, ``diff``, ``check``, ``dump``, ``scrub`` and ``receive`` need the pool
itself (its maps, its metadata file, its data chunks), which only the process that
holds the pool lock has. So the CLI asks that process, over the control socket
(thinstore/control/), and the server runs the command on its open pool, beside
the NBD clients, under the pool's own locking:

- ``send`` and ``receive``: the client passes its stdout (or ``-o FILE``) or its
  stdin (or ``-i FILE``) with SCM_RIGHTS; the server writes or reads the stream
  there itself, so no byte of the stream is copied through the control socket.
  A send reads two snapshots, which nothing changes; while it runs they are
  registered as read (ControlServer.readers) and ``destroy`` refuses them, even
  forced, so their chunks cannot be freed and reused under the stream.
- ``diff``: the block-map walk under the pool lock, as offline.
- ``check`` and ``dump``: the committed generation on disk, pinned
  (Pool.pinned_generation) so that commits going on meanwhile reuse none of its
  blocks: they read a whole generation, never a torn one.
- ``scrub``: batch by batch under the pool lock, paced by a rate (bytes/s).

The answers are what the offline functions return, as dicts; the CLI prints them
the way it prints the offline results, so output and exit codes are the same.
Progress goes to the client as event lines ``{"event": {"progress": [done, total]}}``.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np

from . import replication as RP
from .errors import DeviceBusy, ProtocolError, ThinstoreError


class ClientGone(ThinstoreError):
    """The control client of a running online command hung up."""


#: op -> parameter names
OPS = {
    "diff": ("a", "b"),
    "send": ("snapshot", "base"),
    "receive": ("name", "resume", "force", "stream_size"),
    "abort_receive": ("name",),
    "check": (),
    "dump": (),
    "scrub": ("rate",),
}
FDS = {"send": 1, "receive": 1}      # descriptors an op needs
SCRUB_RATE = 64 << 20                # default pace of an online scrub (bytes/s)
EVENT_INTERVAL = 0.2                 # seconds between progress events


def run(server, op: str, args: dict, fds: list[int], emit) -> object:
    """Run online op `op` for a control client; `fds` are ours to close."""
    try:
        if not isinstance(args, dict) or set(args) - set(OPS[op]):
            raise ProtocolError(f"{op} takes {', '.join(OPS[op]) or 'no arguments'}")
        if len(fds) != FDS.get(op, 0):
            raise ProtocolError(f"{op} needs {FDS.get(op, 0)} descriptor(s), got {len(fds)}")
        ctx = _Context(server, fds, emit)
        return globals()["_" + op](ctx, **args)
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        fds.clear()


class _Context:
    def __init__(self, server, fds, emit):
        self.server, self.pool, self.fds, self.emit = server, server.pool, fds, emit
        self._last = 0.0
        self._done = 0

    def file(self, mode: str):
        """The passed descriptor as a file; it closes the descriptor."""
        return os.fdopen(self.fds.pop(), mode)

    def progress(self, done: int, total: int, final: bool = False) -> None:
        """Tell the client how far we are (at most every EVENT_INTERVAL). A client that
        has gone (^C) stops the command here, as an interrupt stops it offline: a
        receive keeps what it applied (resumable), a send ends its stream unfinished."""
        if self.emit is not None and getattr(self.emit, "gone", lambda: False)():
            raise ClientGone("the client went away (interrupted)")
        now = time.monotonic()
        if self.emit is not None and (final or now - self._last >= EVENT_INTERVAL):
            self._last = now
            self.emit({"progress": [int(done), int(total)]})

    def delta(self, n: int, total: int) -> None:
        """RP's progress shape: bytes since the last call."""
        self._done += n
        self.progress(self._done, total, self._done >= total)

    @contextlib.contextmanager
    def reading(self, *names):
        """Devices this command reads: destroy refuses them until it is done."""
        names = [n for n in names if n]
        srv = self.server
        with srv.readers_lock:
            for n in names:
                srv.readers[n] = srv.readers.get(n, 0) + 1
        try:
            yield
        finally:
            with srv.readers_lock:
                for n in names:
                    srv.readers[n] -= 1
                    if not srv.readers[n]:
                        del srv.readers[n]


def _diff(ctx: _Context, a: str, b: str | None = None) -> dict:
    return RP.diff(ctx.pool, a, b).to_dict()


def _send(ctx: _Context, snapshot: str, base: str | None = None) -> dict:
    with ctx.reading(snapshot, base), ctx.file("wb") as out:
        stats = RP.send(ctx.pool, snapshot, out, base, progress=ctx.delta)
    return {"snapshot": stats.snapshot, "changed_bytes": stats.changed_bytes,
            "stream_bytes": stats.stream_bytes, "records": stats.records}


def _receive(ctx: _Context, name: str, resume: bool = False, force: bool = False,
             stream_size: int | None = None) -> dict:
    """A receive into a served pool; the result is exported the moment it is published.

    Refused while NBD clients have volume NAME open: publishing replaces its content
    (as rollback would) under them.
    """
    ctx.server.refuse_held(name, "receive")       # a frontend's volume: as rollback
    sessions = ctx.server.sessions
    if sessions is not None and sessions.connections(name):
        raise DeviceBusy(f"{name!r} has {sessions.connections(name)} open NBD "
                         "connection(s): a receive would change it under them; "
                         "disconnect them first")
    with _receiving(ctx.server, name), ctx.file("rb") as inp, RP.full_pool_hint(ctx.pool, name):
        stats = RP.receive(ctx.pool, name, inp, resume=resume, force=force,
                           progress=ctx.delta, stream_size=stream_size)
    return {"snapshot": stats.snapshot, "records": stats.records, "skipped": stats.skipped,
            "stream_bytes": stats.stream_bytes}


@contextlib.contextmanager
def _receiving(server, name: str):
    """One receive into a volume at a time (two would share one workspace)."""
    key = "%receive:" + name     # '%' is in no device name: no device's readers count
    with server.readers_lock:
        if server.readers.get(key):
            raise DeviceBusy(f"a receive into {name!r} is running already")
        server.readers[key] = 1
    try:
        yield
    finally:
        with server.readers_lock:
            server.readers.pop(key, None)


def _abort_receive(ctx: _Context, name: str) -> bool:
    with _receiving(ctx.server, name):
        return RP.abort_receive(ctx.pool, name)


def _check(ctx: _Context) -> dict:
    from .check import check_served
    return check_served(ctx.pool).to_dict()


def _dump(ctx: _Context) -> dict:
    from .dump import dump_served
    doc, problems = dump_served(ctx.pool)
    return {"doc": doc, "problems": [str(p) for p in problems]}


def _scrub(ctx: _Context, rate: int | None = None) -> dict:
    from .scrub import scrub_pool
    pool = ctx.pool
    with pool.lock:
        total = int(np.count_nonzero(pool.md.space.refs.arr))
    rate = SCRUB_RATE if rate is None else int(rate)
    report = scrub_pool(pool, lambda done: ctx.progress(done, total, done >= total),
                        rate=rate or None)
    return report.to_dict()
