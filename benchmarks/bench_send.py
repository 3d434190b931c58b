"""Send costs, each case beside its peer in one run.

    python -m pytest benchmarks/bench_send.py --benchmark-only -s

- incremental send of 1% changed chunks of a 4 GiB volume vs a full send of it:
  time ratio (target: near the 1% of bytes, far from 1) and stream bytes per
  changed byte (target: close to 1 for incompressible data);
- compression: stream bytes / data bytes for text-like data (lz4 per 1 MiB record);
- receive of the full stream into a second pool (for scale, no target).
"""

import io

import numpy as np
import pytest

from conftest import report
from thinstore import Pool, replication as RP

GiB = 1 << 30
MiB = 1 << 20
CS = 64 << 10
SIZE = 4 * GiB


class Sink(io.RawIOBase):
    """A stream consumer that only counts: the benchmark measures send, not a disk."""

    def __init__(self):
        self.n = 0

    def writable(self):
        return True

    def write(self, b):
        self.n += len(b)
        return len(b)


def _random_block(seed, n):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """4 GiB of incompressible data in s1; s2 changes 1% of its chunks, scattered."""
    path = str(tmp_path_factory.mktemp("send") / "pool")
    pool = Pool.create(path, SIZE + 512 * MiB, CS, commit_interval=0)
    pool.create_volume("v", SIZE)
    block = _random_block(1, 8 * MiB)
    with pool.open_device("v") as dev:
        for off in range(0, SIZE, len(block)):
            dev.pwrite(block, off)
        pool.snapshot("v@s1")
        rng = np.random.default_rng(2)
        chunks = rng.choice(SIZE // CS, SIZE // CS // 100, replace=False)
        for c in chunks.tolist():
            dev.pwrite(_random_block(c, CS), c * CS)
        pool.snapshot("v@s2")
    yield pool
    pool.close()


@pytest.mark.parametrize("kind", ["full", "incremental"])
def test_send(benchmark, big, results, kind):
    base = "v@s1" if kind == "incremental" else None
    sinks = []

    def run():
        sink = Sink()
        sinks.append((sink, RP.send(big, "v@s2", sink, base)))

    benchmark.pedantic(run, rounds=3 if kind == "full" else 10, iterations=1)
    results[f"send-{kind}"] = benchmark.stats.stats.median
    sink, stats = sinks[-1]
    results[f"send-{kind}-bytes"] = sink.n
    results[f"send-{kind}-changed"] = stats.changed_bytes
    if kind == "incremental":
        ratio = results["send-incremental"] / results["send-full"]
        report(f"send 4 GiB volume, 1% chunks changed: incremental/full time "
               f"{ratio:.4f} ({results['send-incremental']:.3f}s / {results['send-full']:.2f}s)")
        report(f"incremental stream bytes / changed bytes: {sink.n / stats.changed_bytes:.4f} "
               f"({sink.n} / {stats.changed_bytes})")
        report(f"full send rate: {SIZE / results['send-full'] / MiB:.0f} MiB/s")


def _text(n):
    """Text-like bytes: log lines of words, numbers and timestamps."""
    rng = np.random.default_rng(3)
    words = ("disk volume snapshot write read chunk page error ok request client server "
             "flush commit bytes time user admin host debug info warn").split()
    lines, size = [], 0
    while size < n:
        line = (f"2026-11-{rng.integers(1, 30):02d}T{rng.integers(0, 24):02d}:"
                f"{rng.integers(0, 60):02d}:{rng.integers(0, 60):02d} "
                f"{' '.join(rng.choice(words, rng.integers(4, 12)))} id={rng.integers(1e6)}\n")
        lines.append(line)
        size += len(line)
    return "".join(lines).encode()[:n]


def test_compression_on_text(benchmark, tmp_path):
    pool = Pool.create(str(tmp_path / "pool"), 256 * MiB, CS, commit_interval=0)
    pool.create_volume("t", 64 * MiB)
    with pool.open_device("t") as dev:
        dev.pwrite(_text(64 * MiB), 0)
    pool.snapshot("t@s")
    sink = Sink()
    stats = benchmark.pedantic(lambda: RP.send(pool, "t@s", sink), rounds=1, iterations=1)
    report(f"text-like data: stream bytes / data bytes {stats.stream_bytes / stats.data_bytes:.3f}"
           f" (lz4 ratio {stats.data_bytes / stats.stream_bytes:.2f}x)")
    pool.close()


def test_receive_full(benchmark, big, tmp_path):
    out = io.BytesIO()
    RP.send(big, "v@s2", out)
    data = out.getvalue()
    dst = Pool.create(str(tmp_path / "dst"), SIZE + 512 * MiB, CS, commit_interval=0)
    stats = benchmark.pedantic(lambda: RP.receive(dst, "w", io.BytesIO(data)),
                               rounds=1, iterations=1)
    report(f"receive full 4 GiB stream: {SIZE / benchmark.stats.stats.median / MiB:.0f} MiB/s "
           f"({stats.records} records)")
    dst.close()
