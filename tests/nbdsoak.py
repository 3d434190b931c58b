"""The NBD kill soak: a real ``thinstore serve``, real NBD clients, SIGKILL, verify.

One round (:func:`kill_round`): start ``python -m thinstore --pool P serve --socket S``
(the native backend's request loop serves the plain READs, WRITEs, FLUSHes and FUA
WRITEs), open two to four connections on the pool's exports (several on one export,
others on another), run a random workload on each in its own thread, SIGKILL the
server at a random moment, run ``thinstore check`` (it must exit 0), reopen the pool
and compare every sector of every export with what the clients were told.

Workloads (one per connection per round): QD1 write then FLUSH after every 1-3
writes (the early flush's guess, right and wrong), QD1 FUA writes, QD16 bursts with a
FLUSH inside the burst or after its replies, QD16 bursts of FUA writes. Sizes 512 B to
1 MiB, offsets 512-aligned; about one request in ten is a TRIM or a WRITE_ZEROES.
The exports: ``fresh`` (TRIMmed, so writes allocate), ``base`` (its snapshot keeps
its chunks shared: writes copy them) and ``clone`` (a clone of that snapshot); online
snapshots taken by the round, through the control socket, while the clients write,
make later writes copy again and close the pool's gate under the loop. The kill
lands 0.05-1.2 s after the clients start, or (one round in ten) 4.5-6.5 s, past the
server's periodic commit.

What a sector may read after the kill (the rule tests/nbdsoak_check.py applies):

- every sector holds the whole of one value: all zeros, or one write's tag repeated
  (the write's id and the sector's own index, so a misplaced sector is caught);
- a write is *durable* when it was a FUA WRITE whose reply came, or its reply came
  (was read by the client) before a FLUSH was sent on any connection, to any export,
  and that FLUSH's reply came OK. That is the server's promise (docs/nbd.md, FLUSH:
  "every write acknowledged on any connection is durable when it is answered"),
  stronger than NBD's CAN_MULTI_CONN, which asks it of one export's connections;
  TRIM and WRITE_ZEROES count as writes of zeros (NBD lets a TRIMmed range read back
  old data; thinstore's reads back zeros, docs/nbd.md, and is held to it);
- requests on one sector never overlap in flight (connections on one export write
  disjoint regions, a burst's requests do not overlap), so a sector's requests are
  ordered; let D be its last durable one (or the round's starting contents);
- the sector must read D's value, or the value of any request on it sent after D,
  acknowledged or not (a write acknowledged but not flushed may be lost; one in
  flight may land; one cut off mid-way may land in some sectors and not others:
  whole sectors, never a mix inside one).

A reply with an error to any request, a `check` that is not clean, or a server that
does not start fails the round too. The pool is kept across rounds: each round's
observed contents are the next one's starting contents.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np

from nbd_helpers import RawClient, reply_error
from nbdsoak_check import SECTOR, TRIM, ZEROES, Op, make_exports, payload, verify

from thinstore import Pool
from thinstore.control import RemotePool
from thinstore.nbd import protocol as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 8 << 20                          # each export
SECTORS = SIZE // SECTOR
EXPORTS = ("fresh", "base", "clone")
MiB = 1 << 20

# the negative controls' servers (soak(..., unsafe=NAME)):
UNSAFE = {
    # FLUSH and FUA answered at once, no record appended, and the native loop given no
    # log cursor (so it cannot answer them itself): an acknowledged write the last
    # commit did not take is lost
    "nolog": "from thinstore import device, synclog\n"
             "synclog.SyncLog.flush = lambda self, pool, wait=True: True\n"
             "device.Device.log_cursor = lambda self: None\n",
    # the records the native loop appends itself (ts_log_own) carry another epoch's
    # header, which replay refuses (and stops there): only what the loop answered, and
    # what was logged after it, is lost, so this control fails only if the rounds make
    # the loop answer FLUSH and FUA and the kills land before the next commit
    "loop-records": "from thinstore import synclog\n"
                    "pack = synclog.SyncLog._pack_head\n"
                    "def wrong_epoch(self):\n"
                    "    real = self.base\n"
                    "    self.base = real._replace(generation=real.generation + 1000)\n"
                    "    try:\n"
                    "        pack(self)\n"
                    "    finally:\n"
                    "        self.base = real\n"
                    "synclog.SyncLog._pack_head = wrong_epoch\n",
}
_RUN = "import sys\nfrom thinstore.cli.main import main\nsys.exit(main(sys.argv[1:]))\n"


# == the pool ======================================================================
def new_pool(path: str) -> dict:
    """The soak's pool at `path` (nbdsoak_check.make_exports); returns each export's
    contents (the per-sector ids :func:`observe` gives)."""
    make_exports(path, 256 * MiB, 64 << 10, SIZE)
    start = np.ones(SECTORS, np.int64)
    return {"fresh": np.zeros(SECTORS, np.int64), "base": start, "clone": start.copy()}


def read_back(path: str, trim_fresh: bool = False) -> dict:
    """Each export's bytes, from the pool reopened in this process; then, with
    `trim_fresh`, ``fresh`` discarded whole (the next round's writes there allocate)."""
    with Pool.open(path, commit_interval=0) as pool:
        out = {}
        for name in EXPORTS:
            with pool.open_device(name) as dev:
                out[name] = dev.pread(0, SIZE)
                if trim_fresh and name == "fresh":
                    dev.discard(0, SIZE)
    return out


def server_counts(path: str) -> dict:
    """The running server's totals (iostat): the exports' write_ops, write_timed
    (the native loop times every WRITE it serves, the Python path one in eight),
    flush_ops; the pool's chunks_allocated and chunks_copied. Empty if it does not
    answer."""
    try:
        with RemotePool.connect(path) as remote:
            stats = remote.iostat()
    except Exception:               # noqa: BLE001 - the counts are for the report only
        return {}
    out = {k: sum(d.get(k, 0) for d in stats["devices"].values())
           for k in ("write_ops", "write_timed", "flush_ops")}
    out.update((k, stats["pool"].get(k, 0)) for k in ("chunks_allocated", "chunks_copied"))
    return out


def env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT)


