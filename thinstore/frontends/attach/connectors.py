"""Connectors: one small class per way of turning an NBD export into a kernel block device.

The interface (after os-brick's initiator connectors)::

    connect(rec, save)   attach rec.export; fill rec.device (and the transport's own
                         fields); call save() after recording each host object it is
                         about to make, before making it; return the device path
    disconnect(rec)      undo connect; idempotent; tolerates pieces already gone and a
                         server that died (then in-flight I/O of remaining users fails)
    alive(rec)           every piece is present and still reaches this process's server
    extend(rec, save)    make the device show the export's new size: both transports
                         learn the size at connect, so this reconnects (the caller
                         refuses while mounted); returns the (maybe new) device path
    sweep(known)         clean up host objects of this transport under the connector's
                         root that no record names (a crash before the intent was saved)

Transports:

* :class:`KernelNBDConnector` -- ``nbd-client -u`` connects /dev/nbdN to the unix socket
  (netlink where the kernel has it).  For hosts with the nbd module.
* :class:`FuseLoopConnector` -- ``nbdfuse`` shows the export as the file DIR/disk on a
  FUSE mount, and ``losetup --direct-io=on`` makes that file /dev/loopN.  Needs /dev/fuse
  and loop devices only.

:func:`choose` picks the kernel client when ``/sys/module/nbd`` or ``/dev/nbd0`` exists.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import time
import urllib.parse

from . import host
from .privileged import AttachError, attempt, log, run

READY_POLLS = 1500          # x 0.02 s: how long nbdfuse may take to show its file
BUSY_POLLS = 50             # x 0.1 s: how long a FUSE unmount waits for the loop to let go


def nbd_uri(export: str, socket_path: str) -> str:
    """``nbd+unix:///EXPORT?socket=PATH`` (the NBD URI spec), both parts percent-encoded."""
    return (f"nbd+unix:///{urllib.parse.quote(export, safe='')}"
            f"?socket={urllib.parse.quote(socket_path, safe='/')}")


@contextlib.contextmanager
def reachable_socket(path: str):
    """(name to connect to, fds a child must inherit): sun_path holds 107 bytes, so a
    longer path is reached through /proc/self/fd/N/NAME with the directory open as N."""
    if len(os.fsencode(path)) < 100:
        yield path, ()
        return
    fd = os.open(os.path.dirname(path), os.O_RDONLY | os.O_DIRECTORY)  # inheritable on purpose
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}", (fd,)
    finally:
        os.close(fd)


class Connector:
    """The connector interface; see the module docstring for the contract."""

    transport = "none"

    def __init__(self, nbd_socket: str, root: str):
        self.nbd_socket, self.root = os.path.abspath(nbd_socket), os.path.abspath(root)

    def connect(self, rec, save) -> str:
        raise NotImplementedError

    def disconnect(self, rec) -> None:
        raise NotImplementedError

    def alive(self, rec) -> bool:
        raise NotImplementedError

    def extend(self, rec, save) -> str:
        self.disconnect(rec)
        return self.connect(rec, save)

    def sweep(self, known: set[str]) -> None:
        pass


