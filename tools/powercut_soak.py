#!/usr/bin/env python3
"""Long power-cut soak of the native intent-log writer, through the kernel block layer.

    python tools/powercut_soak.py --cuts 1000 [--per-run 50] [--replay-cuts 15]
                                  [--seed 0] [--unsafe nodsync|nowait] [--cache random|lose]
                                  [--keep DIR] [--json]

Runs rounds of tests/powercut.py until --cuts crash images have been checked: each
round records one native workload on ext4 / loop / nbdfuse / blockrec (the log writer
alternating between Linux AIO and its writer thread; two rounds of four through the
Pool/Device API, two through ``thinstore serve`` and NBD clients, where the native
request loop appends its own records), checks up to --per-run cuts of
it and --replay-cuts more inside the replay of one of its crash images (those count
towards --cuts too). Needs root, /dev/fuse, loop devices, nbdfuse. Exit status 0
when no cut lost an acknowledged write and every `check` was clean; --unsafe runs the
negative control (then failures are expected, and the exit status is 0 only if some
were found).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ["PYTHONPATH"] = os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])

import powercut  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cuts", type=int, default=1000, help="crash images to check (default 1000)")
    ap.add_argument("--per-run", type=int, default=50, help="cuts per recorded workload")
    ap.add_argument("--replay-cuts", type=int, default=15,
                    help="cuts inside one replay per workload")
    ap.add_argument("--ops", type=int, default=200, help="operations per workload thread")
    ap.add_argument("--nbd-seconds", type=float, default=3.0,
                    help="how long the NBD rounds' clients write")
    ap.add_argument("--seed", type=int, default=0, help="first seed")
    ap.add_argument("--unsafe", choices=["nodsync", "nowait"],
                    help="run a negative control (tests/powercut_workload.py UNSAFE)")
    ap.add_argument("--cache", choices=["random", "lose"], default="random",
                    help="the writes after each image's last FLUSH: each kept, dropped or "
                         "torn at random (default), or all lost")
    ap.add_argument("--keep", metavar="DIR",
                    help="save each failing crash image (before mounting) and its journal")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    logging.getLogger("thinstore").setLevel(logging.ERROR)   # recovery notes are expected
    total = {"cuts": 0, "replay_cuts": 0, "runs": 0, "cuts_with_log_replay": 0,
             "log_records": 0, "nbd_loop_records": 0, "direct_writes": 0, "commits": 0,
             "flushes_seen_by_disk": 0, "cuts_losing": {}, "replay_cuts_losing": {},
             "failures": []}
    t0 = time.monotonic()
    seed = args.seed
    while total["cuts"] + total["replay_cuts"] < args.cuts:
        _round(args, seed, total)
        seed += 1
    total["seconds"] = round(time.monotonic() - t0, 1)
    print(json.dumps(total, indent=1) if args.json else _summary(total))
    if args.unsafe:
        return 0 if total["failures"] else 1
    return 1 if total["failures"] else 0


def _round(args, seed: int, total: dict) -> None:
    left = args.cuts - total["cuts"] - total["replay_cuts"]
    work = tempfile.mkdtemp(prefix="tspcsoak", dir="/tmp")
    mode = ("aio", "thread")[seed % 2]
    nbd = args.nbd_seconds if seed % 4 >= 2 else 0
    try:
        r = powercut.powercut_run(work, seed, args.ops, min(args.per_run, left),
                                  min(args.replay_cuts, max(0, left - args.per_run)),
                                  mode=mode, unsafe=args.unsafe, nbd_seconds=nbd,
                                  keep=args.keep, cache=args.cache)
    finally:
        powercut.cleanup(work)
    wl = r["workload"]
    total["runs"] += 1
    total["cuts"] += r["cuts"]
    total["cuts_with_log_replay"] += r["replayed_cuts"]
    total["log_records"] += wl["log"]["records"]
    total["direct_writes"] += wl["log"]["direct"]
    total["commits"] += wl["commits"]
    total["flushes_seen_by_disk"] += r["disk"]["flushes"]
    mode += " nbd" if nbd else " api"
    total["nbd_loop_records"] += wl["log"].get("loop_records", 0)
    for name, k in r["cuts_losing"].items():
        total["cuts_losing"][name] = total["cuts_losing"].get(name, 0) + k
    fails = [f"seed {seed} ({mode}) cut {c}: {m[0]}" for c, m in r["failures"].items()]
    if r["replay"]:
        total["replay_cuts"] += r["replay"]["cuts"]
        for name, k in r["replay"]["cuts_losing"].items():
            total["replay_cuts_losing"][name] = total["replay_cuts_losing"].get(name, 0) + k
        fails += [f"seed {seed} ({mode}) replay cut {c}: {m[0]}"
                  for c, m in r["replay"]["failures"].items()]
    total["failures"] += fails
    print(f"seed {seed} ({mode}): {r['cuts']} cuts, "
          f"{r['replay']['cuts'] if r['replay'] else 0} in replay, {len(fails)} failed",
          file=sys.stderr)


def _summary(t: dict) -> str:
    lines = [f"{t['cuts'] + t['replay_cuts']} cuts ({t['replay_cuts']} inside replay) over "
             f"{t['runs']} recorded workloads in {t['seconds']} s: {len(t['failures'])} failed",
             f"  {t['cuts_with_log_replay']} crash images had log records to replay; the "
             f"workloads wrote {t['log_records']} records ({t['nbd_loop_records']} by the NBD "
             f"loop itself; {t['direct_writes']} O_DIRECT|O_DSYNC writes), made "
             f"{t['commits']} full commits; the disk saw {t['flushes_seen_by_disk']} FLUSHes",
             "  cuts that dropped or tore a write to the pool's log / meta / data / ext4's "
             "own blocks: " + _files(t["cuts_losing"]) + "; of the cuts inside replay: "
             + _files(t["replay_cuts_losing"])]
    lines += [f"  {f}" for f in t["failures"][:20]]
    return "\n".join(lines)


def _files(losing: dict) -> str:
    return " / ".join(str(losing.get(k, 0)) for k in ("log", "meta", "data", "ext4"))


if __name__ == "__main__":
    sys.exit(main())
