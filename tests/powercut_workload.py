"""The power-cut workload (tests/powercut.py runs it in its own process, native backend).

    python tests/powercut_workload.py POOL POSITION_SOCKET JOURNAL --seed S --ops N

Opens POOL (made by powercut.new_pool: exports ``fresh``, ``base``, ``clone``) with a
short commit interval and runs two threads through the Pool/Device API: one owns
``fresh``, the other ``base`` and ``clone``, so no two requests on one sector are in
flight together. Each thread writes tagged sectors (nbdsoak_check.payload: 512 B to
128 KiB), some with FUA, some as WRITE_ZEROES or TRIM, flushes after some, takes an
online snapshot now and then, and commits in full now and then; the periodic commit
runs meanwhile. Every operation gets event numbers (sent, acked) from one counter; a
FLUSH, a FUA write, a snapshot and a commit, once they return, ask the recording disk
for its position (blockrec) and carry it as ``pos``. The JOURNAL (a file not on the
recorded disk) gets one JSON line per operation as it completes, then a last line
with the log's counters and the position at the end of the workload.

THINSTORE_POWERCUT_UNSAFE=nodsync (the negative control): the native log writer's
descriptor is opened without O_DSYNC, so its O_DIRECT writes reach the disk's
volatile cache only and an acknowledged FLUSH is not durable until the next commit.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from blockrec import PositionClient             # noqa: E402
from nbdsoak_check import TRIM, ZEROES, payload  # noqa: E402

from thinstore import Pool, native, synclog     # noqa: E402
from thinstore.nbd import protocol as P         # noqa: E402

SIZES = (1, 1, 2, 7, 8, 16, 31, 64, 128, 256)   # sectors per write
FLUSH, SNAPSHOT, COMMIT = int(P.Cmd.FLUSH), "snapshot", "commit"


def unsafe_nodsync() -> None:
    """The negative control: the log writer's descriptor without O_DSYNC."""
    real = synclog._open_direct

    def no_dsync(fio):
        fd = real(fio)
        if fd >= 0:
            os.close(fd)
            fd = os.open(fio.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
        return fd
    synclog._open_direct = no_dsync


class Journal:
    """Event numbers, positions and the journal file, shared by the threads."""

    def __init__(self, path: str, sock: str):
        self.f = open(path, "w")
        self.pos = PositionClient(sock)
        self.lock = threading.Lock()
        self.event = 0
        self.next_id = 100              # ids 0 and 1 are zeros and the base's contents

    def tick(self) -> int:
        with self.lock:
            self.event += 1
            return self.event

    def new_id(self) -> int:
        with self.lock:
            self.next_id += 1
            return self.next_id

    def done(self, op: dict, stamp: bool) -> None:
        op["acked"] = self.tick()
        with self.lock:
            if stamp:
                op["pos"] = self.pos.ask()
            self.f.write(json.dumps(op) + "\n")
            self.f.flush()


def worker(pool, names: list, sectors: int, journal: Journal, seed: int, ops: int) -> None:
    rng = random.Random(seed)
    devs = {n: pool.open_device(n) for n in names}
    snaps = 0
    try:
        for _ in range(ops):
            name = rng.choice(names)
            r = rng.random()
            if r < 0.03 and snaps < 2:
                snaps += 1
                snap = f"{name}@p{seed}-{snaps}"
                op = {"kind": SNAPSHOT, "export": name, "name": snap, "sent": journal.tick()}
                pool.snapshot(snap)
                journal.done(op, True)
            elif r < 0.06:
                op = {"kind": COMMIT, "sent": journal.tick()}
                pool.commit()
                journal.done(op, True)
            elif r < 0.30:
                op = {"kind": FLUSH, "sent": journal.tick()}
                devs[name].flush()
                journal.done(op, True)
            else:
                write(devs[name], name, sectors, rng, journal)
    finally:
        for d in devs.values():
            d.close()


def write(dev, name: str, sectors: int, rng: random.Random, journal: Journal) -> None:
    n = rng.choice(SIZES)
    first = rng.randrange(0, sectors - n + 1)
    r = rng.random()
    kind = ZEROES if r < 0.04 else TRIM if r < 0.07 else int(P.Cmd.WRITE)
    fua = kind == int(P.Cmd.WRITE) and rng.random() < 0.2
    op = {"id": journal.new_id(), "kind": kind, "export": name, "first": first, "n": n,
          "fua": fua}
    data = payload(op["id"], first, n) if kind == int(P.Cmd.WRITE) else None
    op["sent"] = journal.tick()
    if kind == ZEROES:
        dev.write_zeroes(first * 512, n * 512)
    elif kind == TRIM:
        dev.discard(first * 512, n * 512)
    else:
        dev.pwrite(data, first * 512, fua=fua)
    journal.done(op, fua)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("pool")
    ap.add_argument("socket")
    ap.add_argument("journal")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ops", type=int, default=300)
    ap.add_argument("--sectors", type=int, required=True)
    ap.add_argument("--commit-interval", type=float, default=0.4)
    args = ap.parse_args(argv)
    if os.environ.get("THINSTORE_POWERCUT_UNSAFE") == "nodsync":
        unsafe_nodsync()
    journal = Journal(args.journal, args.socket)
    pool = Pool.open(args.pool, commit_interval=args.commit_interval)
    plan = [(["fresh"], args.seed * 2), (["base", "clone"], args.seed * 2 + 1)]
    errors: list = []

    def run(names, seed):
        try:
            worker(pool, names, args.sectors, journal, seed, args.ops)
        except BaseException as e:      # noqa: BLE001 - reported, and the exit code says so
            errors.append(repr(e))
    threads = [threading.Thread(target=run, args=p) for p in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    slog = pool._log
    syncer = slog._syncer.stats() if slog._syncer is not None else (0, 0, 0, 0)
    end = {"end": journal.pos.ask(), "backend": native.BACKEND, "log": slog.counters,
           "syncer": {"durable": syncer[0], "ok": syncer[1], "begun": syncer[2],
                      "direct": syncer[3]},
           "commits": pool.counters.get("commits", 0), "errors": errors}
    pool.close()
    journal.f.write(json.dumps(end) + "\n")
    journal.f.close()
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
