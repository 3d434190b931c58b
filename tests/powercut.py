"""Power cuts through the kernel's block layer: the native intent-log writer on ext4.

The stack (what tests/test_powercut_native.py and tools/powercut_soak.py build)::

    workload (own process, native backend: O_DIRECT|O_DSYNC log writes by Linux AIO
      |        or the writer thread, fdatasync, full commits)
    ext4 on /dev/loopN  <-  a FUSE file (nbdfuse)  <-  NBD  <-  blockrec (recording)

Checked on this machine (kernel 6.x, nbdfuse 1.14): an O_DIRECT|O_DSYNC write of a
file's allocated block reaches blockrec as a WRITE then a FLUSH (the loop device has
a volatile write cache and no FUA, so the block layer turns a FUA write into a write
and a flush; loop flushes by fsync of the FUSE file, which nbdfuse sends as FLUSH),
and a buffered write then fdatasync as a WRITE then a FLUSH. So blockrec's
recording is the order the disk saw, with every point where the kernel asked for
durability.

A cut at position C (records 0..C-1 completed, nothing after): the *crash image* is
the disk at the mark (the workload's start) plus every write before the last FLUSH
below C, plus -- as a volatile cache may or may not have written them -- a random
choice of the writes after that FLUSH, each applied whole, dropped, or torn (a
random subset of its 512-byte sectors), in recorded order; FUA writes are durable
once completed, so always applied.

The rule (nbdsoak_check.verify, fed per cut): the workload stamped each FLUSH, FUA
write, snapshot and full commit with the position it read right after the call
returned. One stamped at a position <= C returned before the cut: it counts as a
completed FLUSH (a snapshot or commit as one too), a FUA write as durable; a stamp
> C did not happen. Then every sector reads its last durable value or a later
write's; a snapshot stamped <= C exists; every snapshot that exists holds exactly its
export's writes before it. And `thinstore check` exits 0. (The stamp is compared
with C, not with the cut's last FLUSH: a writer that acknowledged before the disk's
FLUSH would otherwise never be caught.)

Cuts in replay: a crash image whose log has records is served by blockrec again,
mounted, and the pool opened on it (intent-log replay, the fold's full commit,
close) in a native process; cuts over that recording are checked by the first cut's
rule.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

from blockrec import FLUSH, BlockRecorder, counts
from nbdsoak_check import Op, make_exports, verify

from thinstore import Pool
from thinstore.cli.main import main as cli_main
from thinstore.errors import NoSuchDevice
from thinstore.nbd import protocol as P

MiB = 1 << 20
DISK = 128 * MiB
SIZE = 4 * MiB                      # each export
SECTORS = SIZE // 512
EXPORTS = ("fresh", "base", "clone")
TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(TESTS)
SNAPSHOT, COMMIT = "snapshot", "commit"
FLUSH_KIND = int(P.Cmd.FLUSH)
TEAR = 4096     # a torn write keeps or loses whole 4 KiB pieces (see the module docstring)


# == the pool and the stack =========================================================
def new_pool(path: str) -> None:
    """``fresh``, ``base`` (snapshotted as ``base@s``) and ``clone``, 16 KiB chunks
    (nbdsoak_check.make_exports)."""
    make_exports(path, 64 * MiB, 16 << 10, SIZE)


def starts() -> dict:
    import numpy as np
    ones = np.ones(SECTORS, np.int64)
    return {"fresh": np.zeros(SECTORS, np.int64), "base": ones, "clone": ones,
            "base@s": ones}


@contextlib.contextmanager
def stack(br: BlockRecorder, work: str, mkfs: bool):
    """blockrec -> nbdfuse -> loop -> ext4 (made when `mkfs`) mounted: yields the mount
    point; everything is taken down again, also on failure."""
    from test_nbd_blockdev import block_device, mounted
    sock = os.path.join(work, f"nbd{len(os.listdir(work))}.sock")
    br.listen(sock)
    with block_device(f"nbd+unix:///?socket={sock}") as dev:
        if mkfs:
            run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", dev])
        with mounted(dev) as where:
            yield where
            run(["sync", "-f", where])


def run(cmd, **kw) -> subprocess.CompletedProcess:
    """Run a tool; RuntimeError with its output when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    if proc.returncode:
        raise RuntimeError(f"{cmd} -> {proc.returncode}: {proc.stdout[-500:]}{proc.stderr[-2000:]}")
    return proc


