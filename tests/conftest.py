import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from thinstore import Pool  # noqa: E402

MiB = 1 << 20


@pytest.fixture
def pool_path(tmp_path):
    return str(tmp_path / "pool")


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
