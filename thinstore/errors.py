"""The one error tree of thinstore.

Every exception the package raises on purpose derives from :class:`ThinstoreError`.
Each class carries the errno an NBD client sees for it and the exit code the CLI
returns, so both mappings live here and nowhere else::

    ThinstoreError                  EIO     exit 1
     +-- UsageError                 EINVAL  exit 2   bad argument, size, name
     |    +-- InvalidName
     +-- NoSuchDevice               ENOENT  exit 3
     +-- DeviceExists               EEXIST  exit 4
     +-- DeviceBusy                 EBUSY   exit 5   open connections, snapshots
     +-- PoolLocked                 EBUSY   exit 5   another process holds the pool
     +-- ReadOnlyDevice             EPERM   exit 6
     +-- OutOfRange                 EINVAL  exit 7   offset/length past the end
     |    +-- WritePastEnd          ENOSPC
     +-- PoolFull                   ENOSPC  exit 8
     +-- PoolNotFound               ENOENT  exit 9
     +-- CorruptMetadata            EIO     exit 10  checksums, magics, torn state
     +-- DataChecksumError          EIO     exit 11  a chunk no longer matches
     +-- StreamError                EIO     exit 12  send/receive streams
     |    +-- StreamTruncated                  a cut-off stream: resumable
     +-- NativeUnavailable          EIO     exit 13  THINSTORE_PURE_PYTHON=0 without C
     +-- ProtocolError              EINVAL  exit 14  NBD/control wire errors
     |    +-- ServerGone                       the server left during a request
     +-- StorageUnavailable         EIO     exit 15  the pool's home cannot be reached
     +-- Fenced                     EIO     exit 16  another host took the pool over
     +-- SocketInUse                EADDRINUSE exit 1 a socket path is a file or live
     +-- UntrustedPeer              EACCES  exit 1   a socket's peer is not root/owner

The class docstring is the default message; callers pass a message that names the
device and says what to do.
"""

from __future__ import annotations

import errno as _errno


class ThinstoreError(Exception):
    """thinstore failed."""

    errno = _errno.EIO
    exit_code = 1

    def __init__(self, message: str | None = None):
        super().__init__(message or (self.__doc__ or "").strip())

    @property
    def message(self) -> str:
        return str(self)


class UsageError(ThinstoreError):
    """Invalid argument."""

    errno = _errno.EINVAL
    exit_code = 2


class InvalidName(UsageError):
    """Invalid device name: use letters, digits and _ . : - (at most 255 bytes)."""


class NoSuchDevice(ThinstoreError):
    """No such device."""

    errno = _errno.ENOENT
    exit_code = 3


class DeviceExists(ThinstoreError):
    """A device with that name exists already."""

    errno = _errno.EEXIST
    exit_code = 4


class DeviceBusy(ThinstoreError):
    """The device is in use."""

    errno = _errno.EBUSY
    exit_code = 5


class PoolLocked(ThinstoreError):
    """Another process holds the pool."""

    errno = _errno.EBUSY
    exit_code = 5


class ReadOnlyDevice(ThinstoreError):
    """The device is read-only."""

    errno = _errno.EPERM
    exit_code = 6


class OutOfRange(ThinstoreError):
    """The request lies outside the device."""

    errno = _errno.EINVAL
    exit_code = 7


class WritePastEnd(OutOfRange):
    """The write runs past the end of the device."""

    errno = _errno.ENOSPC


class PoolFull(ThinstoreError):
    """The pool has no free chunk left: free space (destroy a device, discard) or grow the pool."""

    errno = _errno.ENOSPC
    exit_code = 8


class PoolNotFound(ThinstoreError):
    """No thinstore pool at that path (run 'thinstore init' first)."""

    errno = _errno.ENOENT
    exit_code = 9


class CorruptMetadata(ThinstoreError):
    """The pool's metadata is damaged (run 'thinstore check')."""

    exit_code = 10


class WrongDataDevice(CorruptMetadata):
    """POOL/data names a block device that is not this pool's (its label names another
    pool, or none): a device renamed at boot; never written to."""


class OldFormat(ThinstoreError):
    """The pool is in an older on-disk format (run 'thinstore upgrade')."""

    errno = _errno.EPROTO
    exit_code = 19


class DataChecksumError(ThinstoreError):
    """A data chunk does not match its checksum."""

    exit_code = 11


class StreamError(ThinstoreError):
    """The send/receive stream is invalid."""

    exit_code = 12


class NativeUnavailable(ThinstoreError):
    """The native library is not built; reinstall with gcc present or set THINSTORE_PURE_PYTHON=1."""

    exit_code = 13


class ProtocolError(ThinstoreError):
    """The peer broke the protocol."""

    errno = _errno.EINVAL
    exit_code = 14


class ServerGone(ProtocolError):
    """The serving process closed its control connection in the middle of a request."""


class StreamTruncated(StreamError):
    """The send/receive stream ends before its trailer (resume with 'receive --resume')."""


class StorageUnavailable(ThinstoreError):
    """The pool's storage cannot be reached (for rados:// pools: librados, the cluster)."""

    exit_code = 15


class Fenced(ThinstoreError):
    """This process no longer owns the pool: another one took it over and fenced it."""

    exit_code = 16


class SocketInUse(ThinstoreError):
    """A server's socket path holds a non-socket or another server's live socket."""

    errno = _errno.EADDRINUSE
    exit_code = 1


class UntrustedPeer(ThinstoreError):
    """The process on the other end of a pool's socket is neither root nor the pool's owner."""

    errno = _errno.EACCES
    exit_code = 1
