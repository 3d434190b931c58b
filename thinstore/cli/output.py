"""Printing results: aligned tables for people, JSON for programs.

Tables follow ``zfs list``: an upper-case header, columns padded to their widest cell,
numbers right-aligned, human sizes unless ``--parsable`` asks for exact bytes.  JSON is one
document on stdout with ``sort_keys`` so that its text is stable from run to run.
"""

from __future__ import annotations

import json
import sys
import time

from thinstore.units import format_size


def print_json(document) -> None:
    """Write ``document`` as indented, key-sorted JSON and a newline."""
    json.dump(document, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def print_table(headers: list[str], rows: list[list[str]], right: set[int], header=True) -> None:
    """Print ``rows`` under ``headers``; columns in ``right`` are right-aligned.

    Without a header (``-H``) the cells are tab-separated and unpadded, for ``cut`` and
    ``while read``.
    """
    out = sys.stdout
    if not header:
        for row in rows:
            out.write("\t".join(row) + "\n")
        return
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    for row in [headers, *rows]:     # one write per row, no print() machinery
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(row, widths))]
        out.write("  ".join(cells).rstrip() + "\n")


def size_cell(nbytes, parsable: bool) -> str:
    """A size as exact bytes (``-p``) or human units; ``-`` when unknown."""
    if nbytes is None:
        return "-"
    return str(int(nbytes)) if parsable else format_size(int(nbytes))


def time_cell(created, parsable: bool) -> str:
    """A creation time: epoch seconds with ``-p``, else local ``YYYY-MM-DD HH:MM``."""
    if created is None or created == "":
        return "-"
    if isinstance(created, (int, float)):
        if parsable:
            return str(int(created))
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(created))
    return str(created)
