"""A hypothesis state machine: the pool against a plain model of each device's bytes."""

import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (Bundle, RuleBasedStateMachine, consumes, invariant,
                                 rule)

from thinstore import Pool
from thinstore.check import check_pool

CS = 4096
SIZE = 520 * CS + 1000          # two map pages (508 entries each) and a partial last chunk
CAPACITY = 4096 * CS            # never fills: fullness has its own test
# writes land near the start, across the first page boundary, and at the partial end
WINDOWS = [(0, 8 * CS), (500 * CS, SIZE)]

offsets = st.one_of(st.integers(0, 3 * CS), st.integers(503 * CS, SIZE - 1))
lengths = st.integers(0, 5 * CS)


class PoolModel(RuleBasedStateMachine):
    writable = Bundle("writable")
    snapshots = Bundle("snapshots")

    def __init__(self):
        super().__init__()
        self.dir = tempfile.mkdtemp()
        self.path = self.dir + "/pool"
        self.pool = Pool.create(self.path, CAPACITY, CS, commit_interval=0)
        self.model: dict[str, bytearray] = {}
        self.counter = 0

    def _name(self, prefix):
        self.counter += 1
        return f"{prefix}{self.counter}"

    @rule(target=writable)
    def create(self):
        name = self._name("v")
        self.pool.create_volume(name, SIZE)
        self.model[name] = bytearray(SIZE)
        return name

    @rule(name=writable, off=offsets, n=lengths, seed=st.integers(0, 255))
    def write(self, name, off, n, seed):
        if name not in self.model:
            return
        n = min(n, SIZE - off)
        data = bytes((seed + i) % 251 + (seed % 2) for i in range(n)) if seed % 5 else bytes(n)
        with self.pool.open_device(name) as dev:
            dev.pwrite(data, off)
        self.model[name][off:off + n] = data

    @rule(name=writable, off=offsets, n=lengths, no_hole=st.booleans(), discard=st.booleans())
    def zero(self, name, off, n, no_hole, discard):
        if name not in self.model:
            return
        n = min(n, SIZE - off)
        with self.pool.open_device(name) as dev:
            if discard:
                dev.discard(off, n)
            else:
                dev.write_zeroes(off, n, no_hole=no_hole)
        self.model[name][off:off + n] = bytes(n)

    @rule(target=snapshots, name=writable)
    def snapshot(self, name):
        if name not in self.model:
            return "none@none"
        snap = f"{name}@{self._name('s')}"
        self.pool.snapshot(snap)
        self.model[snap] = bytearray(self.model[name])
        return snap

    @rule(target=writable, snap=snapshots)
    def clone(self, snap):
        if snap not in self.model:
            return "none"
        name = self._name("c")
        self.pool.clone(snap, name)
        self.model[name] = bytearray(self.model[snap])
        return name

    @rule(name=consumes(writable))
    def destroy_writable(self, name):
        self._destroy(name)

    @rule(snap=consumes(snapshots))
    def destroy_snapshot(self, snap):
        self._destroy(snap)

    def _destroy(self, name):
        if name in self.model:
            self.pool.destroy(name)
            del self.model[name]

    @rule(snap=snapshots)
    def rollback(self, snap):
        vol = snap.split("@")[0]
        if snap in self.model and vol in self.model:
            self.pool.rollback(snap)
            self.model[vol] = bytearray(self.model[snap])

    @rule()
    def flush(self):
        self.pool.commit()

    @rule()
    def reopen(self):
        self.pool.close()
        self.pool = Pool.open(self.path, commit_interval=0)

    @invariant()
    def reads_match_model(self):
        for name, data in self.model.items():
            with self.pool.open_device(name) as dev:
                for lo, hi in WINDOWS:
                    assert dev.pread(lo, hi - lo) == bytes(data[lo:hi]), name

    @invariant()
    def refcounts_match_maps(self):
        assert check_pool(self.pool) == []

    def teardown(self):
        try:
            for name in list(self.model):
                self._destroy(name)
            self.pool.commit()
            assert self.pool.md.space.used() == 0
            assert int(self.pool.md.maps.ref.sum()) == 0
            self.pool.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


PoolModel.TestCase.settings = settings(max_examples=int(__import__('os').environ.get('THINSTORE_STATEFUL_EXAMPLES', 60)), stateful_step_count=30, deadline=None,
                                       suppress_health_check=list(HealthCheck))
TestPoolModel = PoolModel.TestCase
