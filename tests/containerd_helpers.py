"""A real containerd and thinstore's snapshotter process, for tests/test_containerd.py.

containerd comes from CI's service (.ci/services/containerd.sh, which exports
THINSTORE_TEST_CONTAINERD_ADDRESS and THINSTORE_TEST_SNAPSHOTTER_SOCKET); without those,
the same script starts one in a temporary directory when containerd is installed and we
are root; otherwise the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE = os.path.join(ROOT, ".ci", "services", "containerd.sh")
SNAPSHOTTER = "thinstore"


def why_no_containerd() -> str | None:
    if os.environ.get("THINSTORE_TEST_CONTAINERD_ADDRESS"):
        return None
    for tool in ("containerd", "ctr", "runc", "nbdfuse", "losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (CI installs it: .ci/run)"
    if os.geteuid() != 0:
        return "containerd, loop devices and mounts need root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse for nbdfuse"
    return None


class Containerd:
    """A containerd to drive with ctr; ``own`` when this test run started it."""

    def __init__(self):
        self.dir = None
        env = os.environ.get("THINSTORE_TEST_CONTAINERD_ADDRESS")
        if env:
            self.address = env
            self.snapshotter_socket = os.environ["THINSTORE_TEST_SNAPSHOTTER_SOCKET"]
            return
        self.dir = tempfile.mkdtemp(prefix="ts-ctd-")
        out = subprocess.run([SERVICE, "start", self.dir], check=True, capture_output=True,
                             text=True).stdout
        values = dict(line.split("=", 1) for line in out.split())
        self.address = values["THINSTORE_TEST_CONTAINERD_ADDRESS"]
        self.snapshotter_socket = values["THINSTORE_TEST_SNAPSHOTTER_SOCKET"]

    def close(self) -> None:
        if self.dir is not None:
            subprocess.run([SERVICE, "stop", self.dir], check=False)
            shutil.rmtree(self.dir, ignore_errors=True)

    def ctr(self, ns: str, *args: str, check: bool = True, timeout: float = 120):
        """Run ``ctr -n NS ARGS``; its stdout (CalledProcessError with stderr if it fails)."""
        cmd = ["ctr", "--address", self.address, "-n", ns, *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    def reaches_snapshotter(self, tries: int = 240) -> bool:
        """Wait until containerd's proxy connection answers again (after the snapshotter
        restarted, gRPC's reconnect backoff can hold it off for some seconds)."""
        def probe() -> bool:        # Prepare and Remove reach the snapshotter; ls does not
            sn = ("snapshots", "--snapshotter", SNAPSHOTTER)
            if self.ctr("ts-probe", *sn, "prepare", "probe", check=False).returncode:
                return False
            return self.ctr("ts-probe", *sn, "rm", "probe", check=False).returncode == 0

        def probe_gone() -> bool:   # containerd's GC removes it from the snapshotter
            backend = Backend(self.snapshotter_socket)
            try:
                return not [k for k in backend.list() if k.startswith("ts-probe/")]
            finally:
                backend.close()
        return bool(wait_for(probe, tries=tries, pause=0.25)) and bool(wait_for(probe_gone))

    def snapshots(self, ns: str) -> dict:
        """``ctr snapshots info`` of every snapshot containerd knows in ``ns``, by name."""
        out = self.ctr(ns, "snapshots", "--snapshotter", SNAPSHOTTER, "ls").stdout
        keys = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
        return {k: json.loads(self.ctr(ns, "snapshots", "--snapshotter", SNAPSHOTTER,
                                       "info", k).stdout) for k in keys}


