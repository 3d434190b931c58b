"""Where a benchmark runs: the pool handle, the server, the device it writes.

Safety rules (what a user can count on):

- a benchmark on a snapshot is read-only: a write workload is refused;
- a write benchmark refuses a device that NBD clients have open, unless forced
  (its numbers would mix with theirs, and they would see its writes in place);
- by default a write benchmark runs on a fresh clone of the device (a snapshot
  ``DEV@bench-PID`` and a clone ``DEV.bench-PID`` of it) that is destroyed
  afterwards, so the device's data is never overwritten; ``in_place`` writes
  the device itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

from thinstore.errors import DeviceBusy, ReadOnlyDevice, ThinstoreError
from thinstore.names import RESERVED_FIRST


def counters(pool) -> dict:
    """The pool's data-path counters, from a Pool (a property, or a method on newer
    versions) or a RemotePool (a control call)."""
    value = pool.counters
    return dict(value() if callable(value) else value)


@contextlib.contextmanager
def bench_device(pool, name: str, writes: bool, force: bool = False, in_place: bool = False):
    """Yield the name of the device to benchmark in place of ``name``, per the rules above."""
    info = pool.info(name)
    if not writes:
        yield name
        return
    if info.read_only:
        raise ReadOnlyDevice(f"{name!r} is a snapshot: a benchmark on it is read-only "
                             "(use --io-type read, or bench a clone of it)")
    busy = _clients(pool, name)
    if busy and not force:
        raise DeviceBusy(f"{name!r} has {busy} open NBD connection(s): a write benchmark "
                         "would run beside them; stop the clients or pass --force")
    if in_place:
        yield name
        return
    tag = f"bench-{os.getpid()}-{int(time.time()) % 100000}"
    snap, clone = f"{name}@{tag}", f"{name}.{tag}"
    if name[0] in RESERVED_FIRST:       # '-x' from an older pool: no new name starts so
        clone = f"{tag}.{name}"
    pool.snapshot(snap)
    try:
        pool.clone(snap, clone)
        try:
            yield clone
        finally:
            pool.destroy(clone, force=True)
    finally:
        pool.destroy(snap, force=True)


def _clients(pool, name: str) -> int:
    connections = getattr(pool, "connections", None)
    if connections is None:          # a Pool this process opened: no server, no clients
        return 0
    return int((connections() or {}).get(name, 0))


class StartedServer:
    """``thinstore serve`` started for one benchmark on a pool nobody serves.

    A separate process, so the built-in client's threads and the server do not
    share one GIL (which would measure neither).  The NBD socket lives in a
    short temporary directory; :meth:`stop` ends the process and removes it.
    """

    def __init__(self, pool_dir: str):
        self.dir = tempfile.mkdtemp(prefix="tsbench")
        self.socket = os.path.join(self.dir, "nbd.sock")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinstore", "--pool", pool_dir, "serve",
             "--socket", self.socket], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env=_same_package_env())
        first = self.proc.stdout.readline()
        if not first:
            err = self.proc.stderr.read().strip()
            self.stop()
            raise ThinstoreError(f"could not start a server for the benchmark: {err}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _same_package_env() -> dict:
    """The environment with this thinstore first on the path, so the server started is
    this same version (a source tree run beside an installed copy, say)."""
    import thinstore
    root = os.path.dirname(os.path.dirname(os.path.abspath(thinstore.__file__)))
    paths = [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))


@contextlib.contextmanager
def served_pool(pool_dir: str):
    """Yield ``(RemotePool, nbd socket, started)`` for the pool's server: the running
    one if its control socket answers, else one started (and stopped) here."""
    from thinstore.control import RemotePool

    remote = RemotePool.connect(pool_dir)
    started = None
    if remote is None:
        started = StartedServer(pool_dir)
        remote = RemotePool.connect(pool_dir)
        if remote is None:
            started.stop()
            raise ThinstoreError(f"the server started on {pool_dir} does not answer")
    try:
        endpoint = remote.ping().get("nbd_socket")
        if not endpoint:
            raise DeviceBusy(f"the server holding {pool_dir} exports no unix socket: "
                             "bench --via nbd needs one")
        yield remote, endpoint, started is not None
    finally:
        remote.close()
        if started is not None:
            started.stop()