def cli(path: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thinstore", "--pool", path, *args],
                          capture_output=True, text=True, timeout=timeout, env=env())


class Server:
    """``thinstore --pool PATH serve --socket SOCK`` in its own process (or the
    negative control's unsafe one); ready once its control socket line is out."""

    def __init__(self, path: str, sock: str, unsafe: str | None = None):
        head = [sys.executable, "-c", UNSAFE[unsafe] + _RUN] if unsafe \
            else [sys.executable, "-m", "thinstore"]
        # the child appends (O_APPEND) to a file this process reads through its own
        # descriptor: a shared one's offset, moved by our reads, would misplace its writes
        self.log_path = sock + ".log"
        with open(self.log_path, "ab") as log:
            log.truncate(0)
            self.proc = subprocess.Popen(head + ["--pool", path, "serve", "--socket", sock],
                                         stdout=log, stderr=subprocess.STDOUT, env=env())
        self.sock = sock
        deadline = time.monotonic() + 60
        while "control socket:" not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                out = self.output()
                self.kill()
                raise RuntimeError("the server did not start: " + out[-2000:])
            time.sleep(0.02)

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)


# == the clients =====================================================================
class Round:
    """The shared record of one round: ops, an event counter, ids, errors."""

    def __init__(self, first_id: int):
        self.ids = itertools.count(first_id)
        self.events = itertools.count(1)        # next() is atomic under the GIL
        self.ops: list[Op] = []
        self.lock = threading.Lock()
        self.errors: list[str] = []

    def op(self, kind, export, first=0, n=0, fua=False) -> Op:
        o = Op(next(self.ids), kind, export, first, n, fua)
        with self.lock:
            self.ops.append(o)
        return o


PATTERNS = ("qd1_flush", "qd1_fua", "qd16_flush", "qd16_fua")
_SIZES = (1, 8, 8, 8, 16, 64, 128, 256, 512, 2048)    # in sectors: 512 B .. 1 MiB


