"""Mounts that may take longer than Docker waits for them.

dockerd gives a volume plugin's Mount (and Create) 2 minutes, its other calls 1 minute
(moby, volume/drivers/proxy.go: ``longTimeout``, ``shortTimeout``, set per request by
``plugins.WithRequestTimeout``).  When the time is up it cancels the HTTP request and
fails the container's start with "context deadline exceeded"; the plugin client retries
a failed request only within the first 30 s of a call (pkg/plugins/client.go), so a
timed-out Mount is not retried, and Docker never sends an Unmount for a mount ID whose
Mount failed.  A fresh Mount that makes a large file system (mkfs of a big thin volume
writes gigabytes of metadata), or checks and grows one (e2fsck + resize2fs of a clone
made larger), can take longer than that.

If that mount were cut short, the next attempt would start over and take as long again;
if it were simply left to finish after Docker gave up, its hold (the mount ID) would
never be released, and the volume would stay mounted and "in use" for ever.  Instead
:meth:`MountJobs.run` runs the mount in a thread and waits at most ``wait`` seconds
(below Docker's 120): a mount done by then is answered as usual; one still running goes
on in the background, the request gets a clear Err (the volume is being prepared: start
the container again shortly), and when the mount finishes its hold is released (the
volume is unmounted: it is formatted or grown, ready, and free).  The next Mount of the
volume waits for a job still running (within its own wait), then mounts at once.  The
mkfs itself is not cut short; the attach module still bounds each command (600 s).
"""

from __future__ import annotations

import logging
import threading
import time

from thinstore.errors import ThinstoreError

log = logging.getLogger("thinstore.docker")

#: seconds a Mount waits for its job before answering "still being prepared"; dockerd
#: waits 120 s for a Mount (longTimeout), so the answer arrives before it gives up
DEFAULT_WAIT = 100.0


class StillPreparing(ThinstoreError):
    """The mount goes on in the background after the request's wait ran out."""


class _Job:
    def __init__(self, owner: str):
        self.owner = owner
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.abandoned = False
        self.result: str | None = None
        self.error: BaseException | None = None


class MountJobs:
    """One background mount per volume at a time; thread-safe."""

    def __init__(self, wait: float = DEFAULT_WAIT):
        self.wait = wait
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}

    def run(self, name: str, owner: str, mount, release) -> str:
        """``mount()`` (-> mount point) for ``owner`` within :attr:`wait` seconds, after
        any mount of ``name`` still running; :class:`StillPreparing` if that is not
        done in time, and then ``release()`` once ``mount()`` has succeeded."""
        deadline = time.monotonic() + self.wait
        with self._lock:
            earlier = self._jobs.get(name)
        if earlier is not None and not earlier.done.wait(max(0.0, deadline - time.monotonic())):
            raise StillPreparing(self._words(name))
        job = _Job(owner)
        with self._lock:
            self._jobs[name] = job
        threading.Thread(target=self._work, args=(name, job, mount, release), daemon=True,
                         name=f"thinstore-docker-mount-{name}").start()
        if not job.done.wait(max(0.0, deadline - time.monotonic())):
            with job.lock:
                if not job.done.is_set():
                    job.abandoned = True
                    log.warning("docker plugin: mounting %s takes longer than %g s: it goes "
                                "on in the background (Docker mount %s is answered now)",
                                name, self.wait, owner[:12])
                    raise StillPreparing(self._words(name))
        if job.error is not None:
            raise job.error
        return job.result

    def _words(self, name: str) -> str:
        return (f"{name!r} is still being prepared (its file system is being made or "
                f"grown, which takes longer than the {self.wait:g} s this plugin answers "
                "within: Docker waits 120 s for a Mount); it goes on in the background "
                "and the volume stays usable: start the container again in a minute")

    def _work(self, name: str, job: _Job, mount, release) -> None:
        try:
            job.result = mount()
        except BaseException as exc:          # handed to the request, or logged below
            job.error = exc
        with job.lock:
            job.done.set()
            abandoned = job.abandoned
        with self._lock:
            if self._jobs.get(name) is job:
                del self._jobs[name]
        if not abandoned:
            return
        if job.error is not None:
            log.warning("docker plugin: the background mount of %s failed: %s", name,
                        job.error)
            return
        try:
            release()
            log.warning("docker plugin: %s is prepared (its background mount is done and "
                        "released): its next Mount is quick", name)
        except ThinstoreError as exc:
            log.warning("docker plugin: releasing the background mount of %s: %s", name, exc)
