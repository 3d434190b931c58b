"""Shared pieces of the hardening tests: the CLI as a user types it, a server process,
and another local user (made with useradd when the tests run as root)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from thinstore import Pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K, M, G = 1 << 10, 1 << 20, 1 << 30
OTHER_USER = "tshardening"


def _env(extra=None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("THINSTORE_POOL", "THINSTORE_DEBUG")}
    env["PYTHONPATH"] = ROOT
    env.update(extra or {})
    return env


def _prefix(user: str | None) -> list[str]:
    if user is None:
        return []
    return ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"]


def _umask(mask):
    return None if mask is None else (lambda: os.umask(mask))


def ts(*args, pool=None, umask=None, user=None, stdin=None, input=None, env=None,
       timeout=120) -> subprocess.CompletedProcess:
    """``thinstore [--pool POOL] ARGS`` in a subprocess; text stdout/stderr."""
    pool_args = ["--pool", str(pool)] if pool is not None else []
    return subprocess.run([*_prefix(user), sys.executable, "-m", "thinstore", *pool_args,
                           *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=stdin, input=input, env=_env(env), timeout=timeout,
                          preexec_fn=_umask(umask))


def out(*args, **kw) -> str:
    """Run a command that must succeed; its stdout as text."""
    r = ts(*args, **kw)
    assert r.returncode == 0, (r.returncode, r.stderr.decode())
    return r.stdout.decode()


def fails(code: int, *args, **kw) -> str:
    """Run a command that must fail with ``code`` and one 'thinstore: ' line; that line."""
    r = ts(*args, **kw)
    err = r.stderr.decode()
    assert r.returncode == code, (r.returncode, err)
    assert err.startswith("thinstore: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


class Serve:
    """``thinstore --pool DIR serve ARGS`` in the background until stop()."""

    def __init__(self, pool, *args, umask=None, user=None):
        self.proc = subprocess.Popen(
            [*_prefix(user), sys.executable, "-m", "thinstore", "--pool", str(pool), "serve",
             *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(), preexec_fn=_umask(umask))
        self.lines = []
        while not any(line.startswith("control socket:") for line in self.lines):
            line = self.proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve exited: {self.proc.stderr.read()}")
            self.lines.append(line.strip())

    def stop(self) -> str:
        """SIGTERM, wait; the server's stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=30)
        err = self.proc.stderr.read()
        self.proc.stdout.close()
        self.proc.stderr.close()
        return err

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def short_dir(mode: int = 0o700) -> str:
    """A directory under /tmp (socket paths stay short), mode as given."""
    d = tempfile.mkdtemp(prefix="tshard", dir="/tmp")
    os.chmod(d, mode)
    return d


@contextlib.contextmanager
def small_pool(data: int = 0):
    """A pool of 64M (64K chunks) with volume v of 16M holding `data` bytes of 0x07 and
    its snapshot v@a, made in-process in a short_dir(); yields the pool's path."""
    d = short_dir()
    path = os.path.join(d, "pool")
    try:
        with Pool.create(path, 64 * M, 64 * K, commit_interval=0) as p:
            p.create_volume("v", 16 * M)
            if data:
                with p.open_device("v") as dev:
                    dev.pwrite(b"\x07" * data, 0)
            p.snapshot("v@a")
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


def other_user() -> pwd.struct_passwd:
    """A second local user: made with useradd when root, else the test is skipped."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second user (useradd) and run as it (setpriv)")
    for tool in ("useradd", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    try:
        return pwd.getpwnam(OTHER_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        OTHER_USER], check=True, capture_output=True)
        return pwd.getpwnam(OTHER_USER)
