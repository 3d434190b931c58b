"""A Docker daemon, the plugin as a process, and an HTTP client for its socket.

The daemon: the one CI started (THINSTORE_TEST_DOCKER_HOST, THINSTORE_TEST_DOCKER_IMAGE),
else a private one through .ci/services/dockerd.sh when dockerd is installed, else the
test skips with the reason.  The plugin registers under a unique name through a spec file
in /etc/docker/plugins (removed afterwards), so tests never collide with a real
"thinstore" plugin or with each other.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVICE = os.path.join(ROOT, ".ci", "services", "dockerd.sh")
SPEC_DIR = "/etc/docker/plugins"
MiB = 1 << 20


def require_docker_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("the Docker plugin mounts volumes: needs root")
    for tool in ("docker", "nbdfuse", "losetup", "mkfs.ext4"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is not available")


class Docker:
    """The docker CLI against one daemon."""

    def __init__(self, host: str, image: str, service_dir: str | None = None):
        self.host, self.image, self.service_dir = host, image, service_dir

    def __call__(self, *args: str, check: bool = True, timeout: float = 300,
                 ) -> subprocess.CompletedProcess:
        done = subprocess.run(["docker", "-H", self.host, *args], capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode:
            raise AssertionError(f"docker {' '.join(args)} -> {done.returncode}\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def run(self, volume_args: list[str], script: str, *, detach: bool = False,
            name: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        args = ["run", "--network", "none", *(["-d"] if detach else ["--rm"]),
                *(["--name", name] if name else []), *volume_args, self.image, "sh", "-c", script]
        return self(*args, check=check)

    def restart(self) -> None:
        """Restart the daemon (only one this process started)."""
        assert self.service_dir, "restart needs a private dockerd"
        subprocess.run([SERVICE, "restart", self.service_dir], check=True,
                       capture_output=True, timeout=180)

    def stop(self) -> None:
        if self.service_dir:
            subprocess.run([SERVICE, "stop", self.service_dir], capture_output=True,
                           timeout=180)
            shutil.rmtree(self.service_dir, ignore_errors=True)


def private_dockerd() -> Docker:
    """Start a dockerd of this test's own through the CI service script."""
    if shutil.which("dockerd") is None:
        pytest.skip("dockerd is not installed (Debian docker.io), and "
                    "THINSTORE_TEST_DOCKER_HOST names no running one")
    where = tempfile.mkdtemp(prefix="tsdk", dir="/tmp")
    done = subprocess.run([SERVICE, "start", where], capture_output=True, text=True,
                          timeout=180)
    if done.returncode:
        subprocess.run([SERVICE, "stop", where], capture_output=True, timeout=180)
        shutil.rmtree(where, ignore_errors=True)
        pytest.skip(f"dockerd did not start here: {done.stderr.strip()[-400:]}")
    env = dict(line.split("=", 1) for line in done.stdout.split() if "=" in line)
    return Docker(env["THINSTORE_TEST_DOCKER_HOST"], env["THINSTORE_TEST_DOCKER_IMAGE"], where)


@contextlib.contextmanager
def docker_daemon():
    """The CI's daemon if it named one, else a private one."""
    require_docker_host()
    host = os.environ.get("THINSTORE_TEST_DOCKER_HOST")
    if host:
        yield Docker(host, os.environ.get("THINSTORE_TEST_DOCKER_IMAGE",
                                          "thinstore-test/busybox:latest"))
        return
    docker = private_dockerd()
    try:
        yield docker
    finally:
        docker.stop()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 120):
        super().__init__("localhost", timeout=timeout)
        self.socket_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.socket_path)
        self.sock = sock


