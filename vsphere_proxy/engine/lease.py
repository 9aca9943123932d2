"""A running job's liveness lease, kept alive by a background thread (DESIGN §9).

While its coordinator runs, a job renews its lease (in the catalog, and in Redis for the distributed engine);
another job sweeps a snapshot or a hot-added disk only when the job that made it no longer holds its lease. A
keeper that cannot renew for most of the lease's length, or that finds the lease taken by another coordinator,
tells the job, which then ends: it can no longer prove it is alive, so what it owns may be swept under it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class LeaseKeeper:
    """Calls `renew()` every `every` seconds until stopped; `on_lost(reason)` once when the lease is lost."""

    def __init__(self, renew: Callable[[], bool], *, every: float, lease_seconds: float,
                 on_lost: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.renew = renew
        self.every = every
        self.lease_seconds = lease_seconds
        self.on_lost = on_lost
        self.clock = clock
        self.lost = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="job-lease", daemon=True)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(self.every + 1)

    def _loop(self) -> None:
        renewed = self.clock()
        while not self._stop.wait(self.every):
            try:
                held = self.renew()
            except Exception as e:  # the catalog is down or full: try again until the lease would run out
                log.warning("renewing the job's lease failed: %s", e)
                if self.clock() - renewed > self.lease_seconds * 2 / 3:
                    self._lose(f"the job's liveness lease could not be renewed for {self.clock() - renewed:.0f} s "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
                    return
                continue
            if not held:
                self._lose("another coordinator took the job over (its liveness lease is no longer ours)")
                return
            renewed = self.clock()

    def _lose(self, reason: str) -> None:
        self.lost = reason
        log.error("%s", reason)
        self.on_lost(reason)
