"""Streams of VM attempts, executed: what the embedded engine's threads and a Celery proxy worker both run.

A stream reads one disk of one VM attempt through the attempt's transport into the attempt's sink, block by
block. The first stream of an attempt prepares it (snapshot); its other streams wait for that. An attempt ends
when all its disks are read (finish ok) or when a stream fails (the others stop at their next block; when none
is left, finish not ok). Ending always runs the session's `finish`, which removes the snapshot. The caller turns
each `StreamResult` into the coordinator's events: `disk_done` -> `on_disk_done`, `end` -> `on_complete`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.engine.events import AttemptEnd, StreamResult
from vsphere_proxy.engine.session import Finished, Preparer, VmSession
from vsphere_proxy.faults import JobFault, Unresponsive, VmFault
from vsphere_proxy.transports import read_blocks

log = logging.getLogger(__name__)

AttemptKey = tuple[str, str, int]  # job, vm, attempt
CLOSED_KEPT = 10_000  # ended attempts remembered, so that a stream handed out as one ended does not wait for it


class _Aborted(Exception):
    pass


@dataclass
class Attempt:
    """One VM attempt while its streams run."""

    job: str
    vm: str
    attempt: int
    proxy: str
    mode: str
    round: int
    disk_count: int
    started: float
    session: VmSession | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: str = ""
    inflight: int = 0
    disks_read: int = 0
    bytes_read: int = 0
    last_progress: dict[str, float] = field(default_factory=dict)  # stream -> clock
    streams: set[str] = field(default_factory=set)  # every stream the attempt was given
    idle_since: float | None = None  # no stream in flight since then
    ended: bool = False
    fault: str = ""  # the job-ending fault this attempt met, if any
    final: bool = False  # it met a fault that ends its VM for the job (no later round tries it)
    left: list[str] = field(default_factory=list)  # what it may have left in vCenter, beyond its session's own


class StreamRunner:
    """Runs streams of attempts against a `Preparer`; keeps the attempts until they end."""

    def __init__(self, preparer: Preparer, *, clock: Callable[[], float] = time.monotonic,
                 on_progress: Callable[[Assignment, int], None] | None = None,
                 ready_timeout: float | None = None, throttle: Mapping[str, float] | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 confirm: Callable[[str], bool] | None = None) -> None:
        self.preparer = preparer
        self.clock = clock
        self.on_progress = on_progress  # (assignment, position) after every block
        self.ready_timeout = ready_timeout  # how long a stream waits for its attempt's snapshot
        self.throttle = dict(throttle or {})  # proxy -> the most bytes per second one of its streams reads
        self.sleep = sleep
        self.confirm = confirm  # (stream) -> still ours? asked before a restore point is committed
        self.lock = threading.RLock()
        self.attempts: dict[AttemptKey, Attempt] = {}
        self.closed: OrderedDict[AttemptKey, None] = OrderedDict()  # recently ended: late streams find them
        self.fault: JobFault | None = None  # the first fault met that ends the whole job

    @staticmethod
    def _left(at: Attempt, exc: BaseException) -> None:
        """What a failure says it left in vCenter (`left_behind` on the exception) goes to the attempt's end."""
        left = getattr(exc, "left_behind", "")
        if isinstance(left, str) and left:
            at.left.append(left)

    def _met(self, at: Attempt, exc: BaseException) -> None:
        """Keep a job-ending fault (the engine ends the job on it); other errors only fail the attempt."""
        if isinstance(exc, VmFault):
            at.final = True
        if isinstance(exc, JobFault):
            at.fault = at.fault or str(exc)
            with self.lock:
                if self.fault is None:
                    self.fault = exc

    def admit(self, a: Assignment) -> Attempt:
        """Count `a` as in flight (before it runs, so that queued streams are watched too)."""
        key = (a.job, a.vm, a.attempt)
        with self.lock:
            at = self.attempts.get(key)
            if at is None and key in self.closed:  # a stream handed out as its attempt ended: it stops at once
                at = Attempt(a.job, a.vm, a.attempt, a.proxy, a.mode, a.round, a.disk_count, self.clock(),
                             error="the attempt already ended", ended=True)
                at.ready.set()
            if at is None:
                at = self.attempts[key] = Attempt(a.job, a.vm, a.attempt, a.proxy, a.mode, a.round, a.disk_count,
                                                  self.clock())
            at.inflight += 1
            at.idle_since = None
            at.streams.add(a.stream)
            at.last_progress[a.stream] = self.clock()
        return at

    def run(self, a: Assignment, at: Attempt | None = None) -> StreamResult:
        """Read `a`'s disk; end the attempt when this stream is its last."""
        if at is None:
            at = self.admit(a)
        ok = own_failure = False
        began, moved_total = time.time(), 0
        try:
            if at.ended:
                raise _Aborted
            if a.opens:
                try:
                    session = self.preparer.prepare(a)
                except Exception as e:
                    own_failure = True
                    self._met(at, e)
                    self._left(at, e)
                    if isinstance(e, Unresponsive) and not getattr(e, "left_behind", ""):
                        at.left.append(f"a snapshot of {a.vm} may have been made: its creation got no answer "
                                       f"({e})")
                    at.error = at.error or f"preparing {a.vm} on {a.proxy} failed: {e}"
                    raise _Aborted from None
                with self.lock:
                    late = at.ended  # ended (stalled, abandoned) while the snapshot was being taken
                    at.session = None if late else session
                if late:
                    self._discard(session, at)
                    raise _Aborted
            elif not at.ready.wait(self.ready_timeout):
                at.error = at.error or f"{a.vm} attempt {a.attempt} was not prepared within {self.ready_timeout:g} s"
                raise _Aborted
            if at.error or at.session is None:
                raise _Aborted
            source, sink = at.session.source(a.disk), at.session.sink(a.disk)
            rate, paced_from = self.throttle.get(a.proxy), time.monotonic()
            try:
                with at.session.transport() as transport:
                    transport.open(source)
                    for offset, block in read_blocks(transport, source.capacity, offsets=sink.offsets()):
                        if at.error or at.ended:
                            raise _Aborted
                        sink.write(offset, block)
                        moved_total += len(block)
                        with self.lock:
                            at.bytes_read += len(block)
                            at.last_progress[a.stream] = self.clock()
                        if self.on_progress is not None:
                            self.on_progress(a, offset + len(block))
                        if rate:
                            ahead = moved_total / rate - (time.monotonic() - paced_from)
                            if ahead > 0:
                                self.sleep(ahead)
            except BaseException:
                try:
                    sink.close(False)  # a restore's writer lets go of the target (a hot-added disk detached)
                except Exception as e:
                    self._left(at, e)
                raise
            sink.close(not (at.error or at.ended))
            ok = True
        except _Aborted:
            pass
        except Exception as e:
            own_failure = True
            self._met(at, e)
            self._left(at, e)
            with self.lock:
                at.error = at.error or f"{a.mode} read of {a.vm} disk {a.disk} on {a.proxy} failed: {e}"
        finally:
            if a.opens:
                at.ready.set()  # whatever happened: the attempt's other streams stop waiting
        closing = disk_done = False
        with self.lock:
            at.inflight -= 1
            at.last_progress.pop(a.stream, None)
            if at.inflight == 0:
                at.idle_since = self.clock()
            if at.ended:
                pass  # abandoned (stalled) or already ended: a late return changes nothing
            elif ok and not at.error:
                at.disks_read += 1
                disk_done = True
                closing = at.ended = at.disks_read == at.disk_count
            elif at.inflight == 0:
                # failed, or read fine while another stream of the attempt failed: the last one closes it
                closing = at.ended = True
        read_until = time.time()  # the bar ends with the read, before the restore point and snapshot removal
        end = self.close(at, a.stream) if closing else None
        return StreamResult(a.vm, a.attempt, a.disk, a.stream, disk_done, end, "" if ok else at.error, began,
                            read_until, moved_total, own_failure)

    @staticmethod
    def _discard(session: VmSession, at: Attempt) -> None:
        try:
            session.finish(False)
        except Exception:
            log.exception("cleaning up %s attempt %d after it ended failed", at.vm, at.attempt)

    def close(self, at: Attempt, stream: str | None = None) -> AttemptEnd:
        """Finish an ended attempt (cleanup always; outside the lock, it talks to vCenter). `stream`, the one
        that ended it, must still be ours for the restore point to be committed."""
        at.ready.set()  # streams still waiting for the snapshot give up
        ok = not at.error and at.disks_read == at.disk_count
        if ok and stream is not None and self.confirm is not None and not self.confirm(stream):
            ok, at.error = False, f"{stream} was given up by its coordinator before the restore point was committed"
        result = Finished(None, 0)
        if at.session is not None:
            try:
                result = at.session.finish(ok)
            except Exception as e:  # commit or cleanup failed: the attempt failed
                self._met(at, e)
                ok, at.error = False, at.error or f"finishing failed: {e}"
        with self.lock:
            key = (at.job, at.vm, at.attempt)
            if self.attempts.get(key) is at:
                del self.attempts[key]
                self.closed[key] = None
                while len(self.closed) > CLOSED_KEPT:
                    self.closed.popitem(last=False)
        return AttemptEnd(at.vm, at.attempt, at.round, at.proxy, at.mode, ok, at.error, at.bytes_read,
                          result.bytes_written, self.clock() - at.started, result.point_id if ok else None,
                          result.notes, result.stats, result.read, (*at.left, *result.left_behind), at.fault,
                          at.final)

    def end(self, key: AttemptKey, error: str, *, wait: float = 0.0, poll: float = 0.05) -> AttemptEnd | None:
        """End a running attempt now as failed (its streams stop at their next block); None when it ended. With
        `wait`, its streams get that long to leave (detaching what they attached) before it is finished."""
        with self.lock:
            at = self.attempts.get(key)
            if at is None or at.ended:
                return None
            at.error = at.error or error
            at.ended = True
            at.ready.set()
        deadline = self.clock() + wait
        while at.inflight and self.clock() < deadline:
            self.sleep(poll)
        return self.close(at)

    def end_all(self, error: str, grace: float, *, cleanup: float | None = None,
                poll: float = 0.05) -> list[AttemptEnd]:
        """End every open attempt as failed with `error`: its streams stop at their next block (a hot-added disk
        is detached as its stream leaves); after they left, or after `grace` seconds, the attempts are finished
        at once, each in its own thread (restore point dropped, snapshot removed), for at most `cleanup` seconds
        (default `grace`). An attempt whose cleanup did not finish in time is reported with what it left behind.
        Returns the ends of the attempts it ended."""
        with self.lock:
            ending = [at for at in self.attempts.values() if not at.ended]
            for at in ending:
                at.error = at.error or error
                at.ended = True
                at.ready.set()
        deadline = self.clock() + grace
        while any(at.inflight for at in ending) and self.clock() < deadline:
            self.sleep(poll)
        ends: dict[int, AttemptEnd] = {}

        def finish(i: int, at: Attempt) -> None:
            ends[i] = self.close(at)

        threads = [threading.Thread(target=finish, args=(i, at), name=f"cleanup-{at.vm}", daemon=True)
                   for i, at in enumerate(ending)]
        for t in threads:
            t.start()
        limit = grace if cleanup is None else cleanup
        until = time.monotonic() + limit
        for t in threads:
            t.join(max(0.0, until - time.monotonic()))
        out = []
        for i, at in enumerate(ending):
            if i in ends:
                out.append(ends[i])
                continue
            what = f"snapshot of {at.vm} (attempt {at.attempt}): cleanup did not finish in {limit:g} s"
            out.append(AttemptEnd(at.vm, at.attempt, at.round, at.proxy, at.mode, False, at.error, at.bytes_read,
                                  0, self.clock() - at.started, None, (), {}, "", (*at.left, what), at.fault))
        return out

    def busy(self) -> bool:
        """Whether any attempt is open (a stream queued, reading, or its attempt being finished)."""
        with self.lock:
            return bool(self.attempts)

    def stalled(self, stall_seconds: float) -> list[tuple[Attempt, str]]:
        """Attempts with a stream that made no progress for `stall_seconds`, with the reason."""
        now, out = self.clock(), []
        with self.lock:
            for at in self.attempts.values():
                if at.ended or not at.last_progress:
                    continue
                idle = now - min(at.last_progress.values())
                if idle > stall_seconds:
                    out.append((at, f"no progress for {idle:.0f} s (stall limit {stall_seconds:g} s)"))
        return out

    def idle(self, seconds: float) -> list[Attempt]:
        """Open attempts without a stream in flight for `seconds` (their coordinator stopped handing disks)."""
        now = self.clock()
        with self.lock:
            return [at for at in self.attempts.values()
                    if not at.ended and at.idle_since is not None and now - at.idle_since > seconds]

    def inflight(self) -> dict[str, AttemptKey]:
        """The streams reading a disk right now, with their attempts."""
        with self.lock:
            return {s: key for key, at in self.attempts.items() if not at.ended for s in at.last_progress}

    def open_streams(self) -> set[str]:
        """The streams of every open attempt (a worker's heartbeat renews their leases)."""
        with self.lock:
            return {s for at in self.attempts.values() if not at.ended for s in at.streams}
