"""Which kernels run: the native library (_native/, cffi) or the pure-Python twins.

The storage core calls kernels only through ``K``, so the choice is made once,
here, at import:

    THINSTORE_PURE_PYTHON=1   the twins of thinstore.kernels, whether or not C is built
    THINSTORE_PURE_PYTHON=0   the native library; NativeUnavailable at import without it
    unset (or empty)          native when built and current, else the twins

``BACKEND`` is ``"native"`` or ``"python"``; ``WHY_PYTHON`` says why the twins run.
The native module reports the API version it was compiled with; a build made from
another version of thinstore_native.h is refused (never called) because a changed
signature would silently corrupt memory.

The wrappers in ``NativeKernels`` have the twins' signatures. They check dtypes,
shapes and contiguity (what the C side cannot see), pass buffers with
``ffi.from_buffer`` (no copies, no per-chunk objects), make one C call per request,
and turn its return code into an exception in one place, ``_check``. A file object
whose ``fd`` is None (a test double, RADOS) gets the twin for that call.

The request kernels take the pool's state as one ``kernels.PoolState`` (C: ts_pool)
and a ``kernels.Dev`` (ts_dev). The pool binds its PoolState to one long-lived
ts_pool (``bind_pool``; fastlane.py keeps it pointed at the current arrays); an
unbound PoolState (the agreement tests) gets a struct for the call, its scalars
copied in and the ones C changes copied back.
"""

from __future__ import annotations

import importlib
import os
import warnings

import numpy as np

from thinstore.errors import CorruptMetadata, NativeUnavailable, ThinstoreError, UsageError

API_VERSION = 17  # must equal TS_API_VERSION of _native/thinstore_native.h
ENV = "THINSTORE_PURE_PYTHON"

_U8, _U32, _U64, _I64 = (np.dtype(t) for t in (np.uint8, np.uint32, np.uint64, np.int64))
_CTYPE = {_U8: "uint8_t[]", _U32: "uint32_t[]", _U64: "uint64_t[]", _I64: "int64_t[]"}


def _twins():
    """The pure-Python kernels (imported on first use: they are the fallback)."""
    return importlib.import_module("thinstore.kernels")


def _load(api: int = API_VERSION):
    """(ffi, lib) of a native build implementing kernel API `api`, or (None, reason)."""
    try:
        from thinstore._thinstore_native import ffi, lib
    except ImportError as e:
        return None, f"the native library is not built ({e})"
    if lib.ts_api_version() != api:
        return None, (f"the native library is stale: it implements kernel API "
                      f"{lib.ts_api_version()}, this thinstore needs {api}; "
                      f"rebuild it (pip install . or python setup.py build_ext --inplace)")
    return (ffi, lib), None


_built, _why_not = _load()
if _built:
    ffi, lib = _built
    _E = {lib.TS_E_CORRUPT: (CorruptMetadata, "a map or chunk id lies outside its array"),
          # ValueError, as the twin raises: callers must not depend on the backend
          lib.TS_E_UNDERFLOW: (ValueError, "reference count would drop below zero"),
          lib.TS_E_NOCHUNK: (ThinstoreError, "write ran out of the new chunks given"),
          lib.TS_E_SPACE: (UsageError, "translate: the output array is too small"),
          lib.TS_E_ARG: (UsageError, "invalid kernel argument")}


def _check(rc: int, what: str) -> int:
    """The one place a C return code becomes a result or an exception."""
    if rc >= 0:
        return rc
    if rc > -lib.TS_E_BASE:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    cls, msg = _E.get(rc, (ThinstoreError, f"unknown native error {rc}"))
    raise cls(f"{what}: {msg}")


