"""``thinstore bench``: throughput and latency of one device, for users.

Like ``rbd bench`` and ``qemu-img bench``: a workload (type, size, pattern,
depth, how long), run in-process or through the NBD server, printed as IOPS,
throughput, latency percentiles and the pool's counters for the run;
``--compare`` runs the same workload on qemu-nbd and nbdkit too, interleaved,
and prints ratios; ``--report`` draws it (docs/bench.md).
"""

from __future__ import annotations

import sys

from thinstore.cli.names import device_name
from thinstore.cli.output import print_json, print_table
from thinstore.units import format_size, parse_size


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="measure a device's IOPS, throughput and latency",
        description="Benchmark one device. A write benchmark runs on a fresh clone of the "
        "device (destroyed afterwards) unless --in-place; on a snapshot only reads run.")
    p.add_argument("device", type=device_name, metavar="DEVICE",
                   help="a volume, clone or snapshot (NAME@SNAP: reads only)")
    p.add_argument("--io-type", choices=("read", "write", "readwrite"), default="read",
                   help="read (default), write, or half each")
    p.add_argument("--io-size", type=parse_size, default=4096, metavar="SIZE",
                   help="bytes per request (default 4K)")
    p.add_argument("--io-pattern", choices=("rand", "seq"), default="rand",
                   help="random offsets (default) or one sequential stream")
    p.add_argument("--io-depth", type=int, default=16, metavar="N",
                   help="requests in flight (default 16)")
    stop = p.add_mutually_exclusive_group()
    stop.add_argument("--io-total", type=parse_size, metavar="SIZE",
                      help="stop after this many bytes")
    stop.add_argument("--time", metavar="DURATION",
                      help="stop after this long, e.g. 30s, 500ms (default 10s)")
    p.add_argument("--ramp", metavar="DURATION",
                   help="run the workload this long first, unmeasured (warm-up), e.g. 5s")
    p.add_argument("--sync", default="none", metavar="none|fua|every-N",
                   help="no flushes (default), FUA on every write, or a flush every N writes")
    p.add_argument("--via", choices=("auto", "direct", "nbd"), default="auto",
                   help="direct: in this process; nbd: through the NBD server (the running "
                   "one, else one started for the run); auto (default): nbd if served")
    p.add_argument("--client", choices=("auto", "fio", "builtin"), default="auto",
                   help="NBD load generator: fio when installed (auto), or the built-in one")
    p.add_argument("--force", action="store_true",
                   help="write-bench a device even while NBD clients have it open")
    p.add_argument("--in-place", action="store_true",
                   help="write the device itself instead of a clone (its data is overwritten)")
    p.add_argument("--compare", metavar="PEER[,PEER]",
                   help="also run on qemu-nbd and/or nbdkit serving a copy, interleaved")
    p.add_argument("--rounds", type=int, default=3, metavar="N",
                   help="interleaved rounds with --compare (default 3)")
    p.add_argument("--report", metavar="FILE", help="draw the run to FILE.html, .svg or .png "
                   "(needs matplotlib: pip install 'thinstore[report]')")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from thinstore.bench.peers import parse_peers
    from thinstore.bench.session import Options, run_bench
    from thinstore.bench.workload import Workload, parse_duration
    from thinstore.cli.context import pool_path
    from thinstore.errors import UsageError

    if args.rounds < 1:
        raise UsageError("--rounds must be at least 1")
    seconds = parse_duration(args.time) if args.time else None if args.io_total else 10.0
    workload = Workload(args.io_type, args.io_size, args.io_pattern, args.io_depth,
                        args.io_total, seconds, args.sync,
                        parse_duration(args.ramp) if args.ramp else 0.0)
    if args.report:
        from thinstore.bench.report import check_report_path
        check_report_path(args.report)
    opts = Options(args.device, workload, args.via, args.client, args.force, args.in_place,
                   tuple(parse_peers(args.compare)) if args.compare else (), args.rounds,
                   progress=_terminal(sys.stderr))
    result = run_bench(pool_path(args), opts)
    if args.report:
        from thinstore.bench.report import write_report
        write_report(result, args.report)
    if args.json:
        print_json(result)
    else:
        print_result(result)
    return 0


def _terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def print_result(result: dict) -> None:
    """The plain text summary (no plotting library needed)."""
    from thinstore.bench.workload import Workload

    w = Workload(**result["workload"])
    where = result["target"] if result["target"] == result["device"] else \
        f"{result['target']} (a clone of {result['device']}, destroyed after)"
    print(f"bench {where}: {w.describe()}, via {result['via']} ({result['engine']}), "
          f"{result['elapsed_s']:.2f}s")
    rows = [_row(kind, result[kind]) for kind in ("read", "write", "total")
            if result[kind]["ops"] or kind == "total"]
    print_table(["", "OPS", "IOPS", "BYTES", "BYTES/S", "MEAN", "P50", "P99", "P99.9"], rows,
                right=set(range(1, 9)))
    flushes = result["flushes"]
    if flushes["ops"]:
        print(f"flushes: {flushes['ops']}, mean {_us(flushes['latency_us']['mean'])}, "
              f"p99 {_us(flushes['latency_us']['p99'])}")
    changed = {k: v for k, v in result.get("counters", {}).items() if v}
    if result.get("counters") is not None:
        print("pool counters: " + ("  ".join(f"{k} +{v}" for k, v in changed.items())
                                   or "no change"))
    if "compare" in result:
        _print_compare(result["compare"])


def _row(kind: str, side: dict) -> list[str]:
    lat = side["latency_us"]
    return [kind, str(side["ops"]), f"{side['iops']:.0f}", format_size(side["bytes"]),
            format_size(int(side["bytes_per_s"])) + "/s",
            *(_us(lat[k]) for k in ("mean", "p50", "p99", "p99.9"))]


def _us(value) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}ms" if value >= 10000 else f"{value:.0f}us"


def _print_compare(compare: dict) -> None:
    from thinstore.bench.compare import median_run

    print(f"compare: median IOPS of {compare['rounds']} interleaved round(s)")
    rows = []
    for name, runs in compare["servers"].items():
        ratio = compare["ratios"].get(name)
        lat = median_run(runs)["total"]["latency_us"]
        rows.append([name, f"{compare['median_iops'][name]:.0f}",
                     " ".join(f"{r['total']['iops']:.0f}" for r in runs),
                     _us(lat["p50"]), _us(lat["p99"]),
                     "-" if name == "thinstore" else
                     (f"{ratio:.2f}x" if ratio is not None else "-")])
    print_table(["SERVER", "IOPS", "ROUNDS", "P50", "P99", "THINSTORE/SERVER"], rows,
                right={1, 3, 4, 5})
    print("(P50, P99: of each server's median round)")
