"""``thinstore iostat``: live per-device I/O of the serving process.

Like ``zpool iostat -v`` and ``rbd perf image iostat``: the NBD server counts
each export's requests (thinstore/nbd/stats.py); this command reads the
counters over the control socket and prints rates.  Without INTERVAL, one
report averaged over the server's uptime; with it, the first report covers
the uptime and each later one the INTERVAL seconds before it, COUNT times
(forever without COUNT), a last row ``(all)`` summing the devices shown.
``--json`` prints one JSON object per report, one per line, with the counts of
the period as well as the rates.
"""

from __future__ import annotations

import json
import sys
import time

from thinstore.cli.names import device_name
from thinstore.cli.output import print_table
from thinstore.errors import ThinstoreError, UsageError
from thinstore.units import format_size

DIRECTIONS = ("read", "write")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "iostat", help="live per-device I/O rates of the running server",
        description="Per-device read/write IOPS, bytes, latency and flushes, as counted by "
        "the running 'thinstore serve' (read over its control socket).")
    p.add_argument("operands", nargs="*", metavar="[DEVICE...] [INTERVAL [COUNT]]",
                   help="devices to show (default all); seconds between reports; how many")
    p.add_argument("--json", action="store_true", help="one JSON object per report and line")
    p.set_defaults(func=cmd_iostat)


def split_operands(operands: list[str]) -> tuple[list[str], float | None, int | None]:
    """``vm1 vm2 2 5`` -> (["vm1", "vm2"], 2.0, 5): trailing numbers are INTERVAL, COUNT."""
    numbers = []
    rest = list(operands)
    while rest and len(numbers) < 2 and _is_number(rest[-1]):
        numbers.insert(0, rest.pop())
    interval = float(numbers[0]) if numbers else None
    count = None
    if len(numbers) == 2:
        if not float(numbers[1]).is_integer() or float(numbers[1]) < 1:
            raise UsageError(f"invalid COUNT {numbers[1]!r}: a whole number >= 1")
        count = int(float(numbers[1]))
    if interval is not None and interval <= 0:
        raise UsageError(f"invalid INTERVAL {numbers[0]!r}: seconds > 0")
    return [device_name(name) for name in rest], interval, count


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def cmd_iostat(args) -> int:
    from thinstore.cli.context import pool_path

    names, interval, count = split_operands(args.operands)
    path = pool_path(args)
    from thinstore.cli.context import connect
    remote = connect(path)
    if remote is None:
        from thinstore.errors import PoolNotFound
        from thinstore.storage import open_store
        if not open_store(path).exists():      # as every other command says it (exit 9)
            raise PoolNotFound(f"no thinstore pool at {path} (run 'thinstore init' first)")
        raise ThinstoreError(f"no server is serving pool {path}: iostat reads the counters "
                             "of a running 'thinstore serve' (through its control socket)")
    with remote:
        for name in names:
            remote.info(name)              # NoSuchDevice (exit 3) for a name that is not there
        previous = None
        shown = 0
        while True:
            sample = remote.iostat()
            report = make_report(sample, previous, names or [d.name for d in remote.list()])
            show(report, args.json)
            shown += 1
            if interval is None or (count is not None and shown >= count):
                return 0
            previous = sample
            time.sleep(interval)


def make_report(sample: dict, previous: dict | None, names: list[str]) -> dict:
    """Counts and rates per device over the period since ``previous`` (or the uptime)."""
    period = sample["uptime_s"] - (previous["uptime_s"] if previous else 0)
    period = max(period or 0, 1e-9)
    old = previous["devices"] if previous else {}
    devices = {name: _device(sample["devices"].get(name, {}), old.get(name, {}), period)
               for name in names}
    pool_old = previous["pool"] if previous else {}
    pool = {k: v if k.endswith("_max") else v - pool_old.get(k, 0)   # a maximum is since start
            for k, v in sample.get("pool", {}).items() if isinstance(v, (int, float))}
    log_old = previous.get("log", {}) if previous else {}
    log = {k: v if k.endswith("_now") else v - log_old.get(k, 0)   # a gauge is as it is
           for k, v in sample.get("log", {}).items() if isinstance(v, (int, float))}
    return {"interval_s": period, "uptime_s": sample["uptime_s"], "devices": devices,
            "pool": pool, "log": log}


