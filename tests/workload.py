"""A random, replayable pool workload and the model that says what must survive a crash.

`plan(seed, devices, n)` yields the same ops for the same arguments, so a parent can
replay exactly what a killed child was doing from the seed and the child's log of
completed op indices. `Model` applies ops to plain bytearrays and keeps, per device,
the content as of the last completed flush plus a mask of bytes touched since; after
a crash every untouched byte of every device that existed at that flush must read back
exactly (DESIGN §3). A flush op is Pool.flush (the intent log) or, one time in four,
the full commit. Snapshot, clone, destroy, rollback and resize commit, so they count
as flushes.
"""

from __future__ import annotations

import os
import random

import numpy as np

DEV_SIZE = 96 << 10
CHUNK = 4096
MAX_DEVICES = 6


def payload(seed: int, i: int, length: int) -> bytes:
    rng = random.Random(seed * 1000003 + i)
    if rng.random() < 0.1:
        return bytes(length)                  # all-zero writes unmap (a pool shortcut)
    return rng.randbytes(length)


def plan(seed: int, devices: dict, n: int):
    """Yield n ops; `devices` maps name -> (kind, size) for what exists at the start."""
    rng = random.Random(seed)
    devs = dict(devices)
    serial = 0
    for i in range(n):
        writable = sorted(d for d, (k, _) in devs.items() if k != "snapshot")
        snaps = sorted(d for d, (k, _) in devs.items() if k == "snapshot")
        r = rng.random()
        if not writable or (r < 0.03 and len(devs) < MAX_DEVICES):
            serial += 1
            name = f"v{seed % 100000}x{serial}"
            devs[name] = ("volume", DEV_SIZE)
            yield i, ("create", name)
        elif r < 0.70:
            name = rng.choice(writable)
            off, ln = _range(rng, devs[name][1])
            yield i, ("write" if r < 0.60 else "discard", name, off, ln)
        elif r < 0.82:
            yield i, ("flush",)
        elif r < 0.88 and len(devs) < MAX_DEVICES:
            vols = sorted(d for d, (k, _) in devs.items() if k == "volume")
            if not vols:
                continue
            vol = rng.choice(vols)
            serial += 1
            snap = f"{vol}@s{seed % 100000}x{serial}"
            devs[snap] = ("snapshot", devs[vol][1])
            yield i, ("snapshot", snap)
        elif r < 0.93 and snaps and len(devs) < MAX_DEVICES:
            serial += 1
            name, src = f"c{seed % 100000}x{serial}", rng.choice(snaps)
            devs[name] = ("clone", devs[src][1])
            yield i, ("clone", src, name)
        elif r < 0.96 and len(devs) > 2:
            victim = rng.choice(sorted(devs))
            del devs[victim]             # its snapshots stay whole (DESIGN §2)
            yield i, ("destroy", victim)
        elif r < 0.98:
            back = [s for s in snaps if devs.get(s.split("@")[0], ("",))[0] == "volume"]
            if back:
                snap = rng.choice(back)
                devs[snap.split("@")[0]] = ("volume", devs[snap][1])
                yield i, ("rollback", snap)
        else:
            name = rng.choice(writable)
            size = rng.randrange(CHUNK // 2, 2 * DEV_SIZE)       # not chunk-aligned
            devs[name] = (devs[name][0], size)
            yield i, ("resize", name, size)


def _range(rng: random.Random, size: int) -> tuple[int, int]:
    if rng.random() < 0.5 and size >= CHUNK:
        first = rng.randrange(size // CHUNK)
        n = rng.randint(1, 3)
        return first * CHUNK, min(n * CHUNK, size - first * CHUNK)
    off = rng.randrange(size - 1)
    return off, rng.randint(1, min(12000, size - off))


def run_op(pool, seed: int, op) -> None:
    """Apply one op to an open pool."""
    i, (kind, *args) = op
    if kind == "create":
        pool.create_volume(args[0], DEV_SIZE)
    elif kind in ("write", "discard"):
        name, off, ln = args
        with pool.open_device(name) as dev:
            if kind == "write":
                dev.pwrite(payload(seed, i, ln), off)
            else:
                dev.discard(off, ln)
    elif kind == "flush":            # mostly the intent log; now and then the full commit
        pool.commit() if i % 4 == 0 else pool.flush()
    elif kind == "snapshot":
        pool.snapshot(args[0])
    elif kind == "clone":
        pool.clone(*args)
    elif kind == "destroy":
        pool.destroy(args[0], force=True)
    elif kind == "rollback":
        pool.rollback(args[0])
    elif kind == "resize":
        pool.resize(args[0], args[1], shrink=True)


class Model:
    """What each device holds now, at the last flush, and which bytes changed since."""

    def __init__(self, contents: dict):
        self.cur = {n: bytearray(b) for n, b in contents.items()}
        self.durable = {n: bytes(b) for n, b in contents.items()}
        self.touched = {n: np.zeros(len(b), dtype=bool) for n, b in contents.items()}

    def apply(self, seed: int, op) -> None:
        i, (kind, *args) = op
        if kind == "create":
            self._add(args[0], bytearray(DEV_SIZE))
        elif kind in ("write", "discard"):
            name, off, ln = args
            data = payload(seed, i, ln) if kind == "write" else bytes(ln)
            self.cur[name][off:off + ln] = data
            self.touched[name][off:off + ln] = True
            return
        elif kind == "snapshot":
            self._add(args[0], bytearray(self.cur[args[0].split("@")[0]]))
        elif kind == "clone":
            self._add(args[1], bytearray(self.cur[args[0]]))
        elif kind == "destroy":
            del self.cur[args[0]], self.touched[args[0]]
        elif kind == "rollback":
            self.cur[args[0].split("@")[0]] = bytearray(self.cur[args[0]])
        elif kind == "resize":
            name, size = args
            data = self.cur[name][:size]
            self.cur[name] = data + bytes(size - len(data))
        self._flushed()

    def _add(self, name: str, data: bytearray) -> None:
        self.cur[name] = data
        self.touched[name] = np.zeros(len(data), dtype=bool)

    def _flushed(self) -> None:
        self.durable = {n: bytes(b) for n, b in self.cur.items()}
        self.touched = {n: np.zeros(len(b), dtype=bool) for n, b in self.cur.items()}

    def verify(self, pool, in_progress=None) -> list[str]:
        """Compare a reopened pool with what must have survived; return the differences."""
        errors = []
        present = {d.name for d in pool.list()}
        may_vanish = set()
        kind = in_progress[1][0] if in_progress else None
        if kind == "destroy":
            may_vanish = {in_progress[1][1]}
        resized = set()
        if kind == "rollback":                # the volume may hold either content
            resized = {in_progress[1][1].split("@")[0]}
        if kind == "resize":
            resized = {in_progress[1][1]}
        if kind in ("write", "discard"):      # an unacknowledged write may land in part
            name, off, ln = in_progress[1][1:]
            self.touched[name][off:off + ln] = True
        for name, want in self.durable.items():
            if name not in present:
                if name not in may_vanish:
                    errors.append(f"device {name} existed at the last flush and is gone")
                continue
            if name not in self.touched or name in resized:
                continue
            got = read_all(pool, name)
            if len(got) != len(want):
                errors.append(f"device {name}: {len(got)} bytes, {len(want)} at the last flush")
                continue
            keep = ~self.touched[name]
            diff = np.flatnonzero((np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))
                                  & keep)
            if len(diff):
                errors.append(f"device {name}: {len(diff)} flushed byte(s) differ, first at "
                              f"{diff[0]}")
        return errors


def read_all(pool, name: str) -> bytes:
    with pool.open_device(name) as dev:
        return dev.pread(0, dev.size)


def snapshot_contents(pool) -> dict:
    return {d.name: read_all(pool, d.name) for d in pool.list()}


def kinds(pool) -> dict:
    return {d.name: (d.kind, d.size) for d in pool.list()}


def log_line(fd: int, i: int) -> None:
    os.write(fd, f"{i}\n".encode())


def last_logged(path: str) -> int:
    """Index of the last op the child logged as complete (-1 for none)."""
    try:
        with open(path) as f:
            lines = [ln for ln in f.read().split("\n") if ln.strip()]
    except FileNotFoundError:
        return -1
    return int(lines[-1]) if lines else -1