def native_env(mode: str = "aio", unsafe: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, TESTS]), THINSTORE_PURE_PYTHON="0")
    env.pop("THINSTORE_LOG_THREAD", None)
    env.pop("THINSTORE_POWERCUT_UNSAFE", None)
    env["THINSTORE_LOG_THREAD"] = "1" if mode == "thread" else "0"
    if unsafe:
        env["THINSTORE_POWERCUT_UNSAFE"] = unsafe
    return env


# == recording a workload ============================================================
@dataclass
class Recording:
    """The disk at the mark, what it completed after, and what the workload was told."""
    base: bytes
    mark: int
    records: list
    ops: list = field(default_factory=list)
    end: dict = field(default_factory=dict)
    extents: dict = field(default_factory=dict)     # pool file -> [(start, end)] on the disk

    def file_at(self, offset: int) -> str:
        """Which pool file (log, meta, data) holds the disk byte `offset`, else "ext4"."""
        for name, spans in self.extents.items():
            if any(a <= offset < b for a, b in spans):
                return name
        return "ext4"

    def flushes(self) -> list[int]:
        return [r.seq for r in self.records if r.kind == FLUSH]


def record_workload(work: str, seed: int, ops: int, mode: str = "aio",
                    unsafe: str | None = None, nbd_seconds: float = 0) -> Recording:
    """Make the file system and the pool on the recorded stack, mark, run the workload
    (tests/powercut_workload.py; through ``thinstore serve`` and NBD clients for
    `nbd_seconds` when that is not 0) and return the recording."""
    br = BlockRecorder(DISK)
    possock = br.listen_position(os.path.join(work, "pos.sock"))
    journal = os.path.join(work, "journal.jsonl")
    try:
        with stack(br, work, mkfs=True) as mnt:
            new_pool(os.path.join(mnt, "pool"))
            run(["sync", "-f", mnt])
            base, mark = br.mark()
            proc = subprocess.run(
                [sys.executable, os.path.join(TESTS, "powercut_workload.py"),
                 os.path.join(mnt, "pool"), possock, journal, "--seed", str(seed),
                 "--ops", str(ops), "--sectors", str(SECTORS),
                 *(["--nbd", os.path.join(work, "ts.sock"), "--seconds", str(nbd_seconds)]
                   if nbd_seconds else [])],
                env=native_env(mode, unsafe), capture_output=True, text=True, timeout=600)
            extents = {name: file_extents(os.path.join(mnt, "pool", name))
                       for name in ("log", "meta", "data")}
        lines = [json.loads(line) for line in open(journal)]
    finally:
        br.close()
    if proc.returncode or not lines or "end" not in lines[-1]:
        raise RuntimeError(f"workload failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return Recording(base, mark, br.records[mark:], lines[:-1], lines[-1], extents)


def file_extents(path: str) -> list[tuple[int, int]]:
    """Where a file's blocks are on the disk under its file system, as byte ranges
    (filefrag's FIEMAP report; ext4 on the whole device, so disk offsets)."""
    out = run(["filefrag", "-v", path]).stdout
    m = re.search(r"blocks of (\d+) bytes", out)
    unit = int(m.group(1)) if m else 4096
    spans = []
    for a, b in re.findall(r"^\s*\d+:\s*\d+\.\.\s*\d+:\s*(\d+)\.\.\s*(\d+):", out, re.M):
        spans.append((int(a) * unit, (int(b) + 1) * unit))
    return spans


def record_replay(image: bytes, work: str) -> Recording:
    """Serve a crash image on the recorded stack, mount it, open the pool (replay and
    fold) and close it in a native process: the recording of that."""
    br = BlockRecorder(image=image)
    script = ("import sys\nfrom thinstore import Pool\n"
              "p = Pool.open(sys.argv[1], commit_interval=0)\n"
              "print(p._log.counters['replayed'])\np.close()\n")
    try:
        with stack(br, work, mkfs=False) as mnt:
            out = run([sys.executable, "-c", script, os.path.join(mnt, "pool")],
                      env=native_env()).stdout
            extents = {name: file_extents(os.path.join(mnt, "pool", name))
                       for name in ("log", "meta", "data")}
    finally:
        br.close()
    return Recording(image, 0, list(br.records), end={"replayed": int(out.split()[-1])},
                     extents=extents)


# == cuts and crash images ============================================================
def cut_points(rec: Recording, rng: random.Random, n: int) -> list[int]:
    """Up to `n` cut positions (:func:`plan_cuts`)."""
    return plan_cuts(rec, rng, n)[0]


def plan_cuts(rec: Recording, rng: random.Random, n: int) -> tuple[list[int], list[int]]:
    """(up to `n` cut positions, those of them just before a log append's FLUSH).
    The cuts: right after each stamp (the hardest moment: the caller was just told),
    just before and after each FLUSH, and random points in the runs of writes between
    FLUSHes; all of them when there are no more than `n`, else a sample of which a
    third are just before a FLUSH that follows a write to the intent log (between a
    log append and the FLUSH that would make it durable)."""
    lo, hi = rec.mark, rec.mark + len(rec.records)
    points = {hi, lo}
    points.update(o["pos"] for o in rec.ops if o.get("pos") is not None)
    flushes = rec.flushes()
    for f in flushes:
        points.update((f, f + 1))
    marks = [lo] + flushes + [hi]
    for a, b in zip(marks, marks[1:]):
        if b - a > 2:
            points.add(rng.randrange(a + 1, b))
    points = sorted(p for p in points if lo <= p <= hi)
    appends = [f for f in flushes if f > lo and rec.records[f - 1 - lo].kind != FLUSH
               and not rec.records[f - 1 - lo].fua
               and rec.file_at(rec.records[f - 1 - lo].offset) == "log"]
    if len(points) <= n:
        return points, sorted(set(points) & set(appends))
    before = rng.sample(appends or flushes, min(len(appends or flushes), n // 3))
    exposed = sorted(set(exposed_stamps(rec)) - set(before))
    told = rng.sample(exposed, min(len(exposed), n // 3))
    chosen = set(before) | set(told)
    rest = [p for p in points if p not in chosen]
    return (sorted(chosen | set(rng.sample(rest, n - len(chosen)))),
            sorted(set(before) & set(appends)))


def exposed_stamps(rec: Recording) -> list[int]:
    """Stamps (positions right after the workload was told a FLUSH, FUA write, snapshot
    or commit had completed) with a write to the intent log since the disk's last
    FLUSH: if that write was the record the caller was told about, only a writer that
    acknowledged early leaves it there, so a cut at such a stamp is the one that
    catches it."""
    out, log_since = set(), []
    stamps = sorted({o["pos"] for o in rec.ops if o.get("pos") is not None})
    i = 0
    for r in rec.records:
        while i < len(stamps) and stamps[i] <= r.seq:
            if log_since:
                out.add(stamps[i])
            i += 1
        if r.kind == FLUSH:
            log_since = []
        elif rec.file_at(r.offset) == "log":
            log_since.append(r.seq)
    if log_since:
        out.update(p for p in stamps[i:] if p <= rec.mark + len(rec.records))
    return sorted(out)


class Images:
    """Crash images of one recording, for cuts in increasing order (the durable
    prefix is carried forward from one cut to the next)."""

    def __init__(self, rec: Recording, cache: str = "random"):
        self.rec = rec
        self.cache = cache                  # "random", or "lose": nothing after the FLUSH
        self.durable = bytearray(rec.base)
        self.applied = 0                    # records (index in rec.records) applied
        self.fates: list = []               # the last image's writes after its FLUSH

    def at(self, cut: int, rng: random.Random, cache: str | None = None) -> bytearray:
        """The crash image at `cut`; `cache` overrides the instance's for this one."""
        recs = self.rec.records
        end = cut - self.rec.mark
        last = max((i for i in range(self.applied, end) if recs[i].kind == FLUSH),
                   default=self.applied - 1)
        if last + 1 < self.applied:
            raise ValueError("cuts must come in increasing order")
        for r in recs[self.applied:last + 1]:
            _apply(self.durable, r)
        self.applied = last + 1
        img = bytearray(self.durable)
        self.fates = [(r, _volatile(img, r, rng, cache or self.cache))
                      for r in recs[self.applied:end] if r.kind != FLUSH]
        return img


def _apply(img: bytearray, r) -> None:
    if r.kind != FLUSH:
        img[r.offset:r.offset + len(r.data)] = r.data


def _volatile(img: bytearray, r, rng: random.Random, cache: str = "random") -> str:
    """A write after the last FLUSH: "kept" (FUA always), "dropped", or "torn"; with
    `cache` "lose", every one that is not FUA is dropped (a cache that had written
    none of them back: the harshest of the images the model allows)."""
    x = rng.random() if cache == "random" else 1.0
    if r.fua or x < 0.4:
        _apply(img, r)
        return "kept"
    if x < 0.7 and len(r.data) > TEAR:
        for s in range(0, len(r.data), TEAR):
            if rng.random() < 0.5:
                piece = r.data[s:s + TEAR]
                img[r.offset + s:r.offset + s + len(piece)] = piece
        return "torn"
    return "dropped"


def _lost_in(rec: Recording, fates: list, report: dict) -> None:
    """Count the cut in report["cuts_losing"][file] for each pool file (log, meta,
    data) or "ext4" that had a write dropped or torn at it."""
    hit = {rec.file_at(r.offset) for r, fate in fates if fate != "kept"}
    for name in hit:
        report["cuts_losing"][name] = report["cuts_losing"].get(name, 0) + 1


# == checking one image ==================================================================
def expectations(ops: list, cut: int) -> tuple[list, list]:
    """(nbdsoak_check Ops as the disk saw them at `cut`, the snapshots that must exist)."""
    out, must_exist = [], []
    for d in ops:
        kind, stamped = d["kind"], d.get("pos") is not None and d["pos"] <= cut
        if kind in (SNAPSHOT, COMMIT, FLUSH_KIND):
            o = Op(0, P.Cmd.FLUSH, None)
            o.acked = d["acked"] if stamped else None
            if kind == SNAPSHOT and stamped:
                must_exist.append(d["name"])
        else:
            o = Op(d["id"], kind, d["export"], d["first"], d["n"], d["fua"] and stamped)
            o.acked = d["acked"]
        o.sent = d["sent"]
        out.append(o)
    return out, must_exist


def check_image(img: bytes, ops: list, cut: int, work: str) -> tuple[list, dict]:
    """Loop-mount the image (ext4 replays its journal), open the pool (intent-log
    replay), read every export and snapshot, close, run ``thinstore check``: (failures,
    facts such as how many records were replayed)."""
    path = os.path.join(_shm(work), "image")
    with open(path, "wb") as f:
        f.write(img)
    loop = run(["losetup", "-f", "--show", path]).stdout.strip()
    where = tempfile.mkdtemp(prefix="tspcm", dir="/tmp")
    try:
        run(["mount", loop, where])
        try:
            return _check_pool(os.path.join(where, "pool"), ops, cut)
        finally:
            run(["umount", where])
    finally:
        subprocess.run(["losetup", "-d", loop], capture_output=True)
        os.rmdir(where)
        os.unlink(path)


def _shm(work: str) -> str:
    d = os.path.join("/dev/shm", os.path.basename(work)) if os.path.isdir("/dev/shm") else work
    os.makedirs(d, exist_ok=True)
    return d


def _check_pool(path: str, ops: list, cut: int) -> tuple[list, dict]:
    expect, must_exist = expectations(ops, cut)
    start = starts()
    errors: list = []
    with Pool.open(path, commit_interval=0) as pool:
        facts = {"replayed": pool._log.counters["replayed"]}
        for name in EXPORTS + ("base@s",):
            with pool.open_device(name) as dev:
                errors += verify(name, start[name], expect, dev.pread(0, SIZE))[0]
        errors += _check_snapshots(pool, ops, must_exist, start)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        rc = cli_main(["--pool", path, "check"])
    if rc == 130:               # the CLI's answer to Ctrl-C: stop here too
        raise KeyboardInterrupt
    if rc:
        errors.append(f"thinstore check exited {rc}: {out.getvalue()[-800:]}")
    return errors, facts


def _check_snapshots(pool, ops: list, must_exist: list, start: dict) -> list:
    errors = []
    for d in (o for o in ops if o["kind"] == SNAPSHOT):
        try:
            dev = pool.open_device(d["name"])
        except NoSuchDevice:
            if d["name"] in must_exist:
                errors.append(f"snapshot {d['name']} was taken before the cut and is gone")
            continue
        with dev:
            # anything sent before the snapshot returned may be in it; what was
            # answered before it was asked for must be
            # answered before it was asked for must be (only the snapshot's own commit
            # counts as a flush here: a FLUSH sent meanwhile may come after it)
            mine, _ = expectations([o for o in ops if o.get("export") == d["export"]
                                    and o["kind"] not in (SNAPSHOT, COMMIT, FLUSH_KIND)
                                    and o["sent"] < d["acked"]], 1 << 62)
            for o in mine:
                o.export = d["name"]        # verify() picks the ops of the name it checks
                o.fua = False               # a FUA write answered later is not in it
            snap = Op(0, P.Cmd.FLUSH, None)
            snap.sent, snap.acked = d["sent"], d["acked"]
            errors += verify(d["name"], start[d["export"]], mine + [snap],
                             dev.pread(0, SIZE))[0]
    return errors


# == a whole run ================================================================
def powercut_run(work: str, seed: int, ops: int, cuts: int, replay_cuts: int = 0,
                 mode: str = "aio", unsafe: str | None = None, log=None,
                 nbd_seconds: float = 0, keep: str | None = None,
                 cache: str = "random") -> dict:
    """Record one workload, check `cuts` crash images of it, and `replay_cuts` more
    inside the replay of one of them; `cache` is how the writes after each image's
    last FLUSH fare (Images). Returns a report: counts, failures (cut ->
    messages), the workload's log counters. With `keep` (a directory), each failing
    crash image is saved there as it was before it was mounted, with the journal."""
    rng = random.Random(seed)
    rec = record_workload(work, seed, ops, mode, unsafe, nbd_seconds)
    report = {"seed": seed, "mode": mode, "disk": counts(rec.records), "workload": rec.end,
              "cuts": 0, "replayed_cuts": 0, "cuts_losing": {}, "failures": {}, "replay": None}
    images, replay_from = Images(rec, cache), None
    chosen, appends = plan_cuts(rec, rng, cuts)
    # the first cut between a log append and its FLUSH gets a cache that lost every
    # write since the FLUSH before (one of the images the model allows): at least one
    # cut of every run loses a log append, whatever the random fates of the others
    harsh = appends[0] if appends else None
    for cut in chosen:
        img = images.at(cut, rng, "lose" if cut == harsh else None)
        errors, facts = check_image(img, rec.ops, cut, work)
        _lost_in(rec, images.fates, report)
        report["cuts"] += 1
        report["replayed_cuts"] += facts["replayed"] > 0
        if errors:
            report["failures"][cut] = errors
            _keep(keep, f"seed{seed}-cut{cut}", img, rec.ops)
        elif facts["replayed"] and replay_from is None:
            replay_from = (cut, bytes(img))
        if log:
            log(f"cut {cut}: {'FAIL ' + errors[0] if errors else 'ok'} {facts}")
    if replay_cuts and replay_from is not None:
        report["replay"] = replay_run(rec, replay_from, work, rng, replay_cuts, log)
    return report


def replay_run(rec: Recording, replay_from: tuple, work: str, rng: random.Random,
               cuts: int, log=None) -> dict:
    """Cuts inside the replay of the crash image `replay_from` = (cut, image)."""
    first_cut, image = replay_from
    rrec = record_replay(image, work)
    out = {"from_cut": first_cut, "replayed": rrec.end["replayed"], "disk": counts(rrec.records),
           "cuts": 0, "cuts_losing": {}, "failures": {}}
    images = Images(rrec)
    for cut in cut_points(rrec, rng, cuts):
        errors, _ = check_image(images.at(cut, rng), rec.ops, first_cut, work)
        _lost_in(rrec, images.fates, out)
        out["cuts"] += 1
        if errors:
            out["failures"][cut] = errors
        if log:
            log(f"replay cut {cut}: {'FAIL ' + errors[0] if errors else 'ok'}")
    return out


def _keep(keep: str | None, name: str, img: bytes, ops: list) -> None:
    if keep:
        os.makedirs(keep, exist_ok=True)
        with open(os.path.join(keep, name + ".img"), "wb") as f:
            f.write(img)
        with open(os.path.join(keep, name + ".jsonl"), "w") as f:
            f.writelines(json.dumps(o) + "\n" for o in ops)


def cleanup(work: str) -> None:
    """Remove the work directory and its image directory in /dev/shm."""
    shutil.rmtree(_shm(work), ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
