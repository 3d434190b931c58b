"""Shared pieces of the CSI tests: the plugin as a process (``thinstore csi``) or in this
process, and a grpcio client on its unix socket, as csi-sanity drives a plugin."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import grpc

from nbd_helpers import need_loop_over_nbd
from thinstore import Pool
from thinstore.frontends.csi import csi_pb2 as pb
from thinstore.frontends.csi import csi_pb2_grpc as pbg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30
MiB = 1 << 20
Mode = pb.VolumeCapability.AccessMode.Mode


def short_tmpdir() -> str:
    """A directory whose socket paths fit the 108-byte sun_path limit."""
    return tempfile.mkdtemp(prefix="tscsi", dir="/tmp")


def mount_cap(fs: str = "", mode=Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(mount=pb.VolumeCapability.MountVolume(fs_type=fs),
                               access_mode=pb.VolumeCapability.AccessMode(mode=mode))


def block_cap(mode=Mode.SINGLE_NODE_WRITER) -> pb.VolumeCapability:
    return pb.VolumeCapability(block=pb.VolumeCapability.BlockVolume(),
                               access_mode=pb.VolumeCapability.AccessMode(mode=mode))


class Client:
    """Stubs of every CSI service on one channel."""

    def __init__(self, sock: str):
        self.channel = grpc.insecure_channel(f"unix:{sock}")
        self.identity = pbg.IdentityStub(self.channel)
        self.controller = pbg.ControllerStub(self.channel)
        self.node = pbg.NodeStub(self.channel)
        self.metadata = pbg.SnapshotMetadataStub(self.channel)

    def create(self, name: str, size: int = 64 * MiB, caps=None, **kw) -> pb.Volume:
        req = pb.CreateVolumeRequest(name=name, volume_capabilities=caps or [mount_cap()],
                                     capacity_range=pb.CapacityRange(required_bytes=size), **kw)
        return self.controller.CreateVolume(req, timeout=30).volume

    def snapshot(self, name: str, volume_id: str) -> pb.Snapshot:
        req = pb.CreateSnapshotRequest(name=name, source_volume_id=volume_id)
        return self.controller.CreateSnapshot(req, timeout=30).snapshot

    def close(self) -> None:
        self.channel.close()


def status_of(call, *args, **kw) -> grpc.StatusCode:
    """The status code a call ends with (OK when it succeeds)."""
    try:
        call(*args, timeout=30, **kw)
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def init_pool(path: str, capacity: int = 4 * GiB) -> None:
    Pool.create(path, capacity, 64 << 10, commit_interval=0).close()


class PluginProcess:
    """``thinstore --pool DIR csi --endpoint unix://SOCK --node-id node-1`` as a process."""

    def __init__(self, pool_dir: str, sock: str, env: dict | None = None):
        self.pool_dir, self.sock = pool_dir, sock
        environ = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinstore", "--pool", pool_dir, "csi",
             "--endpoint", f"unix://{sock}", "--node-id", "node-1",
             "--socket", os.path.join(os.path.dirname(sock), "nbd.sock")],
            env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._wait_ready()

    def _wait_ready(self) -> None:
        for _ in range(1800):                   # bounded: 90 s (a loaded host imports slowly)
            if self.proc.poll() is not None:
                raise RuntimeError(f"plugin exited: {self.proc.stderr.read()}")
            if os.path.exists(self.sock):
                client = Client(self.sock)
                try:
                    client.identity.Probe(pb.ProbeRequest(), timeout=5)
                    return
                except grpc.RpcError:
                    pass
                finally:
                    client.close()
            time.sleep(0.05)
        raise RuntimeError("plugin did not come up")

    def wait(self) -> int:
        return self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


class Env:
    """A pool directory, a running plugin and a client; ``restart`` keeps the pool."""

    def __init__(self, capacity: int = 4 * GiB, env: dict | None = None):
        self.dir = short_tmpdir()
        self.pool_dir = os.path.join(self.dir, "pool")
        self.sock = os.path.join(self.dir, "csi.sock")
        init_pool(self.pool_dir, capacity)
        self.plugin = None
        self.client = None
        self.start(env)

    def start(self, env: dict | None = None) -> None:
        self.plugin = PluginProcess(self.pool_dir, self.sock, env)
        self.client = Client(self.sock)

    def restart(self, env: dict | None = None) -> None:
        self.stop_plugin()
        self.start(env)

    def stop_plugin(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.plugin is not None:
            self.plugin.stop()
        self.client = self.plugin = None

    def devices(self) -> list[str]:
        """The pool's devices, read with the plugin stopped."""
        with Pool.open(self.pool_dir, commit_interval=0) as pool:
            return [d.name for d in pool.list()]

    def close(self) -> None:
        self.stop_plugin()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def plugin_env(**kw):
    env = Env(**kw)
    try:
        yield env
    finally:
        env.close()


class InProcess:
    """Pool, NBD server and plugin in this process, so a test can read the pool's
    counters (what a call cost) while it drives the plugin through its socket."""

    def __init__(self, capacity: int = 4 * GiB, size_hint=None):
        from thinstore.frontends.csi.service import Plugin
        from thinstore.nbd.server import NBDServer, ServerConfig

        self.dir = short_tmpdir()
        self.pool_dir = os.path.join(self.dir, "pool")
        self.pool = Pool.create(self.pool_dir, capacity, 64 << 10, commit_interval=0)
        self.server = NBDServer(self.pool, ServerConfig())
        self.nbd_sock = self.server.listen_unix(os.path.join(self.dir, "nbd.sock"))
        self.server.start()
        self.sock = os.path.join(self.dir, "csi.sock")
        self.plugin = Plugin(self.pool, self.pool_dir, "node-1", nbd_server=self.server,
                             nbd_socket=self.nbd_sock)
        self.plugin.start(f"unix://{self.sock}")
        self.client = Client(self.sock)

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def close(self) -> None:
        self.client.close()
        self.plugin.stop()
        self.server.shutdown()
        self.pool.close()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def in_process(**kw):
    env = InProcess(**kw)
    try:
        yield env
    finally:
        env.close()


def require_block_devices() -> None:
    """Skip (with the reason) where the attach module cannot make block devices."""
    need_loop_over_nbd("blkid")


def stage_req(vid: str, path: str, cap=None) -> pb.NodeStageVolumeRequest:
    return pb.NodeStageVolumeRequest(volume_id=vid, staging_target_path=path,
                                     volume_capability=cap or mount_cap())


def publish_req(vid: str, staging: str, target: str, cap=None, readonly=False):
    return pb.NodePublishVolumeRequest(volume_id=vid, staging_target_path=staging,
                                       target_path=target, volume_capability=cap or mount_cap(),
                                       readonly=readonly)


def once_released(call, req):
    """Run ``call(req)`` once the NBD server has let go of a client that just hung up:
    it releases the device from its own thread, so the first try may still find the
    device open (FAILED_PRECONDITION, which a CO retries too).  Bounded."""
    for _ in range(1500):                      # bounded: 30 s and more
        try:
            return call(req, timeout=30)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.FAILED_PRECONDITION:
                raise
        time.sleep(0.02)
    return call(req, timeout=30)
