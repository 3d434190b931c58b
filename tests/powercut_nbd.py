"""The power-cut workload through ``thinstore serve`` (powercut_workload.py --nbd).

The server (tests/nbdsoak.Server: ``python -m thinstore --pool P serve``, native
backend) holds the pool on the recorded disk; its native request loop answers plain
WRITEs, FLUSHes and FUA WRITEs itself, appending its own intent-log records
(ts_log_own), so those records, not only Pool.flush's, meet the power cuts. Four
raw NBD connections (nbdsoak.Client: QD1 and QD16, FLUSH after writes or FUA on
each, TRIM and WRITE_ZEROES now and then) write disjoint regions of ``fresh``,
``base`` (two connections) and ``clone``; a fifth thread takes online snapshots and
full commits through the control socket. Each FLUSH and FUA reply, each snapshot and
commit, is stamped with the disk's position when it came back. After `seconds` (and
at least MIN_STAMPS stamped replies, on a loaded host) the clients stop and the server
is stopped with SIGTERM (it closes the pool).
"""

from __future__ import annotations

import random
import signal
import threading
import time

import nbdsoak
from blockrec import PositionClient
from nbdsoak_check import Op

from thinstore.control import RemotePool
from thinstore.nbd import protocol as P


# Requests of 512 B to 64 KiB (nbdsoak's go to 1 MiB): every FLUSH and FUA write logs
# its data, and the log of an epoch must fit the small recorded disk until the next
# commit (it reached 88 MiB in half a second with 1 MiB requests)
nbdsoak._SIZES = (1, 8, 8, 8, 16, 64, 128)

#: the clients run `seconds`, and on until this many FLUSH and FUA replies were stamped
MIN_STAMPS = 40


class StampingClient(nbdsoak.Client):
    """nbdsoak's client, stamping positions and stopping when asked."""

    def __init__(self, rnd, sock, export, lo, hi, pattern, seed, possock, stop, stamps):
        super().__init__(rnd, sock, export, lo, hi, pattern, seed)
        self.pause = max(self.pause, 0.001)
        self.pos, self.stop, self.stamps = PositionClient(possock), stop, stamps

    def _reply(self) -> None:
        cookie, chunks = self.conn.structured_reply()
        op = self.inflight.pop(cookie)
        error = nbdsoak.reply_error(chunks)
        if error:
            op.error = error
            self.rnd.errors.append(f"{self.export}: request {op.id} got error {error}")
            return
        op.acked = next(self.rnd.events)
        if op.kind == P.Cmd.FLUSH or op.fua:
            self.stamps[op.id] = self.pos.ask()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.step()
                if self.pause:
                    time.sleep(min(self.pause, 0.02))
        finally:
            self.conn.close()
            self.pos.close()


def _admin(pool: str, rnd, possock: str, stop, out: list, seed: int) -> None:
    """Online snapshots (of base, clone) and full commits through the control socket."""
    rng, pos, k = random.Random(seed), PositionClient(possock), 0
    with RemotePool.connect(pool) as remote:
        while not stop.wait(rng.uniform(0.2, 0.5)):
            k += 1
            d = {"sent": next(rnd.events)}
            if k % 2 and k < 5:        # two snapshots: each keeps up to SIZE of chunks
                d.update(kind="snapshot", export=("base", "clone")[k // 2 % 2],
                         name=f"{('base', 'clone')[k // 2 % 2]}@n{k}")
                remote.snapshot(d["name"])
            else:
                d["kind"] = "commit"
                remote.commit()
            d["acked"] = next(rnd.events)
            d["pos"] = pos.ask()
            out.append(d)
    pos.close()


def run(pool: str, possock: str, sock: str, sectors: int, seed: int, seconds: float,
        unsafe: str | None) -> tuple[list, dict, list]:
    """(journal entries, the server's counters before it stopped, errors)."""
    rng = random.Random(seed)
    rnd = nbdsoak.Round(1000)
    server = nbdsoak.Server(pool, sock, unsafe)
    stop, stamps, admin_ops = threading.Event(), {}, []
    half = sectors // 2
    regions = [("fresh", 0, sectors), ("base", 0, half), ("base", half, sectors),
               ("clone", 0, sectors)]
    try:
        clients = [StampingClient(rnd, sock, name, lo, hi, rng.choice(nbdsoak.PATTERNS),
                                  seed * 31 + i, possock, stop, stamps)
                   for i, (name, lo, hi) in enumerate(regions)]
        threads = clients + [threading.Thread(target=_admin, daemon=True,
                                              args=(pool, rnd, possock, stop, admin_ops, seed))]
        for t in threads:
            t.start()
        time.sleep(seconds)
        # and, however loaded the host, until there is something to cut: stamped FLUSH
        # and FUA replies (bounded: a server that answers none fails the run's checks)
        deadline = time.monotonic() + 120
        while len(stamps) < MIN_STAMPS and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        for t in threads:
            t.join(60)
        with RemotePool.connect(pool) as remote:
            stats = remote.iostat()
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(60)
    finally:
        server.kill()
    counters = {"log": stats.get("log", {}), "commits": stats["pool"].get("commits", 0),
                "flush_ops": sum(d.get("flush_ops", 0) for d in stats["devices"].values())}
    return _journal(rnd.ops, stamps) + admin_ops, counters, rnd.errors


def _journal(ops: list[Op], stamps: dict) -> list[dict]:
    out = []
    for o in ops:
        if o.sent is None or o.acked is None:
            continue
        d = {"id": o.id, "kind": int(o.kind), "export": o.export, "first": o.first,
             "n": o.n, "fua": bool(o.fua), "sent": o.sent, "acked": o.acked}
        if o.id in stamps:
            d["pos"] = stamps[o.id]
        out.append(d)
    return out
