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
whose ``fd`` is None (a test double) gets the twin for that call.
"""

from __future__ import annotations

import importlib
import os
import warnings

import numpy as np

from thinstore.errors import CorruptMetadata, NativeUnavailable, ThinstoreError, UsageError

API_VERSION = 6  # must equal TS_API_VERSION of _native/thinstore_native.h
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
          lib.TS_E_NOCHUNK: (ThinstoreError, "write_range ran out of preallocated chunks"),
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


def _space_args(chunk_ref, chunk_state):
    """(chunk_ref, chunk_state, n_chunks): the space map as C sees it."""
    if len(chunk_state) != len(chunk_ref):
        raise ValueError("chunk_ref and chunk_state must have the same length")
    return (_arr(chunk_ref, _U32, "chunk_ref", True),
            _arr(chunk_state, _U8, "chunk_state", True), len(chunk_ref))


def _state_args(dirarr, pages, page_dirty, chunk_ref, chunk_state):
    """Map, page_dirty and space map: the arguments of the kernels that write."""
    d, n_dir, p, n_pages = _map_args(dirarr, pages, True)
    if len(page_dirty) != n_pages:
        raise ValueError("page_dirty must have one entry per page row")
    return (d, n_dir, p, n_pages, _arr(page_dirty, _U8, "page_dirty", True),
            *_space_args(chunk_ref, chunk_state))


def _counters_arg(counters):
    if len(counters) != 4:
        raise ValueError("counters must have 4 entries")
    return _arr(counters, _I64, "counters", True)


def _fast_args(dirarr, pages, page_ref, page_dirty, chunk_ref, chunk_state, chunk_sums,
               intent_bits, intent_hot, cursor, counters, fio):
    """The array arguments of ts_write_fast in C's order, then the file descriptor
    (all before the per-request scalars); None when the file has no descriptor."""
    fd = _fd(fio)
    if fd is None:
        return None
    d, n_dir, p, n_pages, dirty, ref, state, n_chunks = _state_args(
        dirarr, pages, page_dirty, chunk_ref, chunk_state)
    if len(page_ref) != n_pages or len(intent_hot) != len(intent_bits):
        raise ValueError("page_ref must match pages; intent_hot must match intent_bits")
    if len(chunk_sums) not in (0, n_chunks) or len(cursor) != 3:
        raise ValueError("chunk_sums must be empty or match chunk_ref; cursor is int64[3]")
    sums = _arr(chunk_sums, _U32, "chunk_sums") if len(chunk_sums) else ffi.NULL
    # bool arrays as bytes; the cdata keeps its view (and so the array) alive
    bits = _arr(intent_bits.view(np.uint8), _U8, "intent_bits")
    hot = _arr(intent_hot.view(np.uint8), _U8, "intent_hot", True)
    return (d, n_dir, p, n_pages, _arr(page_ref, _U32, "page_ref"), dirty, ref, state, n_chunks,
            sums, len(chunk_sums), bits, hot, len(intent_bits), _arr(cursor, _I64, "cursor", True),
            _counters_arg(counters), fd)


def _fd(fio):
    fd = getattr(fio, "fd", None)
    return fd if isinstance(fd, int) and fd >= 0 else None


def fill_lane(c, lane) -> None:
    """Point ts_lane `c` at the arrays of `lane` (a kernels.Lane) and copy its scalars,
    after checking what C assumes of them. The caller keeps `lane` (and so the
    arrays) alive as long as `c` is used, and sets it only with the gate closed."""
    fd = _fd(lane.fio)
    if fd is None:
        raise ValueError("a write lane needs a data file with a descriptor")
    d = np.zeros(1, np.uint64)      # fast_args checks everything but the directory
    (_, _, c.pages, c.n_pages, c.page_ref, c.page_dirty, c.chunk_ref, c.chunk_state,
     c.n_chunks, c.chunk_sums, c.n_sums, c.intent_bits, c.intent_hot, c.n_bits, c.cursor,
     c.counters, c.fd) = _fast_args(d, lane.pages, lane.page_ref, lane.page_dirty,
                                    lane.chunk_ref, lane.chunk_state, lane.chunk_sums,
                                    lane.intent_bits, lane.intent_hot, lane.cursor,
                                    lane.counters, lane.fio)
    loaded, verified = lane.page_loaded, lane.chunk_verified
    if len(loaded) != c.n_pages or len(verified) != (c.n_chunks if c.n_sums else 0):
        raise ValueError("page_loaded must match pages; chunk_verified must match chunk_sums")
    c.page_loaded = _arr(loaded.view(np.uint8), _U8, "page_loaded")
    c.chunk_verified = _arr(verified.view(np.uint8), _U8, "chunk_verified") if len(verified) \
        else ffi.NULL
    c.intent_shift, c.chunk_shift = lane.intent_shift, lane.chunk_shift
    c.open, c.writes, c.budget, c.wrote = lane.open, lane.writes, lane.budget, lane.wrote


def fill_dev_lane(c, dev) -> None:
    """Point ts_dev_lane `c` at `dev` (a kernels.DevLane); the same rules as fill_lane."""
    c.dir, c.n_dir = _arr(dev.dirarr, _U64, "dirarr", True), len(dev.dirarr)
    c.size, c.writable = dev.size, dev.writable


def _lane_structs(lane, dev):
    """(ts_lane, ts_dev_lane) for a kernels.Lane and DevLane, gate state included."""
    c, dc = ffi.new("ts_lane *"), ffi.new("ts_dev_lane *")
    fill_lane(c, lane)
    fill_dev_lane(dc, dev)
    c.gate, c.closers, c.excl_closers = lane.gate, lane.closers, lane.excl_closers
    return c, dc


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
    def shadow_page(pages, src, dst, chunk_ref, chunk_state):
        n_pages = _check_pages(pages)
        _check(lib.ts_shadow_page(
            _memo("pages", (pages,), lambda p: _arr(p, _U64, "pages", True)), n_pages, src, dst,
            *_memo("space", (chunk_ref, chunk_state), _space_args)), "shadow_page")

    @staticmethod
    def ref_batch(chunk_ref, chunk_state, ids, delta):
        _check(lib.ts_ref_batch(*_memo("space", (chunk_ref, chunk_state), _space_args),
                                _arr(ids, _U64, "ids"), len(ids), delta), "ref_batch")

    @staticmethod
    def count_write_allocs(dirarr, pages, chunk_ref, chunk_state, chunk_shift, offset, length):
        return _check(lib.ts_count_write_allocs(
            *_memo("map", (dirarr, pages), _map_args),
            *_memo("space", (chunk_ref, chunk_state), _space_args),
            chunk_shift, offset, length), "count_write_allocs")

    @staticmethod
    def write_range(dirarr, pages, page_dirty, chunk_ref, chunk_state, new_chunks,
                    chunk_shift, fio, buf, offset, length, counters):
        fd = _fd(fio)
        if fd is None:
            return _twins().write_range(dirarr, pages, page_dirty, chunk_ref, chunk_state,
                                        new_chunks, chunk_shift, fio, buf, offset, length,
                                        counters)
        data = ffi.from_buffer("uint8_t[]", buf)
        if len(data) < length:
            raise ValueError(f"write_range: buffer holds {len(data)} bytes, not {length}")
        new = _arr(new_chunks, _I64, "new_chunks") if len(new_chunks) else ffi.NULL
        _check(lib.ts_write_range(
            *_memo("state", (dirarr, pages, page_dirty, chunk_ref, chunk_state), _state_args),
            new, len(new_chunks), chunk_shift, fd, data, offset, length,
            _memo("counters", (counters,), _counters_arg)), "write_range")

    @staticmethod
    def write_fast(dirarr, pages, page_ref, page_dirty, chunk_ref, chunk_state, chunk_sums,
                   intent_bits, intent_hot, intent_shift, cursor, chunk_shift, fio, buf,
                   offset, length, counters):
        args = _memo("fast", (dirarr, pages, page_ref, page_dirty, chunk_ref, chunk_state,
                              chunk_sums, intent_bits, intent_hot, cursor, counters, fio),
                     _fast_args)
        if args is None:        # a file without a descriptor (a test double)
            return _twins().write_fast(dirarr, pages, page_ref, page_dirty, chunk_ref,
                                       chunk_state, chunk_sums, intent_bits, intent_hot,
                                       intent_shift, cursor, chunk_shift, fio, buf, offset,
                                       length, counters)
        data = ffi.from_buffer("uint8_t[]", buf)
        if len(data) < length:
            raise ValueError(f"write_fast: buffer holds {len(data)} bytes, not {length}")
        rc = lib.ts_write_fast(*args, intent_shift, chunk_shift, data, offset, length)
        return -1 if rc == lib.TS_SLOW else _check(rc, "write_fast")

    @staticmethod
    def lane_write(lane, dev, buf, offset, length):
        """The lane's C entries on a kernels.Lane (the pool keeps its own ts_lane:
        fastlane.py); the scalars the C side changes are copied back."""
        if offset < 0:
            return -1
        c, dc = _lane_structs(lane, dev)
        data = ffi.from_buffer("uint8_t[]", buf)
        if len(data) < length:
            raise ValueError(f"lane_write: buffer holds {len(data)} bytes, not {length}")
        rc = lib.ts_lane_write(c, dc, data, offset, length)
        lane.budget, lane.wrote = c.budget, c.wrote
        return -1 if rc == lib.TS_SLOW else _check(rc, "lane_write")

    @staticmethod
    def lane_read(lane, dev, buf, offset, length):
        if offset < 0:
            return -1
        c, dc = _lane_structs(lane, dev)
        out = ffi.from_buffer("uint8_t[]", buf, require_writable=True)
        if len(out) != length:
            raise ValueError(f"lane_read: buffer holds {len(out)} bytes, not {length}")
        rc = lib.ts_lane_read(c, dc, out, offset, length)
        return -1 if rc == lib.TS_SLOW else _check(rc, "lane_read")

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
    def unmap_range(dirarr, pages, page_dirty, chunk_ref, chunk_state, first_chunk, n_chunks):
        return _check(lib.ts_unmap_range(
            *_memo("state", (dirarr, pages, page_dirty, chunk_ref, chunk_state), _state_args),
            first_chunk, n_chunks), "unmap_range")

    @staticmethod
    def read_range(dirarr, pages, chunk_shift, fio, buf, offset, length):
        fd = _fd(fio)
        if fd is None:
            return _twins().read_range(dirarr, pages, chunk_shift, fio, buf, offset, length)
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
