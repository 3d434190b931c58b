"""Every privileged step of attaching, in one place: run it, log it, check it.

``run(argv, what=...)`` is the only way the attach module starts mount, umount, losetup,
mkfs, fsfreeze, blkid, resize2fs, xfs_growfs, nbd-client or fusermount3.  It logs the
command line at INFO before running it, and a failure (a non-zero exit the caller did not
allow, a missing tool, a timeout) raises :class:`AttachError` whose message says what was
being done, the command, its exit status and the last part of its stderr.

Helpers in this module never hold a lock of their own: the caller decides what is held
while a command runs (never the pool lock: the NBD server that answers the I/O of mkfs or
fsfreeze runs in this same process and needs it).
"""

from __future__ import annotations

import errno
import logging
import shlex
import subprocess

from thinstore.errors import ThinstoreError

log = logging.getLogger("thinstore.attach")

#: Debian package of each tool, named in the "not installed" error
PACKAGES = {
    "nbdfuse": "nbdfuse", "fusermount3": "fuse3", "losetup": "util-linux",
    "mount": "mount", "umount": "mount", "fsfreeze": "util-linux", "blkid": "util-linux",
    "mkfs.ext4": "e2fsprogs", "resize2fs": "e2fsprogs", "mkfs.xfs": "xfsprogs",
    "xfs_growfs": "xfsprogs", "nbd-client": "nbd-client", "sync": "coreutils",
}

STDERR_TAIL = 600          # characters of a failed command's stderr kept in the error
DEFAULT_TIMEOUT = 600.0    # seconds; mkfs of a large xfs volume is the slowest step


class AttachError(ThinstoreError):
    """Attaching, mounting or detaching a volume failed."""

    errno = errno.EIO
    exit_code = 1


def run(argv: list[str], *, what: str, ok_codes: tuple[int, ...] = (0,),
        timeout: float = DEFAULT_TIMEOUT, pass_fds: tuple[int, ...] = (),
        quiet: bool = False, env: dict | None = None,
        logged: bool = True) -> subprocess.CompletedProcess:
    """Run ``argv`` (no shell), return the finished process (stdout/stderr as text).

    ``what`` says what the step is for ("mount db on /x"); it starts the error message.
    An exit status outside ``ok_codes`` raises :class:`AttachError` carrying the stderr
    (logged as a warning unless ``quiet``: the caller expects it at times).  ``logged``
    False: neither the command nor its failure is logged (a caller that retries a step
    logs one line for all its tries).
    """
    line = shlex.join(argv)
    if logged:
        log.info("%s: %s", what, line)
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              pass_fds=pass_fds, stdin=subprocess.DEVNULL, env=env)
    except FileNotFoundError:
        package = PACKAGES.get(argv[0], argv[0])
        raise AttachError(f"{what}: {argv[0]} is not installed (Debian package {package})") \
            from None
    except subprocess.TimeoutExpired:
        raise AttachError(f"{what}: `{line}` did not finish within {timeout:g} s") from None
    if done.returncode not in ok_codes:
        detail = (done.stderr.strip() or done.stdout.strip())[-STDERR_TAIL:]
        if logged:
            log.log(logging.INFO if quiet else logging.WARNING, "%s failed (exit %d): %s",
                    what, done.returncode, detail)
        raise AttachError(f"{what}: `{line}` failed (exit {done.returncode})"
                          + (f": {detail}" if detail else ""))
    return done


def attempt(argv: list[str], *, what: str, timeout: float = 60.0) -> bool:
    """Run a clean-up step whose failure is expected at times (a piece already gone):
    True if it succeeded; a failure is logged, never raised."""
    try:
        run(argv, what=what, timeout=timeout, quiet=True)
        return True
    except AttachError:
        return False
