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
