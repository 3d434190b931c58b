#!/usr/bin/env python3
"""NBD kill soak: SIGKILL a real `thinstore serve` under NBD clients, then verify.

    python tools/nbd_crash_soak.py --kills 300 [--dir /tmp/soak] [--seed 0] [--json]

Each round starts `python -m thinstore --pool P serve --socket S` (the native request
loop answers FLUSH and FUA itself where it can), connects two to four NBD clients to
its exports (two or more on one export, others on another), each running one
workload (QD1 write+FLUSH, QD1 FUA, QD16 bursts with a FLUSH, QD16 FUA bursts; 512 B
to 1 MiB; TRIM and WRITE_ZEROES mixed in; writes that copy shared chunks and writes
that allocate), kills the server with SIGKILL at a random moment, runs `thinstore
check` (must exit 0) and reads every export back: every write acknowledged before
a completed FLUSH, and every acknowledged FUA write, must read back (the exact rule
is in tests/nbdsoak.py). The pool is kept across rounds. Exit status 0 when every
round passed; failures name the round's seed (the pool carries over from the rounds
before, so a failure reproduces by timing, not exactly).
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

import nbdsoak  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=300, help="rounds, one SIGKILL each (default 300)")
    ap.add_argument("--dir", help="work directory (default: a temporary one)")
    ap.add_argument("--seed", type=int, default=0, help="first round's seed")
    ap.add_argument("--unsafe", choices=sorted(nbdsoak.UNSAFE),
                    help="negative control: 'nolog', a server that answers FLUSH and FUA "
                         "without logging them; 'loop-records', one whose native loop "
                         "appends records replay refuses (the soak must then fail)")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    logging.getLogger("thinstore").setLevel(logging.ERROR)   # recovery notes are expected
    work = args.dir or tempfile.mkdtemp(prefix="tsnbdkill", dir="/tmp")  # short socket paths
    os.makedirs(work, exist_ok=True)
    t0 = time.monotonic()
    report = nbdsoak.soak(os.path.join(work, "pool"), args.kills, args.seed, args.unsafe,
                          tick=_tick(args.kills))
    report["seconds"] = round(time.monotonic() - t0, 1)
    report["dir"] = work
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"rounds: {report['rounds']}, kills delivered: {report['kills']}")
        print(f"requests sent: {report['ops']}, answered: {report['acked']}, "
              f"FLUSHes answered: {report['flushes']}")
        print("connections by workload: " + ", ".join(f"{k} {v}" for k, v in
                                                     report["patterns"].items()))
        if report["server"]:
            print("server counters (iostat just before the kill, rounds that asked): " +
                  ", ".join(f"{k} {v}" for k, v in report["server"].items()))
        print(f"failures: {len(report['failures'])}  ({report['seconds']} s, pool in {work})")
        for f in report["failures"][:20]:
            print("  " + f)
    return 1 if report["failures"] or report["kills"] < args.kills else 0


def _tick(total: int):
    def tick(report: dict) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\rrounds: {report['rounds']}/{total}, "
                             f"failures: {len(report['failures'])}")
            if report["rounds"] >= total:
                sys.stderr.write("\n")
            sys.stderr.flush()
    return tick


if __name__ == "__main__":
    sys.exit(main())
