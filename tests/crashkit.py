"""Crash rounds shared by the CI tests and the long soak (tools/crash_soak.py).

`kill_round`: a forked child runs a random workload on the pool and logs each
completed op; the parent SIGKILLs it at a random moment, replays the log into a
`Model`, reopens the pool and checks that it passes `check` and holds every byte
acknowledged before the last completed flush.

`cut_round`: the same in one process through the power-cut double (faultfs): the
pool's files lose a random part of their unsynced writes, some torn, at a random
I/O call, so crashes land inside commit and the intent log's appends too; one round
in three then cuts power again inside the reopen (the log's replay and its fold).
"""

from __future__ import annotations

import os
import random
import signal
import time
import traceback

from faultfs import FaultDisk, PowerCut
from workload import Model, kinds, last_logged, log_line, plan, run_op, snapshot_contents

from thinstore import Pool
from thinstore.check import check_path, check_pool

CHUNK = 4096
CAPACITY = 16 << 20


def new_pool(path: str) -> None:
    Pool.create(path, CAPACITY, CHUNK, commit_interval=0).close()


def state(path: str, fileio=None) -> tuple[dict, dict]:
    """(name -> kind, name -> content) of the pool at rest."""
    kw = {"fileio": fileio} if fileio else {}
    with Pool.open(path, commit_interval=0, **kw) as pool:
        return kinds(pool), snapshot_contents(pool)


def verify(path: str, model: Model, in_progress) -> list[str]:
    """Reopen after a crash: check clean, flushed bytes intact, and check clean on disk."""
    with Pool.open(path, commit_interval=0) as pool:
        errors = [f"check (open pool): {p}" for p in check_pool(pool)]
        errors += model.verify(pool, in_progress)
    report = check_path(path)
    errors += [f"check: {p}" for p in report.problems]
    return errors


def _replay(seed: int, devs: dict, contents: dict, n: int, last: int):
    model = Model(contents)
    in_progress = None
    for op in plan(seed, devs, n):
        if op[0] > last:
            in_progress = op
            break
        model.apply(seed, op)
    return model, in_progress


def kill_round(path: str, seed: int, max_delay: float = 0.12, n_ops: int = 3000) -> dict:
    devs, contents = state(path)
    log = os.path.join(path, f"ops.{seed}.log")
    pid = os.fork()
    if pid == 0:                                   # the child: never returns
        _child(path, seed, devs, log, n_ops)
    time.sleep(random.Random(seed).uniform(0.0, max_delay))
    killed = True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        killed = False
    _, status = os.waitpid(pid, 0)
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) != 0:
        try:
            with open(log + ".err") as f:
                why = f.read()
        except FileNotFoundError:
            why = "(no traceback)"
        raise AssertionError(f"workload child {pid} of {os.getpid()} failed (seed {seed}, "
                             f"status {os.WEXITSTATUS(status)}):\n{why}")
    last = last_logged(log)
    if os.path.exists(log):
        os.unlink(log)
    model, in_progress = _replay(seed, devs, contents, n_ops, last)
    errors = verify(path, model, in_progress)
    return {"killed": killed and os.WIFSIGNALED(status), "ops_done": last + 1,
            "errors": errors, "seed": seed}


def _child(path: str, seed: int, devs: dict, log: str, n_ops: int) -> None:
    code = 0
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        pool = Pool.open(path, commit_interval=0.02)
        for op in plan(seed, devs, n_ops):
            run_op(pool, seed, op)
            log_line(fd, op[0])
        pool.close()
    except BaseException:
        with open(log + ".err", "w") as f:
            f.write(traceback.format_exc())
        code = 1
    finally:
        os._exit(code)


def cut_round(path: str, seed: int, n_ops: int = 400) -> dict:
    """One simulated power cut at a random I/O call of a random workload."""
    rng = random.Random(seed)
    devs, contents = state(path)
    disk = FaultDisk(seed, crash_after=rng.randint(1, 1500))
    model = Model(contents)
    in_progress, pool, cut = None, None, False
    try:
        pool = Pool.open(path, commit_interval=0, fileio=disk.open)
        for op in plan(seed, devs, n_ops):
            in_progress = op
            run_op(pool, seed, op)
            model.apply(seed, op)
            in_progress = None
    except PowerCut:
        cut = True
    finally:
        if pool is not None:
            _abandon(pool)
    disk.power_cut()
    reopen_cut = _cut_reopen(path, rng) if seed % 3 == 0 else False
    errors = verify(path, model, in_progress)
    return {"cut": cut, "errors": errors, "seed": seed, "torn": disk.torn,
            "dropped": disk.dropped, "reopen_cut": reopen_cut}


def _cut_reopen(path: str, rng: random.Random) -> bool:
    """Reopen through a fresh double that cuts power within the open's first I/O calls:
    in the intent log's replay or the commit that folds it (or the re-checksumming
    before them). True when the cut landed inside the open."""
    disk = FaultDisk(rng.randrange(1 << 30), crash_after=rng.randint(1, 40))
    try:
        pool = Pool.open(path, commit_interval=0, fileio=disk.open)
    except PowerCut:
        disk.power_cut()
        return True
    _abandon(pool)
    disk.power_cut()
    return False


def _abandon(pool) -> None:
    """Drop a pool object without committing (the machine is off): release its lock."""
    pool._closed = True
    pool._stop.set()
    try:
        os.close(pool._lockfd)
    except OSError:
        pass
