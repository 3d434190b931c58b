"""The power-cut workload (tests/powercut.py runs it in its own process, native backend).

    python tests/powercut_workload.py POOL POSITION_SOCKET JOURNAL --sectors K
                                      [--seed S] [--ops N | --nbd SOCKET --seconds T]

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
with the log's counters and the position at the end of the workload. With --nbd the
same happens through ``thinstore serve`` and NBD clients instead (powercut_nbd.py).

THINSTORE_POWERCUT_UNSAFE=NAME runs a negative control (UNSAFE below): ``nodsync``,
the native log writer's descriptor opened without O_DSYNC, so its O_DIRECT writes
reach the disk's volatile cache only and an acknowledged FLUSH is not durable until
the next commit; ``nowait``, a flush that does not wait for its record's write.
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

from thinstore import Pool, native              # noqa: E402
from thinstore.nbd import protocol as P         # noqa: E402

SIZES = (1, 1, 2, 7, 8, 16, 31, 64, 128, 256)   # sectors per write
FLUSH, SNAPSHOT, COMMIT = int(P.Cmd.FLUSH), "snapshot", "commit"


# the negative controls, as source (the NBD server runs them before serving,
# nbdsoak.UNSAFE; the API workload execs them)
UNSAFE = {
    # the log writer's descriptor without O_DSYNC: its direct writes reach the disk's
    # volatile cache only, and no FLUSH follows until the next commit
    "nodsync": """
import os
from thinstore import synclog
_real_open_direct = synclog._open_direct
def _no_dsync(fio):
    fd = _real_open_direct(fio)
    if fd >= 0:
        os.close(fd)
        fd = os.open(fio.path, os.O_RDWR | os.O_DIRECT | os.O_CLOEXEC)
    return fd
synclog._open_direct = _no_dsync
""",
    # a flush that starts the record's write but does not wait for it (Pool.flush and
    # FUA through the API; the NBD loop's own records wait in C and are not affected)
    "nowait": """
from thinstore import synclog
synclog.SyncLog.sync = lambda self, ticket: self.kick(ticket) if self._async else None
""",
}


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
    ap.add_argument("--nbd", metavar="SOCKET", help="through thinstore serve on SOCKET")
    ap.add_argument("--seconds", type=float, default=3.0, help="how long the NBD clients run")
    args = ap.parse_args(argv)
    unsafe = os.environ.get("THINSTORE_POWERCUT_UNSAFE")
    if args.nbd:
        return nbd_main(args, unsafe)
    if unsafe:
        exec(UNSAFE[unsafe], {})
    return api_main(args)


def api_main(args) -> int:
    """Two threads through the Pool/Device API (the module docstring)."""
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
    end = {"end": journal.pos.ask(), "backend": native.BACKEND, "log": pool.log_counters,
           "commits": pool.counters.get("commits", 0), "errors": errors}
    pool.close()
    journal.f.write(json.dumps(end) + "\n")
    journal.f.close()
    return 1 if errors else 0


def nbd_main(args, unsafe: str | None) -> int:
    import nbdsoak
    import powercut_nbd
    if unsafe:
        nbdsoak.UNSAFE[unsafe] = UNSAFE[unsafe]
    ops, counters, errors = powercut_nbd.run(args.pool, args.socket, args.nbd, args.sectors,
                                             args.seed, args.seconds, unsafe)
    pos = PositionClient(args.socket)
    end = {"end": pos.ask(), "backend": native.BACKEND, "errors": errors, **counters}
    pos.close()
    with open(args.journal, "w") as f:
        for op in sorted(ops, key=lambda o: o["sent"]):
            f.write(json.dumps(op) + "\n")
        f.write(json.dumps(end) + "\n")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