class Snapshotter:
    """``thinstore --pool POOL snapshotter --address SOCK`` as a child process."""

    def __init__(self, pool: str, address: str, base_size: str = "256M", *extra: str):
        self.pool, self.address, self.base_size = pool, address, base_size
        self.extra = list(extra)
        self.log = pool.rstrip("/") + ".log"
        self.proc = None

    def start(self, crash: str | None = None) -> None:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        env.pop("THINSTORE_SNAPSHOTTER_CRASH", None)
        if crash:
            env["THINSTORE_SNAPSHOTTER_CRASH"] = crash
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinstore", "--pool", self.pool, "snapshotter",
             "--address", self.address, "--base-size", self.base_size, *self.extra],
            stdout=subprocess.PIPE, stderr=open(self.log, "a"), text=True, env=env)
        for line in self.proc.stdout:           # serve prints this line once serving
            if line.startswith("containerd snapshotter:"):
                return
        self.proc.wait()
        with open(self.log) as f:
            raise AssertionError(f"snapshotter did not start: {f.read()[-2000:]}")

    def killed(self, timeout: float = 60) -> bool:
        """Wait for the process to end; True if SIGKILL ended it."""
        try:
            return self.proc.wait(timeout) == -signal.SIGKILL
        except subprocess.TimeoutExpired:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def thinstore(self, *args: str) -> str:
        env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        return subprocess.run([sys.executable, "-m", "thinstore", "--pool", self.pool, *args],
                              check=True, capture_output=True, text=True, env=env).stdout

    def used(self) -> int:
        """The pool's used data bytes (thinstore status, through the control socket)."""
        return int(json.loads(self.thinstore("status", "--json"))["used"])

    def devices(self) -> dict:
        """Pool devices by name: {name: info dict} (thinstore list --json)."""
        return {d["name"]: d for d in json.loads(self.thinstore("list", "--json"))["devices"]}


def wait_for(predicate, tries: int = 300, pause: float = 0.1):
    """Poll ``predicate`` a bounded number of times (containerd's GC runs after a delay)."""
    import time
    for _ in range(tries):
        value = predicate()
        if value:
            return value
        time.sleep(pause)
    return predicate()


def skip_unless_containerd():
    reason = why_no_containerd()
    if reason:
        pytest.skip(reason)


class Backend:
    """A gRPC client of the snapshotter itself (what containerd's proxy plugin calls)."""

    def __init__(self, socket_path: str):
        import grpc
        from thinstore.frontends.containerd import snapshots_pb2 as pb

        self.pb = pb
        self.channel = grpc.insecure_channel(f"unix://{socket_path}")
        svc = "/containerd.services.snapshots.v1.Snapshots/"
        self._list = self.channel.unary_stream(
            svc + "List", request_serializer=pb.ListSnapshotsRequest.SerializeToString,
            response_deserializer=pb.ListSnapshotsResponse.FromString)
        self._usage = self.channel.unary_unary(
            svc + "Usage", request_serializer=pb.UsageRequest.SerializeToString,
            response_deserializer=pb.UsageResponse.FromString)
        self._stat = self.channel.unary_unary(
            svc + "Stat", request_serializer=pb.StatSnapshotRequest.SerializeToString,
            response_deserializer=pb.StatSnapshotResponse.FromString)

    def list(self, *filters: str) -> dict:
        """{key: (kind name, parent, labels)} of every snapshot matching any filter."""
        out = {}
        for resp in self._list(self.pb.ListSnapshotsRequest(filters=filters), timeout=30):
            for i in resp.info:
                out[i.name] = (self.pb.Kind.Name(i.kind), i.parent, dict(i.labels))
        return out

    def call(self, method: str, request, response_class, raw: bytes | None = None):
        """One unary call; ``raw`` sends those bytes instead of the request."""
        stub = self.channel.unary_unary(
            "/containerd.services.snapshots.v1.Snapshots/" + method,
            request_serializer=(lambda m: raw) if raw is not None else
            (lambda m: m.SerializeToString()),
            response_deserializer=response_class.FromString)
        return stub(request, timeout=60)

    def usage(self, key: str) -> int:
        return self._usage(self.pb.UsageRequest(key=key), timeout=30).size

    def stat(self, key: str):
        return self._stat(self.pb.StatSnapshotRequest(key=key), timeout=30).info

    def close(self) -> None:
        self.channel.close()
