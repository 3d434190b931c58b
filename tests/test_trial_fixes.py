"""What a fresh-user trial found (names, sizes, the pool lock, notes), tried from the CLI
the way a user types it."""

from __future__ import annotations

import os
import shutil

import pytest

from thinstore import Pool
from hardening_helpers import K, M, fails, out, short_dir, ts

CHUNK = 64 * K


@pytest.fixture
def pool():
    """A pool of 64M with volume v and its snapshot v@a, made in-process."""
    d = short_dir()
    path = os.path.join(d, "pool")
    with Pool.create(path, 64 * M, CHUNK, commit_interval=0) as p:
        p.create_volume("v", 16 * M)
        p.snapshot("v@a")
    yield path
    shutil.rmtree(d, ignore_errors=True)


# the notes after destroy ---------------------------------------------------------------
def test_the_note_after_destroy_speaks_of_one_snapshot_as_one(pool):
    r = ts("destroy", "v", pool=pool)
    assert r.returncode == 0
    assert r.stderr.decode() == ("thinstore: note: 1 snapshot of 'v' remains (v@a); it is "
                                 "whole on its own: destroy it with 'thinstore destroy v@a'\n")


def test_the_note_after_destroy_speaks_of_several_clones_as_several(pool):
    out("clone", "v@a", "c1", pool=pool)
    out("clone", "v@a", "c2", pool=pool)
    r = ts("destroy", "v@a", pool=pool)
    assert r.returncode == 0
    assert r.stderr.decode() == ("thinstore: note: 2 clones of 'v@a' remain (c1, c2); they "
                                 "are whole on their own: destroy them with 'thinstore "
                                 "destroy c1' and so on\n")
