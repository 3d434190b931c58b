"""Diff, send and receive: replicate snapshots from one pool to another.

``send`` turns a snapshot (or the change from a base snapshot to it) into a stream
(thinstore/stream.py, docs/stream.md); ``receive`` turns a stream into snapshot
``NAME@SNAP`` and brings volume ``NAME`` to that state, as ``zfs receive`` does.

What must hold, and why:
- A diff costs what changed (thinstore/diff.py): equal page ids are never read.
- A received snapshot keeps the sender's uuid, so a later incremental stream finds
  its base by uuid and applies only on that exact base.
- A receive is atomic: records go into a hidden device (pool.create_hidden), and
  only the trailer, verified, publishes it in one commit (pool.publish_hidden).
  Before that nothing shows in list(); a corrupt stream leaves the pool as it was.
- A cut-off receive is resumable (thinstore/resume.py): the pool is committed and
  then a token records the point after the last applied record. Re-applying a record
  is harmless (it writes the same bytes at the same place), so a crash between a
  commit and the token only costs re-work, never correctness.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid as _uuid
from typing import BinaryIO, Callable

from . import names
from . import resume as R
from . import stream as S
from .diff import DeviceMap, DiffCounters, DiffRange, diff_maps
from .errors import DeviceExists, NoSuchDevice, PoolFull, StreamError, StreamTruncated, UsageError
from .native import K
from .units import format_size

Progress = Callable[[int, int], None]  # called with (bytes done since last call, total)
CHECKPOINT_BYTES = 64 << 20  # stream bytes between resume checkpoints
CHECKPOINT_SECONDS = 5.0


# --- diff -------------------------------------------------------------------------------


def device_map(pool, name: str) -> DeviceMap:
    """Read-only view of a device's map for the diff; call with pool.lock held."""
    return DeviceMap(*pool.map_view(name))


@dataclasses.dataclass
class DiffResult:
    a: str
    b: str | None
    size_a: int
    size_b: int | None
    chunk_size: int
    ranges: list[DiffRange]
    counters: DiffCounters

    @property
    def changed_bytes(self) -> int:
        return sum(r.length for r in self.ranges)

    @classmethod
    def from_dict(cls, d: dict) -> "DiffResult":
        """The inverse of to_dict (an online diff's answer, thinstore/online.py)."""
        ranges = [DiffRange(r["offset"], r["length"], r["a"] == "data", r["b"] == "data")
                  for r in d["ranges"]]
        return cls(d["a"], d["b"], d["size_a"], d["size_b"], d["chunk_size"], ranges,
                   DiffCounters(**d["counters"]))

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "size_a": self.size_a, "size_b": self.size_b,
                "chunk_size": self.chunk_size, "changed_bytes": self.changed_bytes,
                "ranges": [r.to_dict() for r in self.ranges],
                "counters": self.counters.to_dict()}


def diff(pool, a: str, b: str | None = None) -> DiffResult:
    """Byte ranges (chunk-aligned) where devices a and b differ; b None: all mapped in a."""
    with pool.lock:
        ma = device_map(pool, a)
        mb = device_map(pool, b) if b is not None else None
        counters = DiffCounters()
        ranges = diff_maps(ma, mb, counters)
    return DiffResult(a, b, ma.size, mb.size if mb else None, pool.chunk_size, ranges,
                      counters)


# --- send -------------------------------------------------------------------------------


@dataclasses.dataclass
class SendStats:
    snapshot: str
    base: str | None
    changed_bytes: int  # bytes the diff found (what the stream describes)
    data_bytes: int  # raw bytes carried in DATA records
    stream_bytes: int  # bytes written to the stream
    records: int  # records before the trailer
    counters: DiffCounters


def send(pool, snapshot: str, out: BinaryIO, base: str | None = None,
         progress: Progress | None = None) -> SendStats:
    """Write snapshot (full, or incremental from snapshot `base`) as a stream to out."""
    info, base_info = _send_devices(pool, snapshot, base)
    d = diff(pool, snapshot, base)
    header = S.Header(S.VERSION, 0, pool.chunk_size, info.size, snapshot,
                      _uuid.UUID(hex=info.uuid),
                      _uuid.UUID(hex=base_info.uuid) if base_info else None)
    w = S.StreamWriter(out, header)
    done = _counting(progress, d.changed_bytes)
    with pool.open_device(snapshot) as dev:
        for rg in _clip(d.ranges, info.size):  # past a shrunk end the receiver truncates
            if rg.a_mapped:
                _send_data(dev, w, rg, done)
            else:
                w.hole(rg.offset, rg.length)
                done(rg.length)
    t = w.finish()
    return SendStats(snapshot, base, d.changed_bytes, t.data_bytes, w.bytes_written,
                     w.seq - 1, d.counters)