class Client(threading.Thread):
    """One NBD connection writing in sectors [lo, hi) of `export` until the server
    dies, with one pattern (PATTERNS)."""

    def __init__(self, rnd: Round, sock: str, export: str, lo: int, hi: int,
                 pattern: str, seed: int):
        super().__init__(daemon=True)
        self.rnd, self.export, self.lo, self.hi = rnd, export, lo, hi
        self.pattern, self.rng = pattern, random.Random(seed)
        self.conn = RawClient(sock, timeout=30)
        self.conn.greet()
        self.structured = self.rng.random() < 0.5
        _, flags = self.conn.go(export, structured=self.structured, meta=False)
        assert flags & P.TF_SEND_FUA and flags & P.TF_SEND_FLUSH, hex(flags)
        self.inflight: dict[int, Op] = {}
        self.sent = 0
        # most connections pause between steps, some for long: the others' writes are
        # then often the only ones pending, which the native loop needs to answer a
        # FLUSH or FUA WRITE itself (else it hands them to the reader)
        # writes between FLUSHes at QD1: always one (the early flush's guess holds, and
        # the loop answers the FLUSH), or one to three (it is often wrong)
        self.gaps = (1,) if self.rng.random() < 0.5 else (1, 1, 2, 3)
        pace = self.rng.random()
        self.pause = 0.0 if pace < 0.4 else self.rng.uniform(0.0005, 0.005) if pace < 0.7 \
            else self.rng.uniform(0.02, 0.1)

    # -- requests -------------------------------------------------------------
    def _range(self, taken: list) -> tuple[int, int] | None:
        """A random range in the region overlapping none of `taken`."""
        for _ in range(8):
            n = min(self.rng.choice(_SIZES), self.hi - self.lo)
            if self.rng.random() < 0.3:
                n = self.rng.randrange(1, n + 1)
            first = self.rng.randrange(self.lo, self.hi - n + 1)
            if all(first + n <= a or b <= first for a, b in taken):
                taken.append((first, first + n))
                return first, n
        return None

    def _data_op(self, taken: list, fua: bool) -> tuple[Op, bytes] | None:
        where = self._range(taken)
        if where is None:
            return None
        first, n = where
        pick = self.rng.random()
        kind = TRIM if pick < 0.05 else ZEROES if pick < 0.1 else P.Cmd.WRITE
        op = self.rnd.op(kind, self.export, first, n, fua)
        cmd = {TRIM: P.Cmd.TRIM, ZEROES: P.Cmd.WRITE_ZEROES}.get(kind, P.Cmd.WRITE)
        flags = P.CMD_FLAG_FUA if fua else 0
        data = payload(op.id, first, n) if kind == P.Cmd.WRITE else b""
        head = P.encode_request(flags, cmd, op.id, first * SECTOR, n * SECTOR)
        return op, head + data

    def _flush_op(self) -> tuple[Op, bytes]:
        op = self.rnd.op(P.Cmd.FLUSH, self.export)
        return op, P.encode_request(0, P.Cmd.FLUSH, op.id, 0, 0)

    def _send(self, batch: list) -> None:
        """Send the batch's requests at once (each marked sent first), then read a
        reply for each."""
        for op, _ in batch:
            op.sent = next(self.rnd.events)
            self.inflight[op.id] = op
        self.conn.sock.sendall(b"".join(raw for _, raw in batch))
        self.sent += len(batch)
        while self.inflight:
            self._reply()

    def _reply(self) -> None:
        cookie, chunks = self.conn.structured_reply()
        op = self.inflight.pop(cookie)
        error = reply_error(chunks)
        if error:
            op.error = error
            self.rnd.errors.append(f"{self.export}: request {op.id} (kind {op.kind}) "
                                   f"got error {error}")
        else:
            op.acked = next(self.rnd.events)

    # -- patterns -------------------------------------------------------------
    def step(self) -> None:
        rng, p = self.rng, self.pattern
        if p in ("qd1_flush", "qd1_fua"):
            for _ in range(rng.choice(self.gaps) if p == "qd1_flush" else 1):
                op = self._data_op([], fua=p == "qd1_fua")
                self._send([op])
            if p == "qd1_flush":
                self._send([self._flush_op()])
            return
        taken, batch = [], []
        for _ in range(16):
            op = self._data_op(taken, fua=p == "qd16_fua")
            if op is not None:
                batch.append(op)
        inside = p == "qd16_flush" and rng.random() < 0.5
        if inside:
            batch[-1:] = [self._flush_op()]
        self._send(batch)
        if p == "qd16_flush" and not inside:
            self._send([self._flush_op()])

    def run(self) -> None:
        try:
            while True:
                self.step()
                if self.pause:
                    time.sleep(self.pause)
        except (OSError, ConnectionError, AssertionError, KeyError):
            self._drain()
        finally:
            self.conn.close()

    def _drain(self) -> None:
        """After a send failed (the server is gone): the replies it did send."""
        try:
            while self.inflight:
                self._reply()
        except (OSError, ConnectionError, AssertionError, KeyError):
            pass


