"""Data checksums of whole chunks in C, for the commit and the pre-hash (datasums.py).

`K.hash_chunks` (native backend only: ts_hash_chunks, docs/native.md) reads and
hashes chunks without the GIL. The commit hashes with the pool lock held, so it
splits the chunks over two threads; the pre-hash runs beside the server, one thread,
a step at a time. Each function returns None where there is no native hashing (the
pure-Python backend, a file without a descriptor): the caller then hashes in Python.
"""

from __future__ import annotations

import threading

import numpy as np

from .kernels import ST_REHASH
from .native import K

PARALLEL_MIN = 64       # chunks a commit hashes on two threads, from this many
PREHASH_STEP = 256      # chunks the pre-hash hashes per native call


def _native(fio, cs: int):
    native_hash = getattr(K, "hash_chunks", None)
    if native_hash is None or not native_hash(fio, np.zeros(0, np.int64), cs,
                                              np.zeros(0, np.uint32)):
        return None
    return native_hash


def hash_parallel(fio, ids: np.ndarray, cs: int) -> np.ndarray | None:
    """chunk_sum of each chunk `ids` of `fio` (chunk size `cs`), on two threads at once;
    None for fewer than PARALLEL_MIN chunks or without native hashing."""
    native_hash = _native(fio, cs) if len(ids) >= PARALLEL_MIN else None
    if native_hash is None:
        return None
    out = np.zeros(len(ids), dtype=np.uint32)
    half, failed = len(ids) // 2, []

    def other_half() -> None:
        try:
            native_hash(fio, ids[half:], cs, out[half:])
        except BaseException as e:          # noqa: BLE001 -- raised below
            failed.append(e)

    helper = threading.Thread(target=other_half, name="thinstore-hash", daemon=True)
    helper.start()
    try:
        native_hash(fio, ids[:half], cs, out[:half])
    finally:
        helper.join()
    if failed:
        raise failed[0]
    return out


def prehash(fio, state, ids: np.ndarray, cs: int, stop=None) -> np.ndarray | None:
    """The pre-hash's sums of chunks `ids`, a step at a time (`stop`, an Event: give up,
    returning None), each step's ST_REHASH cleared just before its chunks are read: a
    chunk then counts as written again only if written after its own read, not after
    the pre-hash began. None without native hashing, having cleared nothing."""
    native_hash = _native(fio, cs)
    if native_hash is None:
        return None
    out = np.zeros(len(ids), dtype=np.uint32)
    for lo in range(0, len(ids), PREHASH_STEP):
        if stop is not None and stop.is_set():
            return None
        step = ids[lo:lo + PREHASH_STEP]
        K.state_clear(state, step, ST_REHASH)
        native_hash(fio, step, cs, out[lo:lo + PREHASH_STEP])
    return out
