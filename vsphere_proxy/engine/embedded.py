"""The embedded engine: every proxy is a thread pool of this process with as many threads as its stream limit,
driven by the coordinator's events. Coordinator calls are serialized by one lock; the ledger is shared.

Streams run through a `StreamRunner` (the same code a Celery proxy worker runs). A stream without progress for
`stall_seconds` fails its attempt; the VM is stranded even if the read never returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from vsphere_proxy.coordinator import Assignment, Coordinator, JobReport
from vsphere_proxy.engine.session import Preparer
from vsphere_proxy.engine.streams import Attempt, AttemptEnd, StreamResult, StreamRunner

__all__ = ["AttemptEnd", "EmbeddedEngine"]

log = logging.getLogger(__name__)


class EmbeddedEngine:
    name = "embedded"

    def __init__(self, preparer: Preparer, *, stall_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, tick: float = 0.5,
                 on_end: Callable[[AttemptEnd], None] | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None,
                 on_start: Callable[[Assignment], None] | None = None,
                 throttle: Mapping[str, float] | None = None,
                 on_stream: Callable[[Assignment, StreamResult], None] | None = None) -> None:
        self.preparer = preparer
        self.stall_seconds = stall_seconds
        self.clock = clock
        self.tick = tick
        self.on_end = on_end
        self.on_progress = on_progress  # (vm, disk, bytes) after every block
        self.on_start = on_start  # every assignment that opens an attempt, before it runs
        self.throttle = dict(throttle or {})  # proxy -> the most bytes per second one of its streams reads
        self.on_stream = on_stream  # every stream as it ends: when it ran, what it read (the window's bars)

    def run(self, coordinator: Coordinator) -> JobReport:
        lock = threading.RLock()
        finished = threading.Event()
        progress = self.on_progress
        runner = StreamRunner(self.preparer, clock=self.clock, throttle=self.throttle, ready_timeout=self.stall_seconds,
                              on_progress=(lambda a, pos: progress(a.vm, a.disk, pos)) if progress else None)
        pools = {name: ThreadPoolExecutor(max_workers=max(1, limit), thread_name_prefix=f"proxy-{name}")
                 for name, limit in coordinator.limits.items()}

        def submit(assignments: Iterable[Assignment]) -> None:
            for a in assignments:
                if a.opens and self.on_start is not None:
                    self.on_start(a)
                pools[a.proxy].submit(stream, a, runner.admit(a))
            if coordinator.done:
                finished.set()

        def ended(end: AttemptEnd) -> None:
            with lock:
                following = coordinator.on_complete(end.vm, end.ok, end.error, attempt=end.attempt)
                if self.on_end is not None:  # after the coordinator took it in: the VM's new state is readable
                    try:
                        self.on_end(end)
                    except Exception:  # a failing observer must not lose the VM's outcome for the coordinator
                        log.exception("reporting the end of %s attempt %d failed", end.vm, end.attempt)
                submit(following)

        def stream(a: Assignment, at: Attempt) -> None:
            result: StreamResult = runner.run(a, at)
            if self.on_stream is not None:
                try:
                    self.on_stream(a, result)
                except Exception:
                    log.exception("recording stream %s failed", a.stream)
            if result.disk_done:
                with lock:
                    submit(coordinator.on_disk_done(a.vm, a.disk, a.attempt))
            if result.end is not None:
                ended(result.end)

        try:
            with lock:
                submit(coordinator.start())
            while not finished.wait(self.tick):
                for at, why in runner.stalled(self.stall_seconds):
                    end = runner.end((at.job, at.vm, at.attempt), why)
                    if end is not None:
                        ended(end)
                with lock:
                    if coordinator.done:
                        finished.set()
        finally:
            for pool in pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
        return coordinator.report()