class Plugin:
    """``thinstore docker-plugin`` on a fresh pool, registered as a uniquely named driver."""

    def __init__(self, capacity: str = "16G", socket_name: str | None = None,
                 args: tuple[str, ...] = ()):
        self.dir = tempfile.mkdtemp(prefix="tsdp", dir="/tmp")
        self.pool = os.path.join(self.dir, "pool")
        self.name = f"thinstore-test-{secrets.token_hex(4)}"
        # named like the driver by default, as in /run/docker/plugins: the plugin takes
        # its driver name (in its messages) from the file
        self.socket = os.path.join(self.dir, socket_name or self.name + ".sock")
        self.args = tuple(args)
        self.spec = os.path.join(SPEC_DIR, self.name + ".spec")
        self.proc: subprocess.Popen | None = None
        self.cli("init", "--capacity", capacity)
        os.makedirs(SPEC_DIR, exist_ok=True)
        with open(self.spec, "w") as f:
            f.write(f"unix://{self.socket}\n")

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "thinstore", "--pool", self.pool, *args],
                              capture_output=True, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=ROOT))
        if check and done.returncode:
            raise AssertionError(f"thinstore {' '.join(args)}: {done.stderr}")
        return done

    def start(self) -> None:
        self.log = open(os.path.join(self.dir, "plugin.log"), "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thinstore", "--pool", self.pool, "docker-plugin", "-v",
             "--plugin-socket", self.socket, *self.args], stdout=self.log, stderr=self.log,
            env=dict(os.environ, PYTHONPATH=ROOT), start_new_session=True)
        for _ in range(900):                 # bounded: 90 s (a loaded host imports slowly)
            if self.proc.poll() is not None:
                raise AssertionError(f"the plugin exited: {self.log_text()}")
            with contextlib.suppress(OSError):
                if self.call("/Plugin.Activate", {})[0] == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"the plugin did not answer: {self.log_text()}")

    def log_text(self) -> str:
        with open(os.path.join(self.dir, "plugin.log"), "rb") as f:
            return f.read()[-2000:].decode(errors="replace")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def call(self, path: str, body) -> tuple[int, dict]:
        """POST like dockerd does: the plugin media type in Accept, no Content-Type."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        conn = UnixHTTPConnection(self.socket)
        try:
            conn.request("POST", path, body=data,
                         headers={"Accept": "application/vnd.docker.plugins.v1.2+json"})
            reply = conn.getresponse()
            return reply.status, json.loads(reply.read() or b"{}")
        finally:
            conn.close()

    def remote(self):
        from thinstore.control import RemotePool
        return RemotePool(self.pool)

    def leftovers(self) -> list[str]:
        """Loop devices, mounts and nbdfuse processes of this pool still on the host."""
        from thinstore.frontends.attach import host
        found = [m.target for m in host.mounts() if m.target.startswith(self.dir)]
        found += list(host.loops_backed_by(self.dir))
        found += [f"nbdfuse pid {p}" for p in host.processes_mentioning(self.dir, "nbdfuse")]
        return found

    def settled_leftovers(self) -> list[str]:
        """leftovers() once a volume's last unmount has had its linger (2 s) and its
        teardown (sync, umount, losetup -d, nbdfuse's exit: seconds on a loaded host)."""
        for _ in range(600):                 # bounded: 60 s
            found = self.leftovers()
            if not found:
                return found
            time.sleep(0.1)
        return found

    def close(self) -> None:
        self.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.spec)
        shutil.rmtree(self.dir, ignore_errors=True)


def remove_everything(docker, p: Plugin) -> None:
    """Every container and volume of plugin `p`'s driver, and every device left in its
    pool (snapshots first: the plugin rightly refuses to remove a volume that has some).
    Only this driver's volumes: dockerd also lists those of every plugin with a spec
    file in /etc/docker/plugins, which other test runs may have."""
    names = docker("volume", "ls", "-q", "--filter", f"driver={p.name}",
                   check=False).stdout.split()
    for volume in names:
        users = docker("ps", "-aq", "--filter", f"volume={volume}", check=False).stdout.split()
        if users:
            docker("rm", "-f", *users, check=False)
    with p.remote() as remote:
        for device in remote.list():
            if device.kind == "snapshot":
                remote.destroy(device.name, force=True)
    for volume in names:
        docker("volume", "rm", "-f", volume, check=False)
    with p.remote() as remote:
        for device in remote.list():
            remote.destroy(device.name, force=True)


def inspect(docker, name: str) -> dict:
    """`docker volume inspect NAME`, parsed."""
    return json.loads(docker("volume", "inspect", name).stdout)[0]


@contextlib.contextmanager
def plugin_for_a_test(docker, p: Plugin):
    """A test's use of the module's plugin process `p` (restarted if it died); then
    everything of the test removed, and nothing left on the host (mount, loop device,
    nbdfuse) that the plugin made."""
    if p.proc.poll() is not None:
        p.start()
    try:
        yield p
    finally:
        remove_everything(docker, p)
    assert not p.settled_leftovers(), "the plugin left a mount, loop device or nbdfuse behind"


@contextlib.contextmanager
def running_plugin(**kwargs):
    """A Plugin(**kwargs) started for a module, closed at its end."""
    p = Plugin(**kwargs)
    try:
        p.start()
        yield p
    finally:
        p.close()
