"""What a rate-limited scrub of a served pool costs its clients.

    python -m pytest benchmarks/bench_online_scrub.py -s [--scrub-rate 64M]

`thinstore serve` holds a pool with 512 MiB of data; fio (nbd engine, 4 KiB random
writes, queue depth 16) writes to a volume through it for ROUND seconds, alternately
alone and with `thinstore scrub --rate R` running against the served pool over and
over. Peer: fio alone, in the same run, interleaved in pairs (alone then scrubbed,
scrubbed then alone, ...), so drift in the machine's load hits both sides. Reported:
the median over pairs of IOPS with the scrub / IOPS alone (target >= 0.8, issue 15),
and the scrub's read rate. THINSTORE_BENCH_SCRUB_RATE=0 shows the unpaced scrub.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from conftest import ROOT, report

MiB = 1 << 20
ROUND = 4          # seconds of fio per round
ROUNDS = 5         # pairs of rounds (alone, scrubbed)
RATE = os.environ.get("THINSTORE_BENCH_SCRUB_RATE", "64M")


def ts(pool, *args, **kw):
    return subprocess.run([sys.executable, "-m", "thinstore", "--pool", pool, *args],
                          env=dict(os.environ, PYTHONPATH=ROOT), check=True,
                          capture_output=True, **kw)


def fio_iops(uri: str) -> float:
    out = subprocess.run(["fio", "--output-format=json", "--name=w", "--ioengine=nbd",
                          f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                          "--size=256M", "--time_based", f"--runtime={ROUND}",
                          "--randrepeat=0"], capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    return job["write"]["iops"]


class Scrubber(threading.Thread):
    """`thinstore scrub --rate R` against the served pool, again and again, until stopped."""

    def __init__(self, pool: str):
        super().__init__(daemon=True)
        self.pool, self.stopping, self.bytes, self.seconds = pool, threading.Event(), 0, 0.0

    def run(self):
        while not self.stopping.is_set():
            t0 = time.monotonic()
            out = ts(self.pool, "scrub", "--json", "--rate", RATE).stdout
            self.seconds += time.monotonic() - t0
            self.bytes += json.loads(out)["bytes_read"]


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_rate_limited_scrub_vs_fio_alone():
    d = tempfile.mkdtemp(prefix="tsbs", dir="/tmp")
    pool, sock = os.path.join(d, "pool"), os.path.join(d, "nbd.sock")
    ts(pool, "init", "--capacity", "2G")
    img = os.path.join(d, "img")
    with open(img, "wb") as f:
        for _ in range(512 // 8):
            f.write(os.urandom(8 * MiB))
    ts(pool, "import", "data", img)
    os.unlink(img)
    ts(pool, "create", "vol", "--size", "256M")
    server = subprocess.Popen([sys.executable, "-m", "thinstore", "--pool", pool, "serve",
                               "--socket", sock], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=ROOT))
    try:
        while not server.stdout.readline().startswith("control socket:"):
            pass
        uri = f"nbd+unix:///vol?socket={sock}"
        fio_iops(uri)                                  # warm: every block allocated once
        alone, scrubbed, rates = [], [], []
        for i in range(ROUNDS):
            for with_scrub in ((False, True) if i % 2 == 0 else (True, False)):
                if not with_scrub:
                    alone.append(fio_iops(uri))
                    continue
                scrub = Scrubber(pool)
                scrub.start()
                scrubbed.append(fio_iops(uri))
                scrub.stopping.set()
                scrub.join()
                rates.append(scrub.bytes / max(scrub.seconds, 1e-9) / MiB)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(d, ignore_errors=True)
    ratio = statistics.median(s / a for s, a in zip(scrubbed, alone))
    report(f"fio 4K randwrite QD16 through serve, with 'scrub --rate {RATE}' / alone: "
           f"{ratio:.2f} (median of {ROUNDS} pairs; IOPS {statistics.median(scrubbed):.0f} / "
           f"{statistics.median(alone):.0f}; scrub read {statistics.median(rates):.0f} MiB/s)")
    assert ratio >= 0.8