def _send_devices(pool, snapshot: str, base: str | None):
    """Both ends of a send must be snapshots: only they cannot change under the stream."""
    names.check_name(snapshot, snapshot=True)
    info = pool.info(snapshot)
    base_info = None
    if base is not None:
        names.check_name(base, snapshot=True)
        base_info = pool.info(base)
    for i in (info, base_info):
        if i is not None and i.kind != "snapshot":
            raise UsageError(f"{i.name!r} is a {i.kind}: send works from snapshots")
    return info, base_info


def _clip(ranges: list[DiffRange], size: int) -> list[DiffRange]:
    out = [r for r in ranges if r.offset < size]
    if out and out[-1].offset + out[-1].length > size:
        out[-1] = out[-1]._replace(length=size - out[-1].offset)
    return out


def _counting(progress: Progress | None, total: int) -> Callable[[int], None]:
    if progress is None:
        return lambda n: None
    return lambda n: progress(n, total)


def _send_data(dev, w: S.StreamWriter, rg: DiffRange, done: Callable[[int], None]) -> None:
    """DATA records for a mapped range; all-zero pieces become (coalesced) ZERO records."""
    step = S.WRITE_DATA_LEN
    buf = bytearray(min(step, rg.length))
    zero_at, zero_len = rg.offset, 0
    for pos in range(rg.offset, rg.offset + rg.length, step):
        n = min(step, rg.offset + rg.length - pos)
        view = memoryview(buf)[:n]
        dev.readinto(view, pos)
        done(n)
        if K.is_zero(view):
            zero_at, zero_len = (zero_at, zero_len + n) if zero_len else (pos, n)
            continue
        if zero_len:
            w.zero(zero_at, zero_len)
            zero_len = 0
        w.data(pos, view)
    if zero_len:
        w.zero(zero_at, zero_len)


# --- receive ----------------------------------------------------------------------------


@dataclasses.dataclass
class ReceiveStats:
    snapshot: str
    records: int  # records applied in this run
    skipped: int  # records verified but not applied (already applied before a resume)
    stream_bytes: int  # stream bytes read in this run
    resumed: bool


def receive(pool, name: str, inp: BinaryIO, *, resume: bool = False, force: bool = False,
            progress: Progress | None = None, stream_size: int | None = None) -> ReceiveStats:
    """Receive a stream into NAME@SNAP and bring volume NAME to it (see module doc).

    resume=True continues an interrupted receive into NAME from `inp`, which is either
    the whole stream again or its remainder from the saved byte offset.  force=True
    lets an incremental stream discard changes made to NAME since its base.
    progress gets stream bytes of `stream_size` when that is known (a file), else
    device bytes passed of the device size (records come in ascending offset).
    """
    names.check_name(name, snapshot=False)
    token = R.load(pool, name)
    if resume:
        if token is None:
            raise UsageError(f"no interrupted receive into {name!r} to resume")
        return _resume(pool, token, inp, _Meter(progress, stream_size))
    if token is not None:
        raise UsageError(f"an interrupted receive into {name!r} is pending ({token.seq} "
                         f"records applied): continue it with 'receive --resume {name}' "
                         f"or drop it with 'receive --abort {name}'")
    header = S.read_header(inp)
    token = _prepare(pool, name, header, force)
    reader = S.RecordReader(inp, header)
    meter = _Meter(progress, stream_size, S.header_len(header))
    return _Receiver(pool, token, reader, fresh=True, progress=meter).run()


def abort_receive(pool, name: str) -> bool:
    """Drop an interrupted receive into NAME (workspace and token); False if none."""
    token = R.load(pool, name)
    hidden = {R.hidden_name(name), ".receive." + name} | ({token.hidden} if token else set())
    had = token is not None or any(pool.hidden_exists(h) for h in hidden)
    for h in hidden:        # the token's own name, and one from before the namespace
        pool.destroy_hidden(h)
    R.remove(pool, name)
    return had


def pending_receive(pool, name: str) -> R.Token | None:
    """The resume token of an interrupted receive into NAME, if any."""
    return R.load(pool, name)


