"""Consistency check of an open pool: what thin_check verifies, from the loaded tree.

Loading already verified every superblock, root and leaf checksum and that no two
structures claim one metadata block. Here the reference counts stored for data
chunks are recomputed from every live map page and compared; every map entry must
lie inside the pool.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Problem:
    kind: str        # e.g. "refcount", "range", "page"
    message: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


def expected_refcounts(pool) -> np.ndarray:
    """Data chunk refcounts recomputed from every live map page."""
    maps, space = pool.md.maps, pool.md.space
    live = np.flatnonzero(maps.ref > 0)
    maps.ensure_loaded(live)
    ents = maps.pages[live].ravel()
    ents = ents[ents != 0].astype(np.int64)
    expect = np.zeros(len(space.refs.arr), dtype=np.int64)
    inside = ents[ents < len(expect)]
    np.add.at(expect, inside, 1)
    return expect, ents[ents >= len(expect)]


def check_pool(pool) -> list[Problem]:
    problems: list[Problem] = []
    with pool.lock:
        space = pool.md.space
        expect, outside = expected_refcounts(pool)
        for c in outside[:20].tolist():
            problems.append(Problem("range", f"a map entry names chunk {c}, outside the pool"))
        stored = space.refs.arr.astype(np.int64)
        bad = np.flatnonzero(stored != expect)
        for c in bad[:20].tolist():
            problems.append(Problem("refcount", f"chunk {c}: stored {stored[c]}, "
                                                f"maps name it {expect[c]} time(s)"))
        if len(bad) > 20:
            problems.append(Problem("refcount", f"... {len(bad) - 20} more chunks"))
        if stored[0] or expect[0]:
            problems.append(Problem("range", "reserved chunk 0 is referenced"))
    return problems
