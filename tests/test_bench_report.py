"""bench --report: the HTML and SVG pictures open in a real browser and show something.

Headless Chromium renders each file to a PNG; a blank or broken page would be one
colour (or a few), a drawn report has the histogram's and the lines' many."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from thinstore import Pool
from thinstore.cli.main import main
from nbd_helpers import MiB, need

# a browser and peer servers, and nothing of the storage backend: once in CI
pytestmark = pytest.mark.integration

matplotlib = pytest.importorskip("matplotlib", reason="--report needs matplotlib "
                                 "(the [report] extra; CI installs it with [test])")


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return name
    pytest.skip("no headless browser: chromium is not installed (Debian package chromium)")


def screenshot(page: str, png: str) -> None:
    args = [browser(), "--headless", "--disable-gpu", f"--screenshot={png}",
            "--window-size=1200,1100", "--hide-scrollbars", f"file://{page}"]
    if os.geteuid() == 0:
        args.insert(1, "--no-sandbox")     # Chromium refuses root without it (CI runs as root)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, HOME=os.path.dirname(png)))
    assert proc.returncode == 0 and os.path.getsize(png) > 0, proc.stderr[-2000:]


def colours(png: str) -> tuple[int, float]:
    """(distinct colours, share of pixels that are not the background)."""
    import numpy as np
    from matplotlib import image
    pixels = (image.imread(png)[..., :3] * 255).astype(np.uint8).reshape(-1, 3)
    distinct = len(np.unique(pixels, axis=0))
    values, counts = np.unique(pixels, axis=0, return_counts=True)
    background = counts.max() / len(pixels)
    return distinct, 1 - background


@pytest.fixture
def pool_dir(tmp_path):
    path = str(tmp_path / "p")
    with Pool.create(path, 256 * MiB, commit_interval=0) as pool:
        pool.create_volume("v", 16 * MiB)
    return path


@pytest.mark.parametrize("ext", ["html", "svg"])
def test_the_report_renders_in_a_headless_browser(tmp_path, pool_dir, ext):
    browser()
    report = str(tmp_path / f"report.{ext}")
    assert main(["--pool", pool_dir, "bench", "v", "--io-type", "readwrite", "--time", "400ms",
                 "--via", "direct", "--report", report]) == 0
    text = open(report).read()
    assert "latency histogram" in text and "throughput over time" in text
    png = str(tmp_path / "shot.png")
    screenshot(report, png)
    distinct, drawn = colours(png)
    assert distinct > 30 and drawn > 0.02, (distinct, drawn)


def test_a_compare_report_shows_every_server(tmp_path, pool_dir):
    need("qemu-nbd", "nbdkit", "qemu-img")
    report = str(tmp_path / "cmp.html")
    png = str(tmp_path / "cmp.png")
    assert main(["--pool", pool_dir, "bench", "v", "--time", "250ms", "--compare",
                 "qemu-nbd,nbdkit", "--rounds", "1", "--report", report]) == 0
    text = open(report).read()
    for name in ("thinstore", "qemu-nbd", "nbdkit", "side by side"):
        assert name in text
    assert main(["--pool", pool_dir, "bench", "v", "--time", "100ms", "--report", png]) == 0
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
