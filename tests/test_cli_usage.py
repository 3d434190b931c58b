"""Usage errors of a command read like every other error, and --wait is kept to.

Session 9's trial: 'create -x' said only that --size was missing, an unknown option after a
command came back with thinstore's usage rather than the command's, and '--wait 0.5'
against a stopped server took about 15 s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(pool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, *args],
                          capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=ROOT))


@pytest.fixture
def pool():
    where = tempfile.mkdtemp(prefix="tsuse", dir="/tmp")    # short: unix socket paths
    path = os.path.join(where, "pool")
    assert cli(path, "init", "--capacity", "64M").returncode == 0
    yield path
    subprocess.run(["rm", "-rf", where])


def usage_error(pool: str, *args: str) -> tuple[str, str]:
    """(the error line, the usage that follows it) of a command refused as usage, exit 2."""
    done = cli(pool, *args)
    assert done.returncode == 2, (args, done.returncode, done.stderr)
    error, _, usage = done.stderr.partition("\n")
    assert error.startswith("thinstore: ") and usage.startswith("usage: thinstore"), \
        done.stderr
    return error, usage


@pytest.mark.parametrize("args, unknown", [
    (["create", "-x", "--size", "1G"], "-x"),      # was: "--size is required"
    (["create", "-x"], "-x"),                      # was: "NAME, --size are required"
    (["create", "vm", "--size", "1G", "--bogus"], "--bogus"),
    (["list", "--bogus"], "--bogus"),
])
def test_an_unknown_option_is_named_with_its_command_before_anything_missing(pool, args,
                                                                            unknown):
    error, usage = usage_error(pool, *args)
    command = args[0]
    assert error.startswith(f"thinstore: {command}: unknown option '{unknown}'"), error
    assert f"see 'thinstore {command} --help'" in error, error
    assert usage.startswith(f"usage: thinstore {command} "), usage
    assert "vm" not in cli(pool, "list").stdout                 # nothing was made


def test_a_name_that_starts_with_a_dash_is_told_how_to_pass(pool):
    error, _ = usage_error(pool, "destroy", "-old")
    assert "'--'" in error, error
    done = cli(pool, "destroy", "--", "-old")                 # then it is a name
    assert done.returncode == 3 and "'-old'" in done.stderr, done.stderr


def test_missing_arguments_and_unknown_commands_say_what_and_where(pool):
    assert usage_error(pool, "create")[0].startswith(
        "thinstore: create: missing NAME and --size/-s; see 'thinstore create --help'")
    assert "--size/-s needs a value" in usage_error(pool, "create", "vm", "--size")[0]
    assert "unexpected argument '64M'" in usage_error(pool, "grow", "+1M", "64M")[0]
    error = usage_error(pool, "creat", "vm")[0]
    assert "unknown command 'creat' (did you mean 'create'?)" in error, error


@contextlib.contextmanager
def stopped_server(pool: str):
    """A ``thinstore serve`` of ``pool``, stopped (SIGSTOP) once it answers."""
    proc = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", pool, "serve"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
    try:
        for _ in range(300):                            # bounded: 30 s to come up
            if cli(pool, "list").returncode == 0 and \
                    os.path.exists(os.path.join(pool, "control.sock")):
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGSTOP)
        yield proc
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_wait_is_kept_to_against_a_stopped_server(pool):
    """--wait 0.5 took about 15 s (5 s per try at the silent control socket): the limit
    here, 8 s, is the bug's, not a speed target; the message names the wait given."""
    with stopped_server(pool) as proc:
        done = cli(pool, "--wait", "0.5", "list", timeout=8)
        assert done.returncode == 5, done.stderr
        assert f"process {proc.pid}" in done.stderr and "did not answer in 0.5 s" \
            in done.stderr and "kill -CONT" in done.stderr, done.stderr
