"""Small helpers the integrity tests share: a populated pool, locating and flipping bytes."""

from __future__ import annotations

import os
import random

import numpy as np

from thinstore import Pool
from thinstore.format import BLOCK_SIZE, FANOUT

CHUNK = 4096
SIZE = 256 << 10


def make_pool(path: str, checksums: bool = True) -> dict:
    """A closed pool with vol (written), vol@snap, a clone of it; returns the contents."""
    rng = random.Random(7)
    with Pool.create(path, 8 << 20, CHUNK, commit_interval=0, data_checksums=checksums) as pool:
        pool.create_volume("vol", SIZE)
        with pool.open_device("vol") as dev:
            dev.pwrite(rng.randbytes(SIZE), 0)
        pool.snapshot("vol@snap")
        pool.clone("vol@snap", "clone")
        with pool.open_device("vol") as dev:
            dev.pwrite(rng.randbytes(3 * CHUNK), 10 * CHUNK)     # vol diverges in chunks 10-12
        return {d.name: _read(pool, d.name) for d in pool.list()}


def _read(pool, name: str) -> bytes:
    with pool.open_device(name) as dev:
        return dev.pread(0, dev.size)


def chunk_of(path: str, device: str, vchunk: int) -> int:
    """The data chunk a device's virtual chunk maps to."""
    with Pool.open(path, commit_interval=0) as pool:
        dm = pool._find(device)
        pid = int(dm.directory.arr[vchunk // FANOUT])
        pool.md.maps.ensure_loaded([pid])
        return int(pool.md.maps.pages[pid, vchunk % FANOUT])


def map_page_block(path: str, device: str) -> int:
    """The metadata block holding a device's first map page."""
    with Pool.open(path, commit_interval=0) as pool:
        pid = int(pool._find(device).directory.arr[0])
        return int(pool.md.maps.locations.arr[pid])


def flip(path: str, offset: int, nbytes: int = 1) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        old = f.read(nbytes)
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in old))


def flip_block(pool_dir: str, block: int, at: int = 100) -> None:
    flip(os.path.join(pool_dir, "meta"), block * BLOCK_SIZE + at)


def flip_chunk(pool_dir: str, chunk: int, at: int = 123) -> None:
    flip(os.path.join(pool_dir, "data"), chunk * CHUNK + at)


def tamper(path: str, fn) -> None:
    """Open the pool, let fn change its in-memory tree, commit: valid checksums, bad content."""
    with Pool.open(path, commit_interval=0) as pool:
        fn(pool)
        pool.commit()


def zeros_mask(data: bytes) -> np.ndarray:
    return np.frombuffer(data, np.uint8) == 0


def contents_of(path: str) -> dict:
    """Every device's bytes, by name (opens and closes the pool)."""
    with Pool.open(path, commit_interval=0) as pool:
        out = {}
        for d in pool.list():
            with pool.open_device(d.name) as dev:
                out[d.name] = dev.pread(0, dev.size)
        return out
