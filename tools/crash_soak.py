#!/usr/bin/env python3
"""Long crash soak: many SIGKILLs and simulated power cuts on one pool, then a report.

    python tools/crash_soak.py --kills 500 --cuts 1000 [--dir /tmp/soak] [--seed 0]

Each kill round forks a child that runs a random workload (writes, flushes, discards,
snapshots, clones, destroys, rollbacks, resizes) on the pool and logs every completed op; the child is
SIGKILLed at a random moment; the pool is reopened, checked (`check` must be clean)
and every byte acknowledged before the last completed flush must read back, on every
device that existed then. Each cut round does the same in-process through the
power-cut FileIO double (tests/faultfs.py), tearing and dropping unsynced writes;
flushes go through the intent log (one in four is a full commit), so cuts land
before, inside and after log appends and in the commits that fold the log, and one
round in three cuts power again inside the reopen (the replay and its fold).
The pool is kept across rounds, so later rounds crash a pool that has crashed before.
Exit status 0 when every round passed; the report gives the counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

import logging  # noqa: E402

import crashkit  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=500, help="SIGKILLs to deliver (default 500)")
    ap.add_argument("--cuts", type=int, default=1000, help="power cuts (default 1000)")
    ap.add_argument("--dir", help="work directory (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    logging.getLogger("thinstore").setLevel(logging.ERROR)   # recovery notes are expected
    work = args.dir or tempfile.mkdtemp(prefix="thinstore-soak-")
    report = {"kills": 0, "kill_rounds": 0, "cuts": 0, "cut_rounds": 0, "reopen_cuts": 0,
              "torn_writes": 0,
              "dropped_writes": 0, "failures": [], "dir": work}
    t0 = time.monotonic()
    _kills(os.path.join(work, "kill"), args, report)
    _cuts(os.path.join(work, "cut"), args, report)
    report["seconds"] = round(time.monotonic() - t0, 1)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"SIGKILL rounds: {report['kill_rounds']}, kills delivered: {report['kills']}")
        print(f"power cuts: {report['cut_rounds']} rounds, {report['cuts']} mid-workload, "
              f"{report['reopen_cuts']} inside the reopen (log replay, fold), "
              f"{report['torn_writes']} torn and {report['dropped_writes']} dropped writes")
        print(f"failures: {len(report['failures'])}  ({report['seconds']} s, pools in {work})")
        for f in report["failures"][:20]:
            print("  " + f)
    return 1 if report["failures"] else 0


def _kills(path: str, args, report: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    crashkit.new_pool(path)
    seed = args.seed
    while report["kills"] < args.kills and report["kill_rounds"] < 2 * args.kills:
        r = crashkit.kill_round(path, seed)
        report["kill_rounds"] += 1
        report["kills"] += r["killed"]
        report["failures"] += [f"kill seed {seed}: {e}" for e in r["errors"]]
        seed += 1
        _tick("kills", report["kills"], args.kills)


def _cuts(path: str, args, report: dict) -> None:
    crashkit.new_pool(path)
    for seed in range(args.seed, args.seed + args.cuts):
        r = crashkit.cut_round(path, seed)
        report["cut_rounds"] += 1
        report["cuts"] += r["cut"]
        report["reopen_cuts"] += r["reopen_cut"]
        report["torn_writes"] += r["torn"]
        report["dropped_writes"] += r["dropped"]
        report["failures"] += [f"cut seed {seed}: {e}" for e in r["errors"]]
        _tick("cuts", report["cut_rounds"], args.cuts)


def _tick(what: str, done: int, total: int) -> None:
    if sys.stderr.isatty():
        sys.stderr.write(f"\r{what}: {done}/{total}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