def _arr(a, dtype, name: str, writable: bool = False):
    """A cffi pointer into numpy array `a`, after checking what C assumes of it
    (from_buffer itself refuses arrays that are not C-contiguous)."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype:
        raise TypeError(f"{name} must be a numpy {dtype} array")
    return ffi.from_buffer(_CTYPE[dtype], a, require_writable=writable)


# The pool's long-lived arrays (maps, space map, counters) cross the boundary on
# every request, and checking and wrapping each costs more than a 4 KiB pwrite on
# tmpfs.  So the pointer arguments of each group of arrays are built once and kept,
# keyed by the arrays' ids; the entry holds the arrays, so an id cannot be reused
# while it is kept.  A held pointer forbids an in-place ndarray.resize; the core
# replaces arrays when it grows them, which only makes a new entry.
_MEMO: dict[tuple, tuple] = {}
_MEMO_MAX = 16


def _memo(kind: str, arrays: tuple, build):
    key = (kind, *map(id, arrays))
    hit = _MEMO.get(key)
    if hit is None:
        if len(_MEMO) >= _MEMO_MAX:
            _MEMO.clear()
        hit = _MEMO[key] = (arrays, build(*arrays))
    return hit[1]


def _check_pages(pages):
    if not isinstance(pages, np.ndarray) or pages.ndim != 2 or pages.shape[1] != lib.TS_FANOUT:
        raise ValueError(f"pages must be an array of shape (n, {lib.TS_FANOUT})")
    return pages.shape[0]


def _map_args(dirarr, pages, writable=False):
    """(dir, n_dir, pages, n_pages) as C takes them."""
    n_pages = _check_pages(pages)
    return (_arr(dirarr, _U64, "dirarr", writable), len(dirarr),
            _arr(pages, _U64, "pages", writable), n_pages)


def _space_args(chunk_ref, chunk_state, chunk_summary):
    """(chunk_ref, chunk_state, chunk_summary, n_chunks): the space map as C sees it."""
    if len(chunk_state) != len(chunk_ref):
        raise ValueError("chunk_ref and chunk_state must have the same length")
    if len(chunk_summary) != _twins().summary_len(len(chunk_ref)):
        raise ValueError("chunk_summary must have one byte per 4096 chunks")
    return (_arr(chunk_ref, _U32, "chunk_ref", True),
            _arr(chunk_state, _U8, "chunk_state", True),
            _arr(chunk_summary, _U8, "chunk_summary", True), len(chunk_ref))


def _bytes(a, name: str, writable: bool = False):
    """A bool or uint8 array as uint8_t[] (the cdata keeps its view alive)."""
    return _arr(a.view(np.uint8) if a.dtype == np.bool_ else a, _U8, name, writable)


def fill_pool(c, ps) -> None:
    """Point ts_pool `c` at the arrays of `ps` (a kernels.PoolState) after checking
    what C assumes of them; the scalars are left alone. The caller keeps `ps` (and so
    the arrays) alive as long as `c` is used, and calls this only while no kernel
    runs on `c` (for the pool's struct: the gate closed by the exclusive side)."""
    fd = _fd(ps.fio)
    if fd is None:
        raise ValueError("the native kernels need a data file with a descriptor")
    n_pages = _check_pages(ps.pages)
    ref, state, summary, n_chunks = _space_args(ps.chunk_ref, ps.chunk_state, ps.chunk_summary)
    if not len(ps.page_ref) == len(ps.page_dirty) == len(ps.page_loaded) == n_pages:
        raise ValueError("page_ref, page_dirty and page_loaded must match pages")
    n_sums = len(ps.chunk_sums)
    if n_sums not in (0, n_chunks) or len(ps.chunk_verified) != n_sums:
        raise ValueError("chunk_sums and chunk_verified must be empty or match chunk_ref")
    if len(ps.intent_hot) != len(ps.intent_bits) or len(ps.cursor) != 3:
        raise ValueError("intent_hot must match intent_bits; cursor is int64[3]")
    if len(ps.counters) != 4:
        raise ValueError("counters must have 4 entries")
    c.pages, c.n_pages = _arr(ps.pages, _U64, "pages", True), n_pages
    c.page_ref = _arr(ps.page_ref, _U32, "page_ref")
    c.page_dirty = _arr(ps.page_dirty, _U8, "page_dirty", True)
    c.page_loaded = _bytes(ps.page_loaded, "page_loaded")
    c.chunk_ref, c.chunk_state, c.chunk_summary, c.n_chunks = ref, state, summary, n_chunks
    c.chunk_sums = _arr(ps.chunk_sums, _U32, "chunk_sums") if n_sums else ffi.NULL
    c.chunk_verified = _bytes(ps.chunk_verified, "chunk_verified") if n_sums else ffi.NULL
    c.n_sums = n_sums
    c.intent_bits, c.n_bits = _bytes(ps.intent_bits, "intent_bits"), len(ps.intent_bits)
    c.intent_hot = _bytes(ps.intent_hot, "intent_hot", True)
    c.cursor = _arr(ps.cursor, _I64, "cursor", True)
    c.counters = _arr(ps.counters, _I64, "counters", True)
    c.fd, c.intent_shift, c.chunk_shift = fd, ps.intent_shift, ps.chunk_shift


def bind_pool(ps):
    """A new ts_pool bound to `ps` (ps.c): the pool's one struct. Its scalars are
    then C's (Python sets them through ps.c); point it with fill_pool."""
    ps.c = ffi.new("ts_pool *")
    return ps.c


def _fd(fio):
    fd = getattr(fio, "fd", None)
    return fd if isinstance(fd, int) and fd >= 0 else None


def fill_dev(c, dev) -> None:
    """Point ts_dev `c` at `dev` (a kernels.Dev); the same rules as fill_pool."""
    c.dir, c.n_dir = _arr(dev.dirarr, _U64, "dirarr", True), len(dev.dirarr)
    c.size, c.writable = dev.size, dev.writable


_SCALARS = ("open", "writes", "budget", "wrote", "gate", "closers", "excl_closers")


def _pool_struct(ps):
    """(ts_pool for ps, whether it was made for this call): the bound struct, or a
    new one with ps's arrays and scalars."""
    if ps.c is not None:
        return ps.c, False
    c = ffi.new("ts_pool *")
    fill_pool(c, ps)
    for name in _SCALARS:
        setattr(c, name, getattr(ps, name))
    return c, True


def _dev_struct(dev):
    if dev.c is not None:
        return dev.c
    c = ffi.new("ts_dev *")
    fill_dev(c, dev)
    return c


class NativeKernels:
    """The kernels of thinstore.kernels, running in C (same names, same signatures)."""

    name = "native"

    @staticmethod
    def translate(dirarr, pages, chunk_shift, offset, length, out):
        if out.ndim != 2 or out.shape[1] != 3:
            raise ValueError("out must have shape (m, 3)")
        return _check(lib.ts_translate(
            *_memo("map", (dirarr, pages), _map_args), chunk_shift, offset, length,
            _arr(out, _I64, "out", True), out.shape[0]), "translate")

    @staticmethod
    def shadow_page(pages, src, dst, chunk_ref, chunk_state, chunk_summary):
        n_pages = _check_pages(pages)
        _check(lib.ts_shadow_page(
            _memo("pages", (pages,), lambda p: _arr(p, _U64, "pages", True)), n_pages, src, dst,
            *_memo("space", (chunk_ref, chunk_state, chunk_summary), _space_args)),
            "shadow_page")

    @staticmethod
    def ref_batch(chunk_ref, chunk_state, chunk_summary, ids, delta):
        _check(lib.ts_ref_batch(
            *_memo("space", (chunk_ref, chunk_state, chunk_summary), _space_args),
            _arr(ids, _U64, "ids"), len(ids), delta), "ref_batch")

    @staticmethod
    def count_write_allocs(ps, dev, offset, length):
        if _fd(ps.fio) is None:
            return _twins().count_write_allocs(ps, dev, offset, length)
        return _check(lib.ts_count_write_allocs(_pool_struct(ps)[0], _dev_struct(dev),
                                                offset, length), "count_write_allocs")

    @staticmethod
    def write(ps, dev, buf, offset, length, mode, new_chunks=None):
        """The one write entry (kernels.write): ts_write on ps's struct."""
        if _fd(ps.fio) is None:         # a file without a descriptor (a test double, RADOS)
            return _twins().write(ps, dev, buf, offset, length, mode, new_chunks)
        if offset < 0:
            return -1 if mode == lib.TS_REQ_LANE else _check(lib.TS_E_ARG, "write")
        c, own = _pool_struct(ps)
        data = ffi.from_buffer("uint8_t[]", buf)
        if len(data) < length:
            raise ValueError(f"write: buffer holds {len(data)} bytes, not {length}")
        new = ffi.NULL if new_chunks is None or not len(new_chunks) else \
            _arr(new_chunks, _I64, "new_chunks")
        rc = lib.ts_write(c, _dev_struct(dev), data, offset, length, mode, new,
                          0 if new_chunks is None else len(new_chunks))
        if own:
            ps.budget, ps.wrote = c.budget, c.wrote
        return -1 if rc == lib.TS_SLOW else _check(rc, "write")

    @staticmethod
    def read(ps, dev, buf, offset, length, mode):
        """The one read entry (kernels.read): ts_read on ps's struct."""
        if _fd(ps.fio) is None:     # no descriptor: C translates, the file reads (RADOS)
            if mode != lib.TS_REQ_LOCKED:
                return -1
            NativeKernels.read_range(dev.dirarr, ps.pages, ps.chunk_shift, ps.fio, buf,
                                     offset, length)
            return 0
        if offset < 0:
            return -1 if mode == lib.TS_REQ_LANE else _check(lib.TS_E_ARG, "read")
        out = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        if len(out) != length:
            raise ValueError(f"read: buffer holds {len(out)} bytes, not {length}")
        rc = lib.ts_read(_pool_struct(ps)[0], _dev_struct(dev), out, offset, length, mode)
        return -1 if rc == lib.TS_SLOW else _check(rc, "read")

    @staticmethod
    def prealloc(fio, chunk_shift, n_chunks, cursor, ids):
        fd = _fd(fio)
        if fd is None:
            return _twins().prealloc(fio, chunk_shift, n_chunks, cursor, ids)
        if len(cursor) != 3:
            raise ValueError("cursor is int64[3]")
        return lib.ts_prealloc(fd, chunk_shift, n_chunks, _arr(cursor, _I64, "cursor", True),
                               _arr(ids, _I64, "ids"), len(ids))

    @staticmethod
    def unmap_range(ps, dev, first_chunk, n_chunks):
        if _fd(ps.fio) is None:
            return _twins().unmap_range(ps, dev, first_chunk, n_chunks)
        return _check(lib.ts_unmap_range(_pool_struct(ps)[0], _dev_struct(dev), first_chunk,
                                         n_chunks), "unmap_range")

    @staticmethod
    def read_range(dirarr, pages, chunk_shift, fio, buf, offset, length):
        fd = _fd(fio)
        if fd is None:        # no descriptor (RADOS, a test double): C translates, fio reads
            if length <= 0:
                return None
            rows = np.empty(((length >> chunk_shift) + 2, 3), dtype=np.int64)
            n = NativeKernels.translate(dirarr, pages, chunk_shift, offset, length, rows)
            return _twins().read_extents(fio, buf, offset, rows[:n].tolist())
        out = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        if len(out) != length:
            raise ValueError(f"read_range: buffer holds {len(out)} bytes, not {length}")
        _check(lib.ts_read_range(*_memo("map", (dirarr, pages), _map_args), chunk_shift, fd,
                                 out, offset, length), "read_range")

    @staticmethod
    def cow_copy(fio, src_off, dst_off, length):
        fd = _fd(fio)
        if fd is None:
            return _twins().cow_copy(fio, src_off, dst_off, length)
        _check(lib.ts_cow_copy(fd, src_off, dst_off, length), "cow_copy")

    @staticmethod
    def is_zero(buf):
        data = ffi.from_buffer("uint8_t[]", buf)
        return bool(lib.ts_is_zero(data, len(data)))

    @staticmethod
    def state_clear(chunk_state, ids, flags: int) -> None:
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        lib.ts_state_clear(ffi.from_buffer("uint8_t[]", chunk_state, require_writable=True),
                           len(chunk_state), ffi.from_buffer("int64_t[]", ids), len(ids),
                           flags)

    @staticmethod
    def hash_chunks(fio, ids, chunk_size: int, out) -> bool:
        """Data checksums of whole chunks `ids` of `fio` into the uint32 array `out`
        (ts_hash_chunks: datasums.chunk_sum of each, read and hashed in C without the
        GIL). False, having done nothing, for a file without a descriptor. Raises
        OSError."""
        fd = _fd(fio)
        if fd is None:
            return False
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if out.dtype != np.uint32 or len(out) != len(ids):
            raise ValueError("out must be a uint32 array with one entry per id")
        _check(lib.ts_hash_chunks(fd, ffi.from_buffer("int64_t[]", ids), len(ids), chunk_size,
                                  ffi.from_buffer("uint32_t[]", out, require_writable=True)),
               "hash_chunks")
        return True

    @staticmethod
    def writeback(fio, runs, window: int) -> None:
        """Paced writeback of byte ranges `runs` ((offset, length) pairs) of `fio`
        (ts_writeback); a file without a descriptor gets one datasync instead.
        Raises OSError."""
        fd = _fd(fio)
        if fd is None:
            fio.datasync()
            return
        flat = np.ascontiguousarray(runs, dtype=np.int64).reshape(-1)
        _check(lib.ts_writeback(fd, ffi.from_buffer("int64_t[]", flat), len(flat) // 2,
                                window), "writeback")

    @staticmethod
    def count_mapped(dirarr, pages, chunk_ref, page_ref):
        d, n_dir, p, n_pages = _map_args(dirarr, pages)
        if len(page_ref) != n_pages:
            raise ValueError("page_ref must have one entry per page row")
        out = np.zeros(2, dtype=np.int64)
        _check(lib.ts_count_mapped(
            d, n_dir, p, _arr(page_ref, _U32, "page_ref"), n_pages,
            _arr(chunk_ref, _U32, "chunk_ref"), len(chunk_ref),
            ffi.from_buffer("int64_t[]", out, require_writable=True)), "count_mapped")
        return int(out[0]), int(out[1])


def log_record(ps, devs: list, dev_ids: list, ranges: list, out) -> int | None:
    """ts_log_record over the pool's bound struct `ps.c`: an intent-log record built in
    the writable buffer `out` (its 64-byte header packed by the caller) for `ranges`,
    (index into devs/dev_ids, offset, length) tuples; devs are kernels.Dev with their
    structs. Returns the record's length, or None when the caller must build it in
    Python (TS_SLOW)."""
    flat = ffi.new("uint64_t[]", [v for r in ranges for v in r])
    rc = lib.ts_log_record(ps.c, ffi.new("ts_dev *[]", [d.c for d in devs]),
                           ffi.new("uint64_t[]", dev_ids), flat, len(ranges),
                           ffi.from_buffer("uint8_t[]", out, require_writable=True), len(out))
    if rc == lib.TS_SLOW:
        return None
    return _check(rc, "log_record")


class LogSyncer:
    """The intent log's writer (_native/intentlog.c): a thread, or with
    THINSTORE_LOG_THREAD=0 Linux AIO direct writes where `dio_fd` is given. append(record, offset,
    ticket) queues a copy of a record (`ticket`: the log's count of bytes appended
    after it); kick(ticket) asks for every record up to `ticket` and returns at once;
    wait(ticket) returns the durable count (>= ticket) once an attempt begun after the
    call wrote it durably (O_DIRECT|O_DSYNC on `dio_fd`, else buffered writes to `fd`
    and fdatasync), or raises OSError (the failed attempt's errno; EBADF after
    stop()). discard(ticket): after a full commit, nothing queued is needed. stop()
    joins the thread and must come before the files are closed; the C struct is
    freed only when this object is garbage, so a thread still inside wait() never
    sees freed memory."""

    def __init__(self, fd: int, dio_fd: int = -1):
        s = lib.ts_syncer_new(fd, dio_fd)
        if s == ffi.NULL:
            raise OSError(ffi.errno, f"cannot start the log writer: {os.strerror(ffi.errno)}")
        self._s = ffi.gc(s, lib.ts_syncer_free)

    def append(self, record, offset: int, ticket: int) -> None:
        rec = ffi.from_buffer("uint8_t[]", record)
        _check(lib.ts_syncer_append(self._s, rec, len(rec), offset, ticket), "log append")

    def kick(self, ticket: int) -> None:
        lib.ts_syncer_kick(self._s, ticket)

    def wait(self, ticket: int) -> int:
        rc = lib.ts_syncer_wait(self._s, ticket)
        if rc < 0:
            raise OSError(-rc, f"intent log write: {os.strerror(-rc)}")
        return rc

    def discard(self, ticket: int) -> None:
        lib.ts_syncer_discard(self._s, ticket)

    def stats(self) -> tuple[int, int, int, int]:
        """(durable count, attempts that succeeded, attempts begun, of the successful
        ones those done by direct writes alone)."""
        out = ffi.new("uint64_t[4]")
        lib.ts_syncer_stats(self._s, out)
        return int(out[0]), int(out[1]), int(out[2]), int(out[3])

    def stop(self) -> None:
        lib.ts_syncer_stop(self._s)


class LogCursor:
    """The intent log's append cursor in C (ts_log, _native/thinstore_native.h), shared
    by synclog.SyncLog and the native NBD loop: `c` is the struct (its fields read and
    written by SyncLog under the mutex, which this object is as a context manager:
    ts_log_lock releases the GIL while it waits). pending(delta) adds to the count of
    writes noted and not yet in a record (atomic); attach(syncer) gives it the log
    writer, after which the loop may append; set_head(bytes) the epoch's 64-byte
    header. Freed when garbage (the NBD loop keeps a reference while it runs)."""

    def __init__(self):
        c = lib.ts_log_new(ffi.NULL)
        if c == ffi.NULL:
            raise MemoryError("cannot allocate the intent log's cursor")
        self.c = ffi.gc(c, lib.ts_log_free)
        self._syncer = None

    def attach(self, syncer: LogSyncer) -> None:
        """(Called with or without the mutex held: one pointer store, which C reads
        atomically.)"""
        self._syncer = syncer          # kept alive as long as the cursor
        self.c.syncer = syncer._s

    def set_head(self, head) -> None:
        ffi.memmove(self.c.head, head, len(head))

    def pending(self, delta: int) -> None:
        lib.ts_log_pending(self.c, delta)

    def take(self) -> list:
        """(Under the mutex.) The NBD loops' shared notes, (dev_id, offset, length)
        each, moved out of C (ts_log_take); still counted in pending."""
        out = ffi.new("uint64_t[]", 3 * lib.TS_LOG_SHARED_MAX)
        n = lib.ts_log_take(self.c, out, lib.TS_LOG_SHARED_MAX)
        flat = ffi.unpack(out, 3 * n)
        return list(zip(flat[0::3], flat[1::3], flat[2::3]))

    def __enter__(self):
        lib.ts_log_lock(self.c)
        return self

    def __exit__(self, *exc):
        lib.ts_log_unlock(self.c)


def _choose():
    """(kernels, backend name, reason the twins run or None), from the environment."""
    mode = os.environ.get(ENV, "")
    if mode not in ("", "0", "1"):
        raise UsageError(f"{ENV} must be 1 (pure Python), 0 (native) or unset, not {mode!r}")
    if mode == "1":
        return _twins(), "python", f"{ENV}=1"
    if _built:
        return NativeKernels, "native", None
    if mode == "0":
        raise NativeUnavailable(f"{ENV}=0 requires the native kernels, but {_why_not}")
    if "stale" in _why_not:
        warnings.warn(f"thinstore: {_why_not}; using the pure-Python kernels", RuntimeWarning)
    return _twins(), "python", _why_not


NATIVE = NativeKernels if _built else None  # for tests and benchmarks comparing both
WHY_NOT_NATIVE = _why_not
K, BACKEND, WHY_PYTHON = _choose()
