"""What a new user ran into at the edges (a fresh-user trial of format 2):

- capacities and device sizes past what a pool or a device can be get one line naming
  the limit and the fix, never an internal error;
- a user who may not enter a pool directory is told so, not "no pool here";
- restore refuses to drop flushed writes that only the intent log holds;
- shrinking a huge sparse volume costs its data, and keeps what is below the new end.
"""

from __future__ import annotations

import os
import sys
import traceback

from hardening_helpers import fails, other_user, out, short_dir

from thinstore import Pool
from thinstore.check import check_path

M = 1 << 20
P = 1 << 50


def test_impossible_capacities_and_sizes_are_one_clear_line(tmp_path):
    pool = tmp_path / "p"
    for cap in ("100E", "8E", "2P"):
        err = fails(2, "init", "--capacity", cap, pool=pool)
        assert "at most 1P" in err and "--chunk-size" in err
        assert not pool.exists() or not (pool / "meta").exists()
    out("init", "--capacity", "1G", pool=pool)
    for grow in ("100E", "+9E"):
        assert "at most 1P" in fails(2, "grow", grow, pool=pool)
    err = fails(2, "create", "x", "--size", "2E", pool=pool)
    assert "1E" in err and "larger than any device" in err
    assert "at most 3.97P" in fails(2, "create", "x", "--size", "1E", pool=pool)


def _as_user(user, argv: list) -> tuple[int, str]:
    """The CLI's main(argv) in a child that became `user` after thinstore was imported
    (another user's python may not reach this checkout's packages): (exit code, stderr)."""
    import thinstore.check  # noqa: F401  (what the commands import when they run)
    import thinstore.control  # noqa: F401
    from thinstore.cli.main import build_parser, main
    build_parser()                                 # imports every command's module
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: never returns
        code = 99
        try:
            os.close(r)
            sys.stderr = open(w, "w", closefd=False)   # pytest has replaced sys.stderr
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            code = main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(w)
    with os.fdopen(r) as f:
        err = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def test_a_pool_directory_another_user_may_not_enter_says_so(tmp_path):
    user = other_user()
    pool = os.path.join(short_dir(0o755), "p")
    out("init", "--capacity", "64M", pool=pool)
    for cmd in ("status", "list", "check"):
        code, err = _as_user(user, ["--pool", pool, cmd])
        assert code == 1, (code, err)
        assert "permission denied" in err.lower() and "no thinstore pool" not in err, err


def test_restore_keeps_flushed_writes_of_the_intent_log(tmp_path):
    path = str(tmp_path / "p")
    pool = Pool.create(path, 64 * M, 64 << 10, commit_interval=0)
    pool.create_volume("v", 8 * M)
    pool.commit()
    dev = pool.open_device("v")
    dev.pwrite(b"F" * 4096, M)
    dev.flush()                          # durable in the intent log only
    pool._closed = True                  # the process is killed here
    pool._stop.set()
    pool._owner.release()
    dump = tmp_path / "d.json"
    out("dump", "--json", "-o", dump, pool=path)
    err = fails(2, "restore", dump, pool=path)
    assert "intent log" in err and "status" in err
    out("status", pool=path)             # the open replays the log and commits
    out("dump", "--json", "-o", dump, pool=path)
    out("restore", dump, pool=path)
    with Pool.open(path, commit_interval=0) as pool, pool.open_device("v") as dev:
        assert dev.pread(M, 4096) == b"F" * 4096


def test_shrinking_a_petabyte_volume_keeps_what_stays(tmp_path):
    path = str(tmp_path / "p")
    with Pool.create(path, 256 * M, 64 << 10, commit_interval=0) as pool:
        pool.create_volume("big", 2 * P)
        with pool.open_device("big") as dev:
            dev.pwrite(b"a" * 8192, 0)
            dev.pwrite(b"b" * 8192, (1 << 40) - 4096)   # across the new end
            dev.pwrite(b"c" * 4096, 2 * P - 4096)
        pool.resize("big", 1 << 40, shrink=True)
        with pool.open_device("big") as dev:
            assert dev.size == 1 << 40
            assert dev.pread(0, 8192) == b"a" * 8192
            assert dev.pread((1 << 40) - 4096, 4096) == b"b" * 4096
        pool.resize("big", 2 * P)
        with pool.open_device("big") as dev:
            assert dev.pread(1 << 40, 4096) == bytes(4096)
            assert dev.pread(2 * P - 4096, 4096) == bytes(4096)
        assert pool.info("big").used == 2 * (64 << 10)
    assert check_path(path).problems == []
