"""Pieces of the online tests: a `thinstore serve` process, fio writing through it.

The server is a real subprocess (the CLI finds it by its control socket, as a user's
would), so killing it is a real crash; fio writes with its nbd engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from thinstore.control import RemotePool
from nbd_helpers import ROOT, short_tmpdir, uri

STALL_NS = 1_000_000_000        # the longest a client request may take: 1 s


def env() -> dict:
    return dict(os.environ, PYTHONPATH=ROOT)


def ts(pool: str, *args: str, check: bool = True, stdin=None, stdout=None,
       timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the CLI on `pool`; output captured as bytes unless stdin/stdout are given."""
    proc = subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, *args],
                          stdin=stdin, stdout=stdout if stdout is not None else subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, env=env())
    if check:
        assert proc.returncode == 0, (args, proc.returncode, proc.stderr.decode())
    return proc


def pipe(pool_a: str, args_a, pool_b: str, args_b, timeout: float = 120):
    """`thinstore --pool A ARGS_A | thinstore --pool B ARGS_B`: (rc_a, rc_b, stderr)."""
    cmd = [sys.executable, "-m", "thinstore", "--pool"]
    left = subprocess.Popen(cmd + [pool_a, *args_a], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env())
    right = subprocess.Popen(cmd + [pool_b, *args_b], stdin=left.stdout,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env())
    left.stdout.close()
    _, err_b = right.communicate(timeout=timeout)
    _, err_a = left.communicate(timeout=timeout)
    return left.returncode, right.returncode, err_a.decode() + err_b.decode()


class Server:
    """`thinstore serve` on a pool, in its own process."""

    def __init__(self, pool: str, *extra: str):
        self.pool = pool
        self.dir = short_tmpdir()
        self.sock = os.path.join(self.dir, "nbd.sock")
        self.log = open(os.path.join(self.dir, "serve.log"), "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinstore", "--pool", pool, "serve", "--socket",
             self.sock, *extra], stdout=self.log, stderr=subprocess.STDOUT, env=env())
        for _ in range(1200):       # serving once its control socket answers (bounded: 60 s)
            remote = RemotePool.connect(pool)
            if remote is not None:
                remote.close()
                return
            assert self.proc.poll() is None, self.output()
            time.sleep(0.05)
        raise AssertionError("the server did not start: " + self.output())

    def uri(self, name: str) -> str:
        return uri(self.sock, name)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        """SIGTERM: finish requests, commit, release the pool."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            assert self.proc.wait(60) == 0, self.output()
        self.log.close()

    def kill(self) -> None:
        """SIGKILL: a crash."""
        self.proc.kill()
        self.proc.wait(30)
        self.log.close()


class Fio:
    """fio writing to an export the whole time, until stop(); then its verdict."""

    def __init__(self, uri: str, size: int, rate: str | None = "8m", bs: str = "64k",
                 rw: str = "randwrite", runtime: int = 120):
        args = ["fio", "--output-format=json", "--name=w", "--ioengine=nbd", f"--uri={uri}",
                f"--rw={rw}", f"--bs={bs}", "--iodepth=4", f"--size={size}",
                "--time_based", f"--runtime={runtime}", "--randrepeat=0"]
        if rate:
            args.append(f"--rate={rate}")
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        time.sleep(0.5)             # connected and writing before the test goes on
        assert self.proc.poll() is None, self.proc.communicate()

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> dict:
        """Stop fio (SIGINT: it ends its jobs and reports); its one job's report."""
        assert self.running(), "fio ended before the test was done with it"
        self.proc.send_signal(signal.SIGINT)
        out, err = self.proc.communicate(timeout=60)
        # fio 3.33 with the nbd engine exits 128 after SIGINT; errors are in the report
        assert self.proc.returncode in (0, 128), err[-2000:]
        job = json.loads(out[out.index("{"):])["jobs"][0]
        return job


def fio_ok(job: dict) -> tuple[int, int, int]:
    """(error, bytes written, slowest write in ns) of a fio job report."""
    w = job["write"]
    return job["error"], w["io_bytes"], w["lat_ns"]["max"]
