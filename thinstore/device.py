"""Device handles: byte-addressed I/O on one volume, snapshot or clone of an open pool."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    name: str
    kind: str            # volume | snapshot | clone
    size: int
    read_only: bool
    uuid: str
    origin: str | None   # the device a snapshot was taken of / the snapshot a clone came from
    created: float       # seconds since the epoch
    used: int            # bytes mapped
    exclusive: int       # bytes only this device maps
    shared: int          # bytes mapped and shared with another device

    def to_dict(self) -> dict:
        # the fields are plain values: no deep copy (asdict's) for a list of 10,000
        return {f.name: getattr(self, f.name) for f in _INFO_FIELDS}


_INFO_FIELDS = dataclasses.fields(DeviceInfo)


class Device:
    """An open handle. Reads of unmapped ranges return zeros; writes to a snapshot
    raise ReadOnlyDevice; a range outside the device raises OutOfRange (WritePastEnd
    for writes). The handle keeps the device from being destroyed until close()."""

    def __init__(self, pool, meta):
        self._pool = pool
        self._meta = meta
        self._closed = False
        self.chunk_size = pool.chunk_size
        # the native lane (fastlane.py), or None: every request takes the pool lock
        lane = pool._lane
        self._fast = lane.writer(meta) if lane is not None else None
        self._fast_read = lane.reader(meta) if lane is not None else None
        self._lane_structs = (lane.c, lane.dev_struct(meta)) if lane is not None else None
        # a lane write notes its range for the intent log here, before it returns
        self._note, self._dev_id = pool._log.note, meta.dev_id

    name = property(lambda self: self._meta.name)
    size = property(lambda self: self._meta.size)
    kind = property(lambda self: self._meta.kind)
    read_only = property(lambda self: self._meta.read_only)
    uuid = property(lambda self: self._meta.uuid.hex())

    def pread(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buf, offset: int) -> None:
        fast = self._fast_read
        if fast is None or not fast(buf, offset):
            self._pool._read(self._meta, buf, offset)

    def pwrite(self, data, offset: int, fua: bool = False) -> None:
        """Write `data` at `offset`; with `fua` it is durable on return (Pool.flush)."""
        fast = self._fast
        if fast is None or not fast(data, offset):
            self._pool._write(self._meta, data, offset, fua)
            return
        self._note(self._dev_id, offset, memoryview(data).nbytes)
        if fua:
            self._pool.flush()

    def lane_structs(self):
        """The lane's (ts_pool *, ts_dev *) for a native caller of ts_write/ts_read
        TS_REQ_LANE (nbd/burst.py), or None (no lane, or closed). Such a caller must
        note_writes() each range it wrote before anyone can learn of the write."""
        return None if self._closed else self._lane_structs

    def note_writes(self, ranges, counted: bool = False) -> None:
        """Add lane writes' (offset, length) pairs to the intent log's notes, as pwrite
        does for its own (see lane_structs); `counted`: the caller counted them in the
        log cursor's pending writes already (the NBD loop with log_cursor())."""
        dev_id = self._dev_id
        self._pool._log.note_many([(dev_id, off, n) for off, n in ranges], counted)

    def log_cursor(self):
        """(the intent log's native cursor ``ts_log *``, this device's id) for a native
        caller that appends its own records (nbd/burst.py; SyncLog.cursor), or None."""
        cur = None if self._closed else self._pool._log.cursor()
        return None if cur is None else (cur, self._dev_id)

    def discard(self, offset: int, length: int) -> None:
        self._pool._discard(self._meta, offset, length)

    def write_zeroes(self, offset: int, length: int, no_hole: bool = False) -> None:
        self._pool._write_zeroes(self._meta, offset, length, no_hole)

    def flush(self, wait: bool = True) -> bool:
        """Make every write so far durable (Pool.flush: the intent log, not a commit).
        With `wait` False, start that and return at once: True when it was started
        (a later flush() finds it done or waits for it), False when the pool cannot
        sync in the background (nothing was done)."""
        return self._pool.flush(wait)

    def extents(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        return self._pool._extents(self._meta, offset, length)

    def close(self) -> None:
        """Release the handle (idempotent: a second close does nothing)."""
        if self._meta is not None and not self._closed:
            self._closed = True
            self._fast = self._fast_read = self._lane_structs = None
            self._pool._release(self._meta)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