def _device(now: dict, before: dict, period: float) -> dict:
    d = {k: now.get(k, 0) - before.get(k, 0) for k in
         ("read_ops", "read_bytes", "read_ns", "read_timed", "write_ops", "write_bytes",
          "write_ns", "write_timed", "flush_ops", "flush_ns", "other_ops", "errors")}
    out = {k: v for k, v in d.items() if not k.endswith(("_ns", "_timed"))}
    out["connections"] = now.get("connections", 0)
    for kind in DIRECTIONS:
        out[f"{kind}_iops"] = d[f"{kind}_ops"] / period
        out[f"{kind}_bytes_per_s"] = d[f"{kind}_bytes"] / period
        timed = d[f"{kind}_timed"]
        out[f"{kind}_latency_us"] = d[f"{kind}_ns"] / timed / 1000 if timed else None
    out["flushes_per_s"] = d["flush_ops"] / period
    out["flush_latency_us"] = d["flush_ns"] / d["flush_ops"] / 1000 if d["flush_ops"] else None
    return out


def show(report: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, sort_keys=True))
    else:
        rows = [_row(name, d) for name, d in report["devices"].items()]
        if len(rows) > 1:
            rows.append(_row("(all)", _sum(report["devices"].values())))
        print(f"over {report['interval_s']:.1f}s")
        print_table(["DEVICE", "CONN", "READ/S", "WRITE/S", "RBYTES/S", "WBYTES/S",
                     "RLAT", "WLAT", "FLUSH/S"], rows, right=set(range(1, 9)))
        for line in (commit_line(report["pool"]), log_line(report.get("log", {}))):
            if line:
                print(line)
        print()
    sys.stdout.flush()


def commit_line(pool: dict) -> str | None:
    """The commits of the period and how long they held the pool lock (every request
    waits behind it), as ZFS's txgs kstat gives each transaction group's sync time:
    ``commits 2, lock held 3.1 ms mean (tree 0.4, data fsync 1.9, meta fsync 0.3,
    superblock 0.5), longest 4.0 ms since start``."""
    n = pool.get("commits")
    if not n or "commit_hold_us" not in pool:
        return None
    parts = ", ".join(f"{label} {pool.get(f'commit_{key}_us', 0) / n / 1000:.1f}"
                      for key, label in (("tree", "tree"), ("data_sync", "data fsync"),
                                         ("meta_sync", "meta fsync"),
                                         ("superblock", "superblock")))
    return (f"commits {n}, lock held {pool['commit_hold_us'] / n / 1000:.1f} ms mean "
            f"({parts}), longest {pool.get('commit_hold_us_max', 0) / 1000:.1f} ms since start")


def log_line(log: dict) -> str | None:
    """The intent log's work in the period (docs/integrity.md; the ZIL's counterpart is
    zil_commit_count in /proc/spl/kstat/zfs/zil): ``intent log 120 records (3.2 MiB),
    98 by the NBD loop, 120 syncs (120 direct), 0 flushes made full commits, file
    4M of at most 64M``; the file's size and its cap (synclog.py, logroom.py:
    the cap follows the host file system's free space; "log off" when it is too
    tight for one). None when the log did nothing in the period (as the commit line:
    an idle pool prints its table alone)."""
    if not any(v for k, v in log.items() if not k.endswith("_now")):
        return None
    line = (f"intent log {log.get('records', 0)} records "
            f"({format_size(int(log.get('record_bytes', 0)))}), "
            f"{log.get('loop_records', 0)} by the NBD loop, {log.get('syncs', 0)} syncs "
            f"({log.get('direct', 0)} direct), "
            f"{log.get('commits_instead', 0)} flushes made full commits")
    if "cap_now" not in log:
        return line
    if not log["cap_now"]:
        return f"{line}, log off (host file system too small or too full for it)"
    return (f"{line}, file {format_size(int(log.get('size_now', 0)))} of at most "
            f"{format_size(int(log['cap_now']))}")


def _sum(devices) -> dict:
    """The shown devices together (their latency weighted by their requests)."""
    devices = list(devices)
    out = {k: sum(d[k] for d in devices) for k in ("connections", "read_iops", "write_iops",
                                                   "read_bytes_per_s", "write_bytes_per_s",
                                                   "flushes_per_s")}
    for kind in DIRECTIONS:
        timed = [(d[f"{kind}_latency_us"], d[f"{kind}_ops"]) for d in devices
                 if d[f"{kind}_latency_us"] is not None and d[f"{kind}_ops"]]
        ops = sum(n for _, n in timed)
        out[f"{kind}_latency_us"] = sum(v * n for v, n in timed) / ops if ops else None
    return out


def _row(name: str, d: dict) -> list[str]:
    return [name, str(d["connections"]), f"{d['read_iops']:.0f}", f"{d['write_iops']:.0f}",
            format_size(int(d["read_bytes_per_s"])), format_size(int(d["write_bytes_per_s"])),
            _us(d["read_latency_us"]), _us(d["write_latency_us"]), f"{d['flushes_per_s']:.0f}"]


def _us(value) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f}ms" if value >= 10000 else f"{value:.0f}us"
