"""A frontend's graceful stop keeps what containers wrote (docs/attach.md, "A graceful stop").

The Docker volume plugin, driven by a real dockerd (the fixtures of tests/test_docker.py):
SIGTERM while a container's writes are only in the page cache, the restart, and a new
container that reads them.  The containerd snapshotter's twin is in tests/test_containerd.py
(test_a_stop_writes_through_what_a_running_task_wrote); the mechanism alone, without a
daemon, in tests/test_attach.py.
"""

from __future__ import annotations

import pytest

from test_docker import docker, plugin, plugin_process, until  # noqa: F401  (fixtures)

pytestmark = pytest.mark.integration


def test_plugin_sigterm_keeps_what_a_running_container_wrote(docker, plugin):  # noqa: F811
    docker("volume", "create", "-d", plugin.name, "-o", "size=512M", "v3")
    writer = f"{plugin.name}-writer"
    docker.run(["-v", "v3:/data"], "seq 1 100000 > /data/seq; echo done > /data/marker; "
               "sleep 1000", detach=True, name=writer)
    docker("exec", writer, "sh", "-c", until("[ -s /data/marker ]"))   # no sync: page cache
    plugin.stop()                                                       # SIGTERM
    late = docker("exec", writer, "sh", "-c", "echo late > /data/late", check=False)
    assert late.returncode != 0, "a write after the stop was accepted (and would be lost)"
    plugin.start()
    docker("rm", "-f", writer)
    out = docker.run(["-v", "v3:/data"], "wc -c < /data/seq; cat /data/marker").stdout.split()
    assert out == ["588895", "done"]
