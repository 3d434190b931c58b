import os
import shutil
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import backends  # noqa: E402
from thinstore import Pool  # noqa: E402

MiB = 1 << 20


# Test modules whose cases run on every storage backend (DESIGN §9): their pool_path,
# pool and pool_location fixtures give a directory pool and a rados:// pool in turn.
BACKEND_MODULES = {"test_snapshots", "test_persistence", "test_replication",
                   "test_nbd_libnbd", "test_nbd_qemu", "test_integrity_cli"}


def pytest_generate_tests(metafunc):
    if metafunc.module.__name__ in BACKEND_MODULES and "backend" in metafunc.fixturenames:
        # the rados cases drive a real cluster: 'integration', so CI runs them once (on a
        # rados pool the I/O kernels take their Python twins anyway: the file has no fd)
        rados = pytest.param("rados", marks=pytest.mark.integration)
        metafunc.parametrize("backend", ["dir", rados], indirect=True, scope="module")


@pytest.fixture(scope="session", autouse=True)
def runtime_dir():
    """A rados:// pool keeps its sockets in a local runtime directory, /tmp/thinstore-UID
    by default, where every run left one directory per pool it made (1,954 of them on the
    shared dev machine): the tests get their own, short (socket paths are at most 107
    bytes) and removed at the end. A test that sets THINSTORE_RUNTIME_DIR keeps its own."""
    if os.environ.get("THINSTORE_RUNTIME_DIR"):
        yield
        return
    d = tempfile.mkdtemp(prefix="tsrun", dir="/tmp")
    os.environ["THINSTORE_RUNTIME_DIR"] = d
    try:
        yield
    finally:
        os.environ.pop("THINSTORE_RUNTIME_DIR", None)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def backend(request):
    """"dir" or "rados" (test modules outside BACKEND_MODULES always get "dir")."""
    return getattr(request, "param", "dir")


@pytest.fixture
def pool_location(backend, tmp_path):
    """A factory of fresh pool locations on this test's backend, removed afterwards."""
    made = []

    def make(name: str = "pool") -> str:
        made.append(backends.location(backend, tmp_path, name))
        return made[-1]
    yield make
    for loc in made:
        backends.remove(loc)


@pytest.fixture
def pool_path(pool_location):
    return pool_location("pool")


@pytest.fixture
def pool(pool_path):
    p = Pool.create(pool_path, 256 * MiB, 64 << 10, commit_interval=0)
    yield p
    p.close()


def pattern(seed: int, n: int) -> bytes:
    """Deterministic non-zero bytes that differ per seed and per offset."""
    import numpy as np
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, n, dtype=np.uint8).tobytes()
