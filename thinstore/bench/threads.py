"""The built-in engines: ``io_depth`` threads, each with one request in flight.

``direct`` shares one :class:`thinstore.Device` handle between the threads
(the native lane releases the GIL, so they run in parallel); ``client`` gives
each thread its own NBD connection (:class:`thinstore.nbd.client.NBDDevice`),
the way a multi-queue initiator would.  Both time each request with
``perf_counter_ns`` and record it in the thread's :class:`Recorder`.
"""

from __future__ import annotations

import itertools
import os
import random
import threading
import time

from thinstore.bench.results import Recorder, summarise
from thinstore.errors import UsageError


class ThreadedRun:
    """Run ``workload`` against a device of ``size`` bytes.

    ``open_handle()`` returns the handle a thread uses (pread/readinto/pwrite/
    flush/close; closing a shared handle is the caller's business when
    ``shared``).  ``run()`` returns the result dict of
    :mod:`thinstore.bench.results`; the first exception of any thread is raised.
    """

    def __init__(self, open_handle, size: int, workload, engine: str, shared: bool = False):
        self.open_handle, self.size, self.w = open_handle, size, workload
        self.engine, self.shared = engine, shared
        self.blocks = size // workload.io_size
        if self.blocks < 1:
            raise UsageError(f"io size {workload.io_size} is larger than the device ({size})")
        self.recorders = [Recorder() for _ in range(workload.io_depth)]
        self._issued = itertools.count()
        self._ramped = itertools.count()      # requests of the ramp: run, not measured
        self._limit = workload.io_total // workload.io_size if workload.io_total else None
        self._stop = threading.Event()
        self._errors: list[BaseException] = []

    def ops_done(self) -> int:
        """Requests completed so far (for the progress line)."""
        return sum(r.ops for r in self.recorders)

    def run(self) -> dict:
        handles = [self.open_handle() for _ in range(1 if self.shared else self.w.io_depth)]
        try:
            threads = [threading.Thread(target=self._worker, name=f"bench-{i}",
                                        args=(handles[0 if self.shared else i], rec, i))
                       for i, rec in enumerate(self.recorders)]
            self._start_ns = time.perf_counter_ns() + int(self.w.ramp * 1e9)  # measured from
            self._deadline = self._start_ns + int(self.w.seconds * 1e9) if self.w.seconds else None
            for t in threads:
                t.start()
            try:
                for t in threads:
                    t.join()
            except BaseException:          # Ctrl-C: stop the streams before the handles go
                self._stop.set()
                for t in threads:
                    t.join()
                raise
            elapsed = (time.perf_counter_ns() - self._start_ns) / 1e9
        finally:
            for handle in handles:
                handle.close()
        if self._errors:
            raise self._errors[0]
        return summarise(self.recorders, elapsed, self.w.io_size, self.engine)

    def stop(self) -> None:
        self._stop.set()

    def _worker(self, handle, rec: Recorder, index: int) -> None:
        try:
            self._loop(handle, rec, random.Random(index * 7919 + os.getpid()))
        except BaseException as exc:     # surfaced by run(); the others stop too
            self._errors.append(exc)
            self._stop.set()

    def _loop(self, handle, rec: Recorder, rng: random.Random) -> None:
        w, size, blocks = self.w, self.w.io_size, self.blocks
        buf, data = bytearray(size), os.urandom(size)   # random: zero detection would skip zeros
        mix = {"read": 0.0, "write": 1.0, "readwrite": 0.5}[w.io_type]
        rand, every, fua = w.io_pattern == "rand", w.flush_every, w.fua
        limit, deadline, start, clock = self._limit, self._deadline, self._start_ns, \
            time.perf_counter_ns
        writes, ramping = 0, clock() < start
        while not self._stop.is_set():
            if ramping and clock() >= start:
                ramping = False
            n = next(self._ramped if ramping else self._issued)
            if limit is not None and n >= limit and not ramping:
                return
            offset = (rng.randrange(blocks) if rand else n % blocks) * size
            is_write = mix == 1.0 or (0 < mix and rng.random() < mix)
            t0 = clock()
            if is_write:
                handle.pwrite(data, offset, fua)
            else:
                handle.readinto(buf, offset)
            t1 = clock()
            if not ramping:
                rec.lat[is_write].append(t1 - t0)
                rec.end[is_write].append(t1 - start)
                rec.ops += 1
            if is_write:
                writes += 1
                if every and writes % every == 0:
                    handle.flush()
                    if not ramping:
                        rec.flush_lat.append(clock() - t1)
            if deadline is not None and t1 >= deadline:
                return
