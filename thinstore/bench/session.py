"""One ``thinstore bench``: pick the path, guard the data, run, add the counters.

``via="direct"`` opens the pool in this process and drives a Device with
``io_depth`` threads; ``via="nbd"`` goes through the pool's NBD server (the
running one, or one started for the run) with fio when it is installed and
the built-in client otherwise; ``via="auto"`` is nbd when a server holds the
pool (the pool cannot be opened twice) and direct when none does.
"""

from __future__ import annotations

import dataclasses
import os

from thinstore.bench import fio
from thinstore.bench.compare import compare_rounds
from thinstore.bench.progress import Ticker
from thinstore.bench.results import counters_delta
from thinstore.bench.target import bench_device, counters, served_pool
from thinstore.bench.threads import ThreadedRun
from thinstore.errors import PoolLocked, UsageError


@dataclasses.dataclass
class Options:
    device: str
    workload: object
    via: str = "auto"            # auto | direct | nbd
    client: str = "auto"         # auto | fio | builtin (for via nbd and --compare)
    force: bool = False
    in_place: bool = False
    compare: tuple = ()          # peer names (thinstore.bench.peers.PEERS)
    rounds: int = 3
    progress: bool = False       # draw the progress line (a terminal on stderr)


def run_bench(pool_dir: str, opts: Options) -> dict:
    """Run the benchmark ``opts`` asks for on the pool in ``pool_dir``; the result dict
    (:mod:`thinstore.bench.results`) plus ``device``, ``target``, ``via``,
    ``workload``, ``counters`` (pool counter deltas) and ``compare`` when asked."""
    from thinstore.control import RemotePool, socket_path

    served = os.path.exists(socket_path(pool_dir)) and _answers(RemotePool, pool_dir)
    via = opts.via if opts.via != "auto" else ("nbd" if served or opts.compare else "direct")
    if opts.compare and via != "nbd":
        raise UsageError("--compare measures every server over NBD: drop --via direct")
    if via == "direct" and served:
        raise PoolLocked(f"pool {pool_dir} is being served: bench it through the server "
                         "with --via nbd (or stop the server for --via direct)")
    runner = _run_direct if via == "direct" else _run_nbd
    result = runner(pool_dir, opts)
    result.update(device=opts.device, via=via, workload=opts.workload.to_dict())
    return result


def _answers(cls, pool_dir: str) -> bool:
    remote = cls.connect(pool_dir)
    if remote is None:
        return False
    remote.close()
    return True


def _run_direct(pool_dir: str, opts: Options) -> dict:
    from thinstore import Pool

    w = opts.workload
    with Pool.open(pool_dir) as pool, \
            bench_device(pool, opts.device, w.writes, opts.force, opts.in_place) as target:
        handle = pool.open_device(target)
        run = ThreadedRun(lambda: handle, handle.size, w, "direct", shared=True)
        before = counters(pool)
        with Ticker(opts.progress, f"bench {opts.device}", w, run.ops_done):
            result = run.run()
        result["counters"] = counters_delta(before, counters(pool))
        result["target"] = target
        return result


def _run_nbd(pool_dir: str, opts: Options) -> dict:
    w = opts.workload
    with served_pool(pool_dir) as (remote, socket, started), \
            bench_device(remote, opts.device, w.writes, opts.force, opts.in_place) as target:
        endpoint = Endpoint(socket, target)
        size = remote.info(target).size
        engine = _engine(opts.client, w)
        if opts.compare:
            result = compare_rounds(endpoint, size, w, engine, opts, remote)
        else:
            before = counters(remote)
            result = run_nbd(endpoint, size, w, engine, opts.progress,
                             f"bench {opts.device}", _server_ops(remote, target))
            result["counters"] = counters_delta(before, counters(remote))
        result.update(target=target, server="started" if started else "running")
        return result


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """An NBD export on a unix socket (``export`` "" for the default export)."""

    socket: str
    export: str

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.socket}"


def _engine(client: str, workload) -> str:
    if client == "fio":
        if not fio.available():
            raise UsageError("--client fio: fio is not installed")
        if workload.fua:
            raise UsageError("--client fio cannot ask for FUA on each write: use "
                             "--client builtin, or --sync every-1 (a flush per write)")
        return "fio"
    if client == "builtin":
        return "builtin"
    return "fio" if fio.can_run(workload) else "builtin"


def run_nbd(endpoint: Endpoint, size: int, workload, engine: str, progress: bool = False,
            label: str = "bench", ops_done=None) -> dict:
    """One run of ``workload`` against an NBD export with fio or the built-in client."""
    if engine == "fio":
        with Ticker(progress, label, workload, ops_done):
            return fio.run(endpoint.uri, workload, size)
    from thinstore.nbd.client import NBDDevice

    run = ThreadedRun(lambda: NBDDevice(endpoint.socket, endpoint.export), size, workload,
                      "builtin-client")
    with Ticker(progress, label, workload, run.ops_done):
        return run.run()


def _server_ops(remote, name: str):
    """Requests the server has completed on ``name`` so far (for fio's progress line)."""
    def ops() -> int:
        counts = remote.iostat()["devices"].get(name, {})
        return counts.get("read_ops", 0) + counts.get("write_ops", 0)
    return ops


def peer_endpoint(peer) -> Endpoint:
    """The Endpoint of a started peer (thinstore.bench.peers.Peer)."""
    return Endpoint(peer.socket, peer.export)
