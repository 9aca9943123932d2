"""The embedded engine: every proxy is a thread pool of this process with as many threads as its stream limit,
driven by the coordinator's events. Coordinator calls are serialized by one lock; the ledger is shared. Every
`tick` the engine looks at the other jobs' streams in the ledger (other processes', with `SqliteLedger`): when one
was given back or stopped counting on a datastore, the coordinator is told (`on_released`) and starts what fits.

Streams run through a `StreamRunner` (the same code a Celery proxy worker runs). A stream without progress for
`stall_seconds` fails its attempt; the VM is stranded even if the read never returns.

The job always ends, and never by a hang (DESIGN §9). It ends early, every VM not backed up failed with the
reason, when:
- an attempt meets a fault that no other attempt could escape (`vsphere_proxy.faults.JobFault`: vCenter did not
  answer, the repository is full);
- anything raises in the engine, an observer or a recorder (a catalog write on a full disk): the error is the
  reason, never lost in a pool thread;
- the coordinator made no progress for `stall_seconds` while no stream ran, its own or another job's (the
  watchdog; waiting for another job to give streams back is not a stall);
- `stop` is called (a signal): the job ends `interrupted`.
Ending early stops scheduling, stops every stream at its next block (hot-added disks are detached as streams
leave), waits at most `grace` seconds for them, then finishes every open attempt (points dropped, snapshots
removed) and reports those ends.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor

from vsphere_proxy.coordinator import Assignment, Coordinator, JobReport
from vsphere_proxy.engine.events import AttemptEnd, Stop, StreamResult
from vsphere_proxy.engine.protocol import JobObserver, Observer
from vsphere_proxy.engine.session import Preparer
from vsphere_proxy.engine.streams import Attempt, StreamRunner
from vsphere_proxy.ledger import Stream

__all__ = ["AttemptEnd", "EmbeddedEngine", "Stop"]

log = logging.getLogger(__name__)


def describe(exc: BaseException) -> str:
    """One line for an unexpected error: its type and first line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class EmbeddedEngine:
    name = "embedded"

    def __init__(self, preparer: Preparer, *, stall_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, tick: float = 0.5, grace: float = 30.0,
                 throttle: Mapping[str, float] | None = None) -> None:
        self.preparer = preparer
        self.stall_seconds = stall_seconds
        self.clock = clock
        self.tick = tick
        self.grace = grace  # how long an ending job waits for its streams to leave before finishing attempts
        self.throttle = dict(throttle or {})  # proxy -> the most bytes per second one of its streams reads
        self.stopped: Stop | None = None  # why the job ended early, once it did
        self._stop: Stop | None = None
        self._wake = threading.Event()
        self._streams = threading.Condition()  # streams still in their thread, their results not yet reported
        self._running = 0

    def stop(self, reason: str, status: str = "interrupted") -> None:
        """End the running job as soon as possible (safe from a signal handler: it only records and wakes)."""
        if self._stop is None:
            self._stop = Stop(reason, status)
        self._wake.set()

    def run(self, coordinator: Coordinator, observer: JobObserver | None = None) -> JobReport:
        watch: JobObserver = observer or Observer()
        lock = threading.RLock()
        moved = [self.clock()]  # when the job last moved: an event, a block read

        def on_block(a: Assignment, pos: int) -> None:
            moved[0] = self.clock()
            watch.block_read(a.vm, a.disk, pos)

        runner = StreamRunner(self.preparer, clock=self.clock, throttle=self.throttle, ready_timeout=self.stall_seconds,
                              on_progress=on_block)
        pools = {name: ThreadPoolExecutor(max_workers=max(1, limit), thread_name_prefix=f"proxy-{name}")
                 for name, limit in coordinator.limits.items()}
        errors: list[BaseException] = []  # raised where nobody waits for them: the job ends on the first

        def fatal(exc: BaseException, where: str) -> None:
            log.error("%s failed: %s", where, describe(exc), exc_info=exc)
            errors.append(exc)
            self._wake.set()

        def submit(assignments: Iterable[Assignment]) -> None:
            for a in assignments:
                if self._stop is not None or errors or runner.fault is not None:
                    return  # the job is ending: nothing new starts
                if a.opens:
                    watch.assignment_started(a)
                    watch.states_changed(coordinator, (a.vm,))
                pools[a.proxy].submit(stream, a, runner.admit(a))
            if coordinator.done:
                self._wake.set()

        def ended(end: AttemptEnd) -> None:
            with lock:
                moved[0] = self.clock()
                following = coordinator.on_complete(end.vm, end.ok, end.error, attempt=end.attempt, final=end.final)
                watch.attempt_ended(end)  # after the coordinator took it in: the VM's new state is readable
                watch.states_changed(coordinator, (end.vm,))
                submit(following)

        def stream(a: Assignment, at: Attempt) -> None:
            with self._streams:
                self._running += 1
            try:
                result: StreamResult = runner.run(a, at)
                watch.stream_ended(a, result)
                if result.disk_done:
                    with lock:
                        moved[0] = self.clock()
                        submit(coordinator.on_disk_done(a.vm, a.disk, a.attempt))
                if result.end is not None:
                    ended(result.end)
            except BaseException as e:
                fatal(e, f"stream {a.stream}")
            finally:
                with self._streams:
                    self._running -= 1
                    self._streams.notify_all()

        others: set[Stream] = set()  # the other jobs' streams in the ledger at the last tick

        def others_now() -> set[Stream]:
            return {s for s in coordinator.ledger.streams() if s.job != coordinator.job.id}

        def why_stop() -> Stop | None:
            if self._stop is not None:
                return self._stop
            if runner.fault is not None:
                return Stop(str(runner.fault))
            if errors:
                return Stop(f"the job could not go on: {describe(errors[0])}")
            idle = self.clock() - moved[0]
            if not coordinator.done and not runner.busy() and idle > self.stall_seconds and not others:
                return Stop(f"the coordinator made no progress for {idle:.0f} s while no stream ran "
                            f"(stall limit {self.stall_seconds:g} s)")
            return None

        try:
            try:
                with lock:
                    watch.states_changed(coordinator, [vm.name for vm in coordinator.job.vms])
                    others = others_now()  # before the first pass: a stream given back before the first tick counts
                    submit(coordinator.start())
            except BaseException as e:
                fatal(e, "starting the job")
            while True:
                self._wake.wait(self.tick)
                self._wake.clear()
                stop = why_stop()
                if stop is not None:
                    self._end_early(coordinator, runner, lock, stop, watch)
                    break
                for at, why in runner.stalled(self.stall_seconds):
                    end = runner.end((at.job, at.vm, at.attempt), why)
                    if end is not None:
                        try:
                            ended(end)
                        except BaseException as e:
                            fatal(e, f"ending {at.vm} attempt {at.attempt}")
                with lock:
                    if coordinator.done and not runner.busy():
                        break
                    try:
                        now = others_now()
                        if others - now and not coordinator.done:  # another job gave a stream back, or a
                            submit(coordinator.on_released())     # datastore: ours to use
                        others = now
                    except BaseException as e:
                        fatal(e, "reading the ledger")
        finally:
            for pool in pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
        return coordinator.report()

    def _end_early(self, coordinator: Coordinator, runner: StreamRunner, lock: threading.RLock, stop: Stop,
                   watch: JobObserver) -> None:
        """Stop scheduling, fail what is left with the reason, let the streams leave, finish their attempts."""
        self.stopped = stop
        deadline = self.clock() + self.grace
        log.warning("job %s ends %s: %s", coordinator.job.id, stop.status, stop.reason)
        with lock:
            coordinator.abort(stop.reason, status=stop.status)
        for end in runner.end_all(stop.reason, self.grace):
            try:
                watch.attempt_ended(end)
            except Exception:  # the job is already ending with a reason: keep finishing the others
                log.exception("reporting the end of %s attempt %d failed", end.vm, end.attempt)
        until = time.monotonic() + max(1.0, deadline - self.clock())  # an attempt that ended on its own stream
        with self._streams:                                           # is reported before the job's end
            while self._running and time.monotonic() < until:
                self._streams.wait(max(0.0, until - time.monotonic()))
        try:
            watch.states_changed(coordinator, [vm.name for vm in coordinator.job.vms])
        except Exception:
            log.exception("reporting the VMs' states of job %s failed", coordinator.job.id)