class FuseLoopConnector(Connector):
    """nbdfuse + a loop device.  rec.workdir is the FUSE mount point (ROOT/ID/), the
    export's bytes are ROOT/ID/disk, nbdfuse's pid file and log are ROOT/ID.pid, .log."""

    transport = "nbdfuse-loop"
    FILE = "disk"

    def connect(self, rec, save) -> str:
        os.makedirs(rec.workdir, mode=0o700, exist_ok=True)
        rec.helper_pid = self._start_nbdfuse(rec)
        save()                                   # the loop device next: nbdfuse is recorded
        image = os.path.join(rec.workdir, self.FILE)
        ro = ["--read-only"] if rec.read_only else []
        done = run(["losetup", "--find", "--show", "--direct-io=on", *ro, image],
                   what=f"make a loop device of {rec.export}")
        rec.device = done.stdout.strip()
        return rec.device

    def _start_nbdfuse(self, rec) -> int:
        pidfile, logfile = rec.workdir + ".pid", rec.workdir + ".log"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(pidfile)
        with reachable_socket(self.nbd_socket) as (sock, fds), open(logfile, "ab") as logf:
            argv = ["nbdfuse", *(["-r"] if rec.read_only else []), "-P", pidfile,
                    os.path.join(rec.workdir, self.FILE), nbd_uri(rec.export, sock)]
            log.info("attach %s: %s", rec.export, " ".join(argv))
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                                        stderr=logf, pass_fds=fds, start_new_session=True)
            except FileNotFoundError:
                raise AttachError("nbdfuse is not installed (Debian package nbdfuse)") from None
            for _ in range(READY_POLLS):        # bounded; the pid file says "ready"
                if os.path.exists(pidfile):
                    _REAPERS[proc.pid] = proc
                    return proc.pid
                if proc.poll() is not None:
                    break
                time.sleep(0.02)
        proc.kill()
        proc.wait()
        raise AttachError(f"nbdfuse could not show export {rec.export!r} on {rec.workdir}: "
                          + _tail(logfile))

    def alive(self, rec) -> bool:
        image = os.path.join(rec.workdir or "", self.FILE)
        mount = host.mount_at(rec.workdir) if rec.workdir else None
        return (rec.server == host.process_identity() and rec.device is not None
                and host.loop_backing(rec.device) == image
                and mount is not None and mount.fstype.startswith("fuse")
                and _is_nbdfuse(rec.helper_pid, rec.workdir))

    def disconnect(self, rec) -> None:
        if not rec.workdir:
            return
        self._detach_loops(rec.workdir)
        live = rec.server == host.process_identity() and _is_nbdfuse(rec.helper_pid, rec.workdir)
        if not (live and self._unmount_fuse(rec.workdir)):
            # the server that nbdfuse talked to is gone (or it will not let go): stop it,
            # so whatever still holds the old device gets errors, never stale data
            for pid in host.processes_mentioning(rec.workdir, "nbdfuse"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if host.mount_at(rec.workdir):
                attempt(["fusermount3", "-u", "-z", rec.workdir],
                        what=f"lazily unmount the FUSE file of {rec.export}")
        _reap(rec.helper_pid)
        _remove(rec.workdir)
        rec.device = rec.helper_pid = None

    def _detach_loops(self, workdir: str) -> None:
        """Every loop device over workdir's file (checked by backing path, not trusted from
        the record).  ``losetup -d`` of a device still open sets autoclear: the kernel
        detaches it at the last close."""
        for device in host.loops_backed_by(workdir):
            attempt(["losetup", "-d", device], what=f"detach {device}")

    def _unmount_fuse(self, workdir: str) -> bool:
        """``fusermount3 -u`` (nbdfuse exits then); retried every 0.1 s, BUSY_POLLS times,
        while the loop device lets go of the file.  One log line for all the tries (a
        container holding the volume at a stop makes every try fail): how many, and the
        last failure.  True once the FUSE mount is gone."""
        argv, tries, failed, last = ["fusermount3", "-u", workdir], 0, 0, None
        for _ in range(BUSY_POLLS):
            if host.mount_at(workdir) is None:
                break
            tries += 1
            try:
                run(argv, what=f"unmount FUSE {workdir}", timeout=60, logged=False)
                break
            except AttachError as exc:
                failed, last = failed + 1, str(exc).rsplit(": ", 1)[-1]
            time.sleep(0.1)
        gone = host.mount_at(workdir) is None
        if gone and tries:
            log.info("unmount FUSE %s: %s (%s)", workdir, " ".join(argv),
                     "at the first try" if not failed else f"{failed} busy tries first")
        elif not gone:
            log.warning("unmount FUSE %s: fusermount3 -u failed %d of %d tries (%s): "
                        "something still holds its loop device", workdir, failed, tries, last)
        return gone

    def sweep(self, known: set[str]) -> None:
        if not os.path.isdir(self.root):
            return
        for name in sorted(os.listdir(self.root)):
            path = os.path.join(self.root, name)
            if os.path.isdir(path) and path not in known:
                log.warning("attach: cleaning up %s, left by a crash before it was recorded",
                            path)
                from .state import Attachment
                self.disconnect(Attachment(export=name, transport=self.transport,
                                           workdir=path))
        for device, backing in host.loops_backed_by(self.root).items():
            if os.path.dirname(backing.removesuffix(host.DELETED)) not in known:
                attempt(["losetup", "-d", device], what=f"detach stray {device}")


class KernelNBDConnector(Connector):
    """/dev/nbdN through the kernel's NBD client, connected by ``nbd-client -u``."""

    transport = "kernel-nbd"
    BLOCK_SIZE = "4096"

    def connect(self, rec, save) -> str:
        last = None
        for device in self._free_devices()[:4]:
            rec.device = device
            save()                               # recorded before it is connected
            with reachable_socket(self.nbd_socket) as (sock, fds):
                argv = ["nbd-client", "-u", "-N", rec.export, "-b", self.BLOCK_SIZE,
                        *(["-R"] if rec.read_only else []), sock, device]
                try:
                    run(argv, what=f"connect {rec.export} to {device}", pass_fds=fds)
                except AttachError as exc:       # taken meanwhile by someone else: next
                    last = exc
                    continue
            if _wait_for(lambda: host.block_size_bytes(device)):
                return device
            self.disconnect(rec)
            last = AttachError(f"{device} shows no size after nbd-client connected it")
        rec.device = None
        raise last or AttachError("no free /dev/nbdN (load nbd with a larger nbds_max)")

    @staticmethod
    def _free_devices() -> list[str]:
        found = []
        for path in sorted(glob.glob("/sys/block/nbd*"), key=lambda p: int(p[14:] or 0)):
            device = "/dev/" + os.path.basename(path)
            if not host.nbd_connected(device) and not host.block_size_bytes(device):
                found.append(device)
        return found

    def alive(self, rec) -> bool:
        return (rec.server == host.process_identity() and rec.device is not None
                and host.nbd_connected(rec.device))

    def disconnect(self, rec) -> None:
        if rec.device and host.nbd_connected(rec.device):
            attempt(["nbd-client", "-d", rec.device], what=f"disconnect {rec.device}")
        rec.device = None


def choose(nbd_socket: str, root: str) -> Connector:
    """The kernel NBD client where the host has it (the nbd module and nbd-client), else
    nbdfuse + loop.  ``THINSTORE_ATTACH_TRANSPORT=nbdfuse-loop|kernel-nbd`` overrides."""
    forced = os.environ.get("THINSTORE_ATTACH_TRANSPORT")
    if forced:
        if forced not in CONNECTORS:
            raise AttachError(f"THINSTORE_ATTACH_TRANSPORT={forced!r}: use "
                              f"{' or '.join(sorted(CONNECTORS))}")
        return CONNECTORS[forced](nbd_socket, root)
    kernel = host.kernel_nbd_available() and shutil.which("nbd-client") is not None
    return (KernelNBDConnector if kernel else FuseLoopConnector)(nbd_socket, root)


CONNECTORS = {c.transport: c for c in (FuseLoopConnector, KernelNBDConnector)}

#: nbdfuse processes this process started: waited for once they exit (no zombies)
_REAPERS: dict[int, subprocess.Popen] = {}


def _is_nbdfuse(pid: int | None, workdir: str | None) -> bool:
    argv = host.cmdline(pid) if pid else []
    return bool(argv) and os.path.basename(argv[0]) == "nbdfuse" and \
        any(workdir and a.startswith(workdir) for a in argv)


def _reap(pid: int | None) -> None:
    proc = _REAPERS.pop(pid, None) if pid else None
    if proc is not None:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for(predicate, polls: int = 100) -> bool:
    for _ in range(polls):              # bounded: 10 s
        if predicate():
            return True
        time.sleep(0.1)
    return False


def _remove(workdir: str) -> None:
    for path in (workdir + ".pid", workdir + ".log"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    with contextlib.suppress(FileNotFoundError, OSError):
        os.rmdir(workdir)


def _tail(path: str, size: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            return f.read()[-size:].decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no log)"