@contextlib.contextmanager
def full_pool_hint(pool, name: str):
    """A receive stopped by a full pool is kept (a resume token); say so and how to finish.

    The core's message names the hidden workspace ('.receive.NAME') and suggests destroying
    a device; growing the pool and resuming is the way that loses nothing.
    """
    try:
        yield
    except PoolFull as err:
        if pending_receive(pool, name) is None:
            raise
        raise PoolFull(f"{err}; the receive into {name!r} is kept: grow the pool "
                       f"('thinstore grow +SIZE') or free space, then run 'thinstore receive "
                       f"--resume {name}' with the same stream") from err


def _prepare(pool, name: str, header: S.Header, force: bool) -> R.Token:
    """Check the target, create the hidden workspace, save the first token."""
    base = _check_target(pool, name, header, force)
    if base is None:        # a full stream makes volume NAME
        names.check_new_name(name)
    hidden = R.hidden_name(name)
    pool.destroy_hidden(hidden)  # a stale workspace from a crash before its first token
    pool.create_hidden(hidden, header.device_size, like=base)
    token = R.Token.start(name, hidden, header, force)
    R.save(pool, token)
    return token


def _check_target(pool, name: str, header: S.Header, force: bool) -> str | None:
    """What a stream may be received into; returns the base snapshot's name, if any.

    Checked when a receive starts and again just before it publishes, because a resumed
    receive may find that the user changed the pool while it was interrupted.
    """
    target = f"{name}@{header.snap_name}"
    names.check_name(target, snapshot=True)
    if _exists(pool, target):
        raise DeviceExists(f"{target!r} exists already: this stream was received before")
    if header.incremental:
        return _find_base(pool, name, header, force)
    if _exists(pool, name):
        raise DeviceExists(f"volume {name!r} exists: a full stream creates a new volume; "
                           f"receive into another name, or send an incremental stream")
    return None


def _exists(pool, name: str) -> bool:
    try:
        pool.info(name)
        return True
    except NoSuchDevice:
        return False


def _find_base(pool, name: str, header: S.Header, force: bool) -> str:
    """The snapshot of NAME whose uuid is the stream's base; NAME must not have moved on."""
    vol = pool.info(name) if _exists(pool, name) else None
    if vol is None or vol.kind == "snapshot":
        raise StreamError(f"incremental stream needs volume {name!r} holding its base "
                          f"snapshot (uuid {header.base_uuid}); receive a full stream first")
    snaps = [i for i in pool.list() if i.name.startswith(name + "@")]
    base = next((i.name for i in snaps if i.uuid == header.base_uuid.hex), None)
    if base is None:
        have = ", ".join(i.name for i in snaps) or "none"
        raise StreamError(f"wrong base: this incremental stream applies only on top of the "
                          f"snapshot with uuid {header.base_uuid}, and none of {name!r}'s "
                          f"snapshots ({have}) is it; send from a snapshot the receiver has")
    changed = diff(pool, name, base).changed_bytes
    if changed and not force:
        raise UsageError(f"volume {name!r} has changed since {base!r} ({format_size(changed)} "
                         f"differ): roll it back, or pass force=True to discard those changes")
    return base


def _resume(pool, token: R.Token, inp: BinaryIO, progress) -> ReceiveStats:
    target = f"{token.name}@{token.header.snap_name}"
    if not pool.hidden_exists(token.hidden):
        if _exists(pool, target):  # published; only the token removal was lost
            R.remove(pool, token.name)
            return ReceiveStats(target, 0, 0, 0, True)
        raise StreamError(f"the interrupted receive into {token.name!r} lost its workspace; "
                          f"drop it with 'receive --abort {token.name}' and start again")
    _check_target(pool, token.name, token.header, token.force)  # before reading, not after
    if token.complete:
        return _Receiver(pool, token, None, fresh=False, progress=progress).run()
    return _Receiver(pool, token, _resume_reader(token, inp), fresh=False,
                     progress=progress).run()


def _resume_reader(token: R.Token, inp: BinaryIO) -> S.RecordReader:
    """A whole stream (starts with the magic) is re-verified from its header; anything
    else is taken as the remainder starting at the token's byte offset."""
    head = S.read_exact(inp, len(S.MAGIC))
    f = R.Prefixed(head, inp)
    if head == S.MAGIC:
        header = S.read_header(f)
        if header.checksum != token.header.checksum:
            raise StreamError(f"this is not the stream the interrupted receive into "
                              f"{token.name!r} was reading (its header differs)")
        return S.RecordReader(f, header)
    return S.RecordReader(f, token.header, token.seq, token.pos, token.state,
                          tuple(token.counts))


