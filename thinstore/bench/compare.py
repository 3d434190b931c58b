"""``bench --compare``: the same workload on thinstore and its peers, interleaved.

The device's content is copied once to a sparse raw file; each peer serves it
(:mod:`thinstore.bench.peers`).  Every round runs the workload once on every
server, the order rotating from round to round so that none always runs first
(right after another's writeback, or on a cold cache).  The figures are the
medians over rounds and thinstore's ratio to each peer: a ratio measured on
one machine in one run means more than any absolute number.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile

from thinstore.bench import peers as P


def compare_rounds(endpoint, size: int, workload, engine: str, opts, remote) -> dict:
    """Run ``opts.rounds`` interleaved rounds; thinstore's median round is the result,
    with ``compare`` = {"rounds", "servers": {name: [run, ...]}, "median_iops",
    "ratios": {peer: thinstore / peer}}."""
    from thinstore.bench.session import peer_endpoint, run_nbd
    from thinstore.bench.target import counters
    from thinstore.bench.results import counters_delta
    from thinstore.nbd.client import NBDDevice

    work = tempfile.mkdtemp(prefix="tscmp", dir="/var/tmp")
    running: list[P.Peer] = []
    try:
        raw = f"{work}/device.raw"
        with NBDDevice(endpoint.socket, endpoint.export) as handle:
            P.raw_copy(handle, size, raw)
        running = [P.start(name, work, raw) for name in opts.compare]
        servers = {"thinstore": endpoint, **{p.name: peer_endpoint(p) for p in running}}
        runs = {name: [] for name in servers}
        before = counters(remote)
        names = list(servers)
        for r in range(opts.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                label = f"round {r + 1}/{opts.rounds} {name}"
                runs[name].append(run_nbd(servers[name], size, workload, engine,
                                          opts.progress, label))
        delta = counters_delta(before, counters(remote))
    finally:
        for peer in running:
            peer.stop()
        shutil.rmtree(work, ignore_errors=True)
    result = dict(median_run(runs["thinstore"]))
    result["counters"] = delta
    result["compare"] = summary(runs, opts.rounds)
    return result


def summary(runs: dict, rounds: int) -> dict:
    median = {name: statistics.median(r["total"]["iops"] for r in rs) for name, rs in runs.items()}
    base = median["thinstore"]
    return {"rounds": rounds, "servers": runs, "median_iops": median,
            "ratios": {name: (base / v if v else None) for name, v in median.items()
                       if name != "thinstore"}}


def median_run(runs: list) -> dict:
    """The run with the median IOPS (the lower of the middle two for an even count)."""
    ordered = sorted(runs, key=lambda r: r["total"]["iops"])
    return ordered[(len(ordered) - 1) // 2]
