"""Files a command reads or writes on the user's behalf: the same checks everywhere.

- An input must be something that can be read as a stream of bytes: a directory is
  refused as ``DIR: Is a directory`` (exit 1, like cat), before any pool is touched.
- An output that is a regular file (or does not exist yet) is written beside its name
  and renamed into place only when the command succeeded, so a failed ``export`` or
  ``send`` (a damaged chunk, a full disk, Ctrl-C) leaves the old file exactly as it
  was and never a full-size file of holes that looks like a valid image.  A FIFO or a
  device node is written in place.
- ``-`` means stdout / stdin, and binary data is never sent to or read from a terminal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import sys
import tempfile

from thinstore.errors import UsageError


def _is_a_directory(path: str) -> IsADirectoryError:
    return IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)


def check_input(path: str) -> None:
    """Refuse a directory (open() would succeed on one and read nonsense sizes)."""
    if path != "-" and os.path.isdir(path):
        raise _is_a_directory(path)


def check_output(path: str) -> None:
    """Refuse a directory, and a missing parent directory, before any work is done."""
    if path == "-":
        return
    if os.path.isdir(path):
        raise _is_a_directory(path)
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):   # as cp says it
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)


def refuse_terminal(stream, what: str, fix: str) -> None:
    if stream.isatty():
        raise UsageError(f"refusing to write {what} to a terminal: {fix}")


@contextlib.contextmanager
def output(path: str, what: str, fix: str):
    """A binary file object for ``path`` (``-``: stdout, never a terminal); see the
    module docstring for when it is written beside and renamed."""
    if path == "-":
        refuse_terminal(sys.stdout, what, fix)
        sys.stdout.flush()
        f = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
        with f:
            yield f
        return
    check_output(path)
    if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
        with open(path, "wb", buffering=0) as f:
            yield f
        return
    with replacing(path) as f:
        yield f


@contextlib.contextmanager
def replacing(path: str):
    """Write a regular file beside ``path``; rename it into place only on success.

    The new file takes the old one's mode, or 0666 less the umask for a new name.
    """
    directory, name = os.path.split(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".partial", dir=directory)
    except OSError as err:      # EACCES, EROFS: creating FILE itself would fail the same way
        raise OSError(err.errno, err.strerror, path) from err
    try:
        with os.fdopen(fd, "wb", buffering=0) as f:
            yield f
        os.chmod(tmp, _mode_of(path))
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if err.filename == tmp:     # 'FILE: File too large' names the file the user gave
            raise OSError(err.errno, err.strerror, path) from err
        raise
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mode_of(path: str) -> int:
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mask = os.umask(0)
        os.umask(mask)
        return 0o666 & ~mask