class _Meter:
    """Turns records read into progress calls: stream bytes when the size is known,
    else the device position (records ascend, so it only moves forward)."""

    def __init__(self, progress: Progress | None, stream_size: int | None, start: int = 0):
        self.progress, self.stream_size = progress, stream_size
        self.done = start
        if progress and stream_size and start:
            progress(start, stream_size)

    def __call__(self, r: S.Record | None, device_size: int) -> None:
        """Account for record r, or (r None) for the verified end of the stream."""
        if not self.progress:
            return
        total = self.stream_size or device_size
        if r is None:
            now = total
        elif self.stream_size:
            now = self.done + r.end - r.pos
        else:
            now = r.offset + r.length
        if now > self.done:
            self.progress(now - self.done, total)
            self.done = now


class _Receiver:
    """Applies verified records to the hidden workspace; checkpoints; publishes."""

    def __init__(self, pool, token: R.Token, reader: S.RecordReader | None, *, fresh: bool,
                 progress):
        self.pool, self.token, self.reader = pool, token, reader
        self.fresh, self.progress = fresh, progress
        self.stats = ReceiveStats(f"{token.name}@{token.header.snap_name}", 0, 0, 0,
                                  not fresh)
        self._last = (time.monotonic(), token.pos)

    def run(self) -> ReceiveStats:
        if self.reader is not None:
            self._apply_all()
        _check_target(self.pool, self.token.name, self.token.header, self.token.force)
        self.pool.publish_hidden(self.token.hidden, self.stats.snapshot,
                                 self.token.header.snap_uuid.bytes)
        R.remove(self.pool, self.token.name)
        return self.stats

    def _apply_all(self) -> None:
        dev = self.pool.open_hidden(self.token.hidden)
        try:
            self._loop(dev)
        except StreamTruncated as e:
            dev.close()
            self._checkpoint()
            raise StreamTruncated(f"{e}; {self._resume_hint()}") from None
        except StreamError:
            dev.close()
            self._abandon()
            raise
        except BaseException:
            dev.close()  # pool full, broken pipe, ^C: keep what was applied
            self._checkpoint_quietly()
            raise
        dev.close()
        self.token.complete = True
        self._checkpoint()

    def _loop(self, dev) -> None:
        start = self.reader.pos - (S.header_len(self.reader.header) if self.reader.seq == 0
                                   else 0)
        for r in self.reader:
            if r.seq < self.token.seq:
                self._verify_skipped(r)
            else:
                _apply(dev, r)
                self.token.advance(self.reader)
                self.stats.records += 1
                self._maybe_checkpoint()
            self.stats.stream_bytes = self.reader.pos - start
            self.progress(r, self.token.header.device_size)
        self.stats.stream_bytes = self.reader.pos - start
        self.progress(None, self.token.header.device_size)

    def _verify_skipped(self, r: S.Record) -> None:
        """A record applied before the interruption: read and verified, not re-applied."""
        self.stats.skipped += 1
        if r.seq == self.token.seq - 1 and self.reader.state != self.token.state:
            raise StreamError(f"this is not the stream the interrupted receive into "
                              f"{self.token.name!r} was reading (stream checksum differs "
                              f"at record {r.seq})")

    def _maybe_checkpoint(self) -> None:
        now = time.monotonic()
        t0, pos0 = self._last
        if self.token.pos - pos0 >= CHECKPOINT_BYTES or now - t0 >= CHECKPOINT_SECONDS:
            self._checkpoint()

    def _checkpoint(self) -> None:
        """Commit first, then the token: the token never claims more than the pool holds."""
        self.pool.commit()
        R.save(self.pool, self.token)
        self._last = (time.monotonic(), self.token.pos)

    def _checkpoint_quietly(self) -> None:
        """Checkpoint while another error propagates; that error is the one to report."""
        try:
            self._checkpoint()
        except Exception:  # noqa: BLE001 - the original failure matters more
            pass

    def _abandon(self) -> None:
        """A corrupt stream: a fresh receive leaves the pool as it was before it began;
        a resumed one keeps its interrupted state, advanced by the good records."""
        if self.fresh:
            abort_receive(self.pool, self.token.name)
        else:
            self._checkpoint_quietly()

    def _resume_hint(self) -> str:
        t = self.token
        return (f"{t.seq} records ({t.pos} stream bytes) are safely applied: finish with "
                f"'thinstore receive --resume {t.name}' fed the whole stream or its bytes "
                f"from offset {t.pos}")


def _apply(dev, r: S.Record) -> None:
    if r.type == S.DATA:
        dev.pwrite(r.data(), r.offset)
    elif r.type == S.ZERO:
        dev.write_zeroes(r.offset, r.length)
    else:
        dev.discard(r.offset, r.length)
