"""Clone-and-start: a container on a copy of a populated volume, thinstore vs local + cp -a.

    python -m pytest benchmarks/bench_docker.py -s -p no:cacheprovider

For a volume holding 1 GiB and 4 GiB of files (64 MiB files of random bytes):

- thinstore: ``thinstore snapshot SRC@sN`` (through the control socket; it freezes the
  mounted file system if any), ``docker volume create -d PLUGIN -o from=SRC@sN DST``, and
  ``docker run -v DST:/data ... ls /data`` (attach, mount, start, exit);
- local (the peer, the way a user copies a volume today): ``docker volume create DST``,
  ``cp -a`` of the source volume's directory into DST's, ``docker run -v DST:/data ...``.

Each is timed end to end (wall clock, median of REPEAT runs) and reported as a ratio,
local / thinstore.  The local source's files are warm in the page cache (they were just
written), which favours cp; cp's copy is not synced, which favours it too.  Uses the CI's
dockerd (THINSTORE_TEST_DOCKER_HOST) or a private one through .ci/services/dockerd.sh.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import pytest

from conftest import report

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))
from docker_helpers import Plugin, docker_daemon  # noqa: E402

GiB = 1 << 30
FILE_MIB = 64
REPEAT = 3
FILL = ("dd if=/dev/urandom of=/data/seed bs=1M count={mib} 2>/dev/null; "
        "for i in $(seq 2 {n}); do cp /data/seed /data/f.$i; done; sync")


@pytest.fixture(scope="module")
def rig():
    with docker_daemon() as docker:
        plugin = Plugin(capacity="64G")
        plugin.start()
        try:
            yield docker, plugin
        finally:
            for name in docker("volume", "ls", "-q").stdout.split():
                if name.startswith("bench-"):
                    docker("volume", "rm", "-f", name, check=False)
            plugin.close()


def timed(step) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


@pytest.mark.parametrize("gib", [1, 4])
def test_clone_and_start(rig, gib):
    docker, plugin = rig
    n = gib * 1024 // FILE_MIB
    fill = FILL.format(mib=FILE_MIB, n=n)
    docker("volume", "create", "-d", plugin.name, "-o", f"size={gib * 2}G", f"bench-ts{gib}")
    docker("volume", "create", f"bench-local{gib}")
    docker.run(["-v", f"bench-ts{gib}:/data"], fill)
    docker.run(["-v", f"bench-local{gib}:/data"], fill)
    source = _mountpoint(docker, f"bench-local{gib}")

    def thinstore_copy(k: int) -> None:
        plugin.cli("snapshot", f"bench-ts{gib}@s{k}")
        docker("volume", "create", "-d", plugin.name, "-o", f"from=bench-ts{gib}@s{k}",
               f"bench-tsc{gib}-{k}")
        docker.run(["-v", f"bench-tsc{gib}-{k}:/data"], "ls /data | wc -l")

    def local_copy(k: int) -> None:
        docker("volume", "create", f"bench-lc{gib}-{k}")
        subprocess.run(["cp", "-a", source + "/.", _mountpoint(docker, f"bench-lc{gib}-{k}")],
                       check=True)
        docker.run(["-v", f"bench-lc{gib}-{k}:/data"], "ls /data | wc -l")

    ts = statistics.median(timed(lambda: thinstore_copy(k)) for k in range(REPEAT))
    local = statistics.median(timed(lambda: local_copy(k)) for k in range(REPEAT))
    for k in range(REPEAT):
        docker("volume", "rm", f"bench-lc{gib}-{k}", f"bench-tsc{gib}-{k}")
    report(f"docker clone-and-start, {gib} GiB of files: thinstore {ts:.2f} s, "
           f"local + cp -a {local:.2f} s: local/thinstore = {local / ts:.1f}x")


def _mountpoint(docker, name: str) -> str:
    return json.loads(docker("volume", "inspect", name).stdout)[0]["Mountpoint"]
