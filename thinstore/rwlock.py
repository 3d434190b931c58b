"""The pool's lock: shared for reads, exclusive for everything else.

Reads (translate, pread, checksum verify) change nothing another request depends
on, and the C kernels release the GIL while they do I/O, so many reads may run at
once. Writes, management operations and commits change the maps and the space map
and must run alone.

- `lock` (the object itself) is the exclusive side, used exactly like the
  threading.RLock it replaces: `with pool.lock:`, acquire()/release(); re-entrant.
- `lock.shared` is the shared side: `with pool.lock.shared:`. Re-entrant too, and a
  thread holding the exclusive side may take it (its reads are already alone).
- Writer preference: once a writer waits, new readers wait behind it, so a stream
  of reads cannot starve writes and commits (a flush must not wait forever).
- `hooks` (None, or an object with announce, withdraw, enter and leave, each
  taking `exclusive`) hears the outermost take and release of each holder:
  announce before a thread starts to wait for a side, then enter once it has it
  (or withdraw if it gave up), leave just before it lets go. The pool's lane
  (fastlane.py) uses them to stand aside while anyone holds or waits for the
  lock.
- A thread holding only the shared side must not ask for the exclusive side: two
  such threads would each wait for the other to leave. That raises RuntimeError
  at once instead of hanging.
"""

from __future__ import annotations

import threading
import time

_ident = threading.get_ident


class RWLock:
    """See the module docstring. Invariant: `_owner` is set only while `_readers`
    is 0, and `_readers` grows only while `_owner` is None and no writer waits."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._can_read = threading.Condition(self._mutex)
        self._can_write = threading.Condition(self._mutex)
        self._readers = 0            # threads holding the shared side
        self._readers_waiting = 0
        self._writers_waiting = 0
        self._owner = None           # the thread holding the exclusive side
        self._depth = 0              # its re-entry count (shared takes included)
        self._local = threading.local()    # .n: this thread's shared depth
        self.shared = _Shared(self)
        self.hooks = None

    # ---- exclusive side (the RLock interface)
    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        me = _ident()
        if self._owner == me:
            self._depth += 1
            return True
        if getattr(self._local, "n", 0):
            raise RuntimeError("a thread holding the pool's shared lock asked for the "
                               "exclusive lock: that would deadlock")
        hooks = self.hooks
        if hooks is not None:
            hooks.announce(True)
        try:
            got = self._take(me, blocking, timeout)
        except BaseException:
            got = False
            raise
        finally:
            if not got and hooks is not None:
                hooks.withdraw(True)
        if not got:
            return False
        if hooks is not None:
            try:
                hooks.enter(True)       # ends the announce
            except BaseException:
                self._depth = 1
                self.release()
                raise
        return True

    def _take(self, me, blocking: bool, timeout: float) -> bool:
        with self._mutex:
            if self._owner is not None or self._readers:
                if not blocking:
                    return False
                self._writers_waiting += 1
                try:
                    got = self._can_write.wait_for(self._free, None if timeout < 0 else timeout)
                finally:
                    self._writers_waiting -= 1
                if not got:
                    self._wake()        # readers held back for this writer may go
                    return False
            self._owner, self._depth = me, 1
        return True

    def waiting(self) -> int:
        """Threads waiting now for either side (a count, for the commit's counters)."""
        return self._writers_waiting + self._readers_waiting

    def release(self) -> None:
        if self._owner != _ident():
            raise RuntimeError("cannot release the pool lock: this thread does not hold it")
        if self._depth == 1 and self.hooks is not None:
            try:
                self.hooks.leave(True)
            finally:
                self._let_go()
            return
        self._depth -= 1
        if not self._depth:
            self._let_go()

    def _let_go(self) -> None:
        self._depth = 0
        with self._mutex:
            self._owner = None
            self._wake()

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()

    def _free(self) -> bool:
        return self._owner is None and not self._readers

    def _wake(self) -> None:
        """With the mutex held and the lock just left: a waiting writer first."""
        if self._writers_waiting:
            self._can_write.notify()
        elif self._readers_waiting:
            self._can_read.notify_all()

    # ---- shared side
    def acquire_shared(self, timeout: float | None = None) -> bool:
        """Take the shared side; with `timeout` (seconds), give up then and return False."""
        if self._owner == _ident():
            self._depth += 1
            return True
        local = self._local
        n = getattr(local, "n", 0)
        if n:
            local.n = n + 1
            return True
        hooks = self.hooks
        if hooks is not None:
            hooks.announce(False)
        deadline = None if timeout is None else time.monotonic() + timeout
        got = False
        try:
            with self._mutex:
                while self._owner is not None or self._writers_waiting:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._readers_waiting += 1
                    try:
                        self._can_read.wait(left)
                    finally:
                        self._readers_waiting -= 1
                else:
                    self._readers += 1
                    got = True
            if not got:
                if hooks is not None:
                    hooks.withdraw(False)
                return False
        except BaseException:
            if hooks is not None:
                hooks.withdraw(False)
            raise
        local.n = 1
        if hooks is not None:
            try:
                hooks.enter(False)      # ends the announce
            except BaseException:
                self.release_shared()
                raise
        return True

    def release_shared(self) -> None:
        if self._owner == _ident():
            self._depth -= 1        # taken while exclusive: never 0 here
            return
        local = self._local
        if local.n == 1 and self.hooks is not None:
            try:
                self.hooks.leave(False)
            finally:
                self._leave_shared(local)
            return
        local.n -= 1
        if not local.n:
            self._leave_shared(local)

    def _leave_shared(self, local) -> None:
        local.n = 0
        with self._mutex:
            self._readers -= 1
            if not self._readers:
                self._wake()


class _Shared:
    """`with lock.shared:`; a separate object so the exclusive side keeps the
    plain `with lock:` form every existing caller uses."""

    __slots__ = ("_rw",)

    def __init__(self, rw: RWLock):
        self._rw = rw

    def __enter__(self):
        self._rw.acquire_shared()
        return self

    def __exit__(self, *exc) -> None:
        self._rw.release_shared()