# == one round ===========================================================================
def kill_round(path: str, contents: dict, seed: int, work: str, unsafe: str | None = None,
               first_id: int | None = None) -> dict:
    """One round on the pool at `path` whose exports hold `contents` (updated in place
    to what they hold after it); returns {killed, ops, acked, flushes, patterns,
    server, errors}."""
    rng = random.Random(seed)
    rnd = Round(first_id if first_id is not None else (seed + 1) * 10_000_000)
    sock = os.path.join(work, "nbd.sock")
    out = {"killed": 0, "ops": 0, "acked": 0, "flushes": 0, "patterns": [], "server": {},
           "errors": []}
    try:
        server = Server(path, sock, unsafe)
    except RuntimeError as exc:
        out["errors"].append(str(exc))
        return out
    try:
        clients = _clients(rnd, sock, rng, seed)
    except (OSError, AssertionError, ConnectionError) as exc:
        server.kill()
        out["errors"].append(f"connecting: {exc!r}: {server.output()[-1000:]}")
        return out
    out["patterns"] = [c.pattern for c in clients]
    for c in clients:
        c.start()
    snapper = threading.Thread(target=_snapshots, args=(path, rng.random(), seed), daemon=True)
    snapper.start()
    # one round in ten lives past the server's periodic commit (every 5 s): kills
    # then land in and after a commit that folds the log, not only between appends
    time.sleep(rng.uniform(4.5, 6.5) if rng.random() < 0.1 else rng.uniform(0.05, 1.2))
    out["server"] = server_counts(path) if rng.random() < 0.5 else {}
    alive = server.proc.poll() is None
    server.kill()
    out["killed"] = int(alive)
    if not alive:
        out["errors"].append("the server died before the kill: " + server.output()[-2000:])
    for c in clients:
        c.join(60)
    snapper.join(60)
    out["errors"] += rnd.errors + _check(path, contents, rnd.ops, rng.random() < 0.5)
    out["ops"] = sum(o.sent is not None for o in rnd.ops)
    out["acked"] = sum(o.acked is not None for o in rnd.ops)
    out["flushes"] = sum(o.kind == P.Cmd.FLUSH and o.acked is not None for o in rnd.ops)
    return out


def _check(path: str, contents: dict, ops: list[Op], trim: bool) -> list[str]:
    """After the kill: `thinstore check` must exit 0, and each export must hold what
    the rule allows (`contents` becomes what they hold; ``fresh`` zeros with `trim`,
    which discards it whole once read). The failures."""
    errors = []
    check = cli(path, "check")
    if check.returncode:
        errors.append(f"check exit {check.returncode}: {check.stdout[-1500:]}"
                      f"{check.stderr[-1500:]}")
    data = read_back(path, trim)
    for name in EXPORTS:
        lost, contents[name] = verify(name, contents[name], ops, data[name])
        errors += lost
    if trim:
        contents["fresh"] = np.zeros(SECTORS, np.int64)
    return errors


def _clients(rnd: Round, sock: str, rng: random.Random, seed: int) -> list[Client]:
    """Two to four connections: at least two on one export; their regions disjoint."""
    k = rng.choice((2, 3, 3, 4))
    shared = rng.choice(EXPORTS)
    exports = [shared, shared] + [rng.choice(EXPORTS) for _ in range(k - 2)]
    clients = []
    for name in sorted(set(exports)):      # not set order: the seed decides
        users = exports.count(name)
        cuts = sorted(rng.sample(range(8, SECTORS, 8), users - 1))
        bounds = [0, *cuts, SECTORS]
        for i in range(users):
            clients.append(Client(rnd, sock, name, bounds[i], bounds[i + 1],
                                  rng.choice(PATTERNS), seed * 31 + len(clients)))
    return clients


def _snapshots(path: str, chance: float, seed: int) -> None:
    """Now and then an online snapshot of base or clone (the oldest one dropped), so
    the clients' next writes there copy their chunks again."""
    if chance > 0.6:
        return
    time.sleep(0.05 + chance * 0.5)
    try:
        remote = RemotePool.connect(path)
        if remote is None:
            return
        with remote:
            name = ("base", "clone")[seed % 2]
            snap = f"{name}@k{seed % 3}"
            try:
                remote.destroy(snap)
            except Exception:       # noqa: BLE001 - not there yet, or the server died
                pass
            remote.snapshot(snap)
    except Exception:               # noqa: BLE001 - the kill may land during it
        pass


def soak(path: str, rounds: int, seed: int = 0, unsafe: str | None = None,
         tick=None) -> dict:
    """`rounds` kill rounds on a new pool at `path` (seeds seed, seed + 1, ...);
    the report: counts and failures ('seed N: ...')."""
    work = os.path.dirname(path)
    contents = new_pool(path)
    report = {"rounds": 0, "kills": 0, "ops": 0, "acked": 0, "flushes": 0,
              "patterns": dict.fromkeys(PATTERNS, 0), "server": {}, "failures": []}
    for s in range(seed, seed + rounds):
        r = kill_round(path, contents, s, work, unsafe)
        report["rounds"] += 1
        for key in ("kills", "ops", "acked", "flushes"):
            report[key] += r["killed" if key == "kills" else key]
        for p in r["patterns"]:
            report["patterns"][p] += 1
        for k, v in r.get("server", {}).items():
            report["server"][k] = report["server"].get(k, 0) + v
        report["failures"] += [f"seed {s}: {e}" for e in r["errors"]]
        if tick:
            tick(report)
    return report
