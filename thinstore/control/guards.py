"""The management ops the control server guards with what its frontends know.

Destroy, rollback, rename and a shrink change what a device's users see, so the server
refuses them while the device is in use: open NBD connections (``sessions``), and
whatever a frontend holds, asked through ``busy_reasons`` (a Docker mount, a CSI
stage), whose reason is told in that user's words. A forced destroy drops the
connections and tells who lost the device. A snapshot runs inside every
``snapshot_hooks`` context (a frontend freezes the file system it mounted). This is a
mixin of ControlServer: it uses its ``pool``, ``sessions``, ``readers``,
``busy_reasons``, ``snapshot_hooks`` and ``holds()``; the plain Pool methods do the work.

Before any of that, a device a frontend *holds* (its records name it: a Docker volume, a
containerd layer, a CSI volume or snapshot; thinstore/frontends/holds.py) is refused
those operations whether or not anyone has it open, with DeviceBusy naming the holder;
``destroy --force`` overrides only a hold that says it may (Docker's).
"""

from __future__ import annotations

import contextlib
import inspect
import time

from thinstore.errors import DeviceBusy

RELEASE_POLLS = 50        # x 0.1 s: connections of a hold a frontend let go of may end


class Guards:
    """ControlServer's guarded management ops (see the module docstring)."""

    def refuse_held(self, name: str, op: str, force: bool = False):
        """DeviceBusy if a frontend's hold on ``name`` refuses ``op`` (of holds.ALL_OPS;
        ``force`` overrides a hold that allows it); else the overridden hold or None.
        Also for online.py's receive."""
        from thinstore.frontends.holds import blocking
        hold = blocking(self.holds(), name, op)
        if hold is not None and not (force and hold.forceable):
            raise DeviceBusy(hold.refusal(op))
        return hold

    def _op_destroy(self, name: str, force: bool = False):
        self.pool.info(name)              # a missing device is "no such device", not held
        hold = self.refuse_held(name, "destroy", force)
        if self.readers.get(name):        # its chunks must not be reused under a reader
            raise DeviceBusy(f"{name!r} is being read by an online send: "
                             "wait for it to finish (even --force waits)")
        busy, reason = self._in_use(name) if not force else (self._connections(name), None)
        if busy and not force:
            raise DeviceBusy(reason or
                             f"{name!r} has {busy} open NBD connection(s): disconnect the "
                             "clients first, or destroy with force=True to drop them")
        if busy:
            self.sessions.disconnect(name)
        self.pool.destroy(name, force=force)
        if not busy and hold is None:
            return None
        # what the force cut off, for the caller to warn of
        return {"dropped": busy, "users": self._forced_users(name) if busy else [],
                "held": hold.describe() if hold is not None else None}

    def _forced_users(self, name: str) -> list[str]:
        """After a forced destroy of busy `name`: the ``busy_reasons`` hooks that take
        ``forced`` let go of their holds of it and say who lost it, in their words."""
        users = []
        for hook in list(self.busy_reasons):
            if "forced" in inspect.signature(hook).parameters:
                answer = hook(name, forced=True)
                if isinstance(answer, str) and answer:
                    users.append(answer)
        return users

    def _op_snapshot(self, name: str):
        """The snapshot inside every hook of ``snapshot_hooks`` (outermost first)."""
        with contextlib.ExitStack() as hooks:
            for hook in list(self.snapshot_hooks):
                hooks.enter_context(hook(name))
            return self.pool.snapshot(name)

    def _op_rollback(self, snapshot: str):
        """Refused while clients use the volume: its content would change under them."""
        volume = snapshot.split("@", 1)[0]
        self.pool.info(snapshot)          # a missing snapshot is "no such device", not busy
        self.refuse_held(volume, "rollback")
        busy, reason = self._in_use(volume)
        if busy:
            raise DeviceBusy(reason or
                             f"{volume!r} has {busy} open NBD connection(s): disconnect the "
                             "clients before rolling it back")
        return self.pool.rollback(snapshot)

    def _op_rename(self, old: str, new: str):
        """Refused while clients use the device, or a snapshot that follows it: what
        attached it (a Docker or containerd mount, a CSI stage, an nbdfuse file) keeps
        using it by its old name, so a mount would outlive its unmount and the renamed
        device could be mounted a second time beside it."""
        info = self.pool.info(old)       # a missing device is "no such device", not busy
        names = [old] + ([] if info.kind == "snapshot" else
                         [d.name for d in self.pool.list() if d.name.startswith(old + "@")])
        for name in names:
            self.refuse_held(name, "rename")
        for name in names:
            busy, reason = self._in_use(name)
            if busy:
                raise DeviceBusy(reason or f"{name!r} has {busy} open NBD connection(s): "
                                 f"disconnect the clients before renaming {old!r}")
        return self.pool.rename(old, new)

    def _op_resize(self, name: str, size: int, shrink: bool = False):
        """A shrink is refused while clients use the device, as a rollback is: the end
        of what they see would vanish under them (a grow is not: it only adds)."""
        if shrink and size < self.pool.info(name).size:
            self.refuse_held(name, "shrink")
            busy, reason = self._in_use(name)
            if busy:
                raise DeviceBusy(reason or f"{name!r} has {busy} open NBD connection(s): "
                                 "disconnect the clients before shrinking it")
        return self.pool.resize(name, size, shrink=shrink)

    def _connections(self, name: str) -> int:
        return self.sessions.connections(name) if self.sessions else 0

    def _in_use(self, name: str) -> tuple[int, str | None]:
        """(open NBD connections, a ``busy_reasons`` hook's reason or None).  A hook that
        answers True let go of a hold of its own: its connections get RELEASE_POLLS x 0.1 s
        to end."""
        busy = self._connections(name)
        answers = [hook(name) for hook in list(self.busy_reasons)] if busy else []
        reason = next((a for a in answers if isinstance(a, str) and a), None)
        if busy and not reason and True in answers:
            for _ in range(RELEASE_POLLS):
                time.sleep(0.1)
                busy = self._connections(name)
                if not busy:
                    break
        return busy, reason
