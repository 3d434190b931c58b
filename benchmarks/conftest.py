import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

RESULTS: dict[str, float] = {}


@pytest.fixture(scope="session")
def results():
    """Medians by name, so a benchmark can report a ratio against its peer of the same run."""
    return RESULTS


def pytest_terminal_summary(terminalreporter):
    lines = RESULTS.get("_report_lines", [])
    if lines:
        terminalreporter.section("thinstore ratios")
        for line in lines:
            terminalreporter.write_line(line)


def report(line: str) -> None:
    RESULTS.setdefault("_report_lines", []).append(line)


def make_big_pool(path: str, capacity: int):
    """(a pool of `capacity` with 64 KiB chunks, its capacity), or of the largest the
    file system holds: ext4 refuses a data file of 16 TiB (EFBIG), so 256 GiB less at
    a time down to 64 GiB."""
    import shutil

    from thinstore import Pool
    while True:
        try:
            return Pool.create(path, capacity, 64 << 10, commit_interval=0), capacity
        except OSError as e:
            if e.errno != 27 or capacity <= 64 << 30:      # EFBIG
                raise
            shutil.rmtree(path, ignore_errors=True)
            capacity -= 256 << 30
