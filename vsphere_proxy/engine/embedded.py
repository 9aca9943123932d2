"""The embedded engine: every proxy is a thread pool of this process with as many threads as its stream limit,
driven by the coordinator's events. Coordinator calls are serialized by one lock; the ledger is shared.

A stream reads one disk through the attempt's transport into the attempt's sink, block by block. The first
stream of an attempt prepares it (snapshot); its other streams wait for that. An attempt ends when all its
disks are read (finish ok, then `on_complete(ok)`) or when a stream fails (the others stop at their next block;
when none is left, finish not ok, then `on_complete(False, error)`). A stream without progress for
`stall_seconds` fails its attempt; the VM is stranded even if the read never returns.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from vsphere_proxy.coordinator import Assignment, Coordinator, JobReport
from vsphere_proxy.engine.session import Finished, Preparer, VmSession
from vsphere_proxy.transports import read_blocks

log = logging.getLogger(__name__)


class _Aborted(Exception):
    pass


@dataclass
class Attempt:
    """The engine's record of one VM attempt while it runs."""

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
    ended: bool = False


@dataclass(frozen=True)
class AttemptEnd:
    """What the engine reports when an attempt ends (for the catalog and the progress display)."""

    vm: str
    attempt: int
    round: int
    proxy: str
    mode: str
    ok: bool
    error: str
    bytes_read: int
    bytes_written: int
    seconds: float
    point_id: str | None
    notes: tuple[str, ...]
    stats: Mapping[str, int] = field(default_factory=dict)
    read: str = ""


class EmbeddedEngine:
    name = "embedded"

    def __init__(self, preparer: Preparer, *, stall_seconds: float = 300.0,
                 clock: Callable[[], float] = time.monotonic, tick: float = 0.5,
                 on_end: Callable[[AttemptEnd], None] | None = None,
                 on_progress: Callable[[str, int, int], None] | None = None) -> None:
        self.preparer = preparer
        self.stall_seconds = stall_seconds
        self.clock = clock
        self.tick = tick
        self.on_end = on_end
        self.on_progress = on_progress  # (vm, disk, bytes) after every block

    def run(self, coordinator: Coordinator) -> JobReport:
        lock = threading.RLock()
        finished = threading.Event()
        attempts: dict[tuple[str, int], Attempt] = {}
        pools = {name: ThreadPoolExecutor(max_workers=max(1, limit), thread_name_prefix=f"proxy-{name}")
                 for name, limit in coordinator.limits.items()}

        def submit(assignments: Iterable[Assignment]) -> None:
            for a in assignments:
                key = (a.vm, a.attempt)
                with lock:
                    at = attempts.get(key)
                    if at is None:
                        at = attempts[key] = Attempt(a.vm, a.attempt, a.proxy, a.mode, a.round, a.disk_count,
                                                     self.clock())
                    at.inflight += 1
                    at.last_progress[a.stream] = self.clock()
                pools[a.proxy].submit(stream, a, at)
            if coordinator.done:
                finished.set()

        def close(at: Attempt) -> None:
            """Finish an ended attempt (cleanup always, outside the lock: it talks to vCenter), then tell the
            coordinator."""
            ok = not at.error and at.disks_read == at.disk_count
            result = Finished(None, 0)
            if at.session is not None:
                try:
                    result = at.session.finish(ok)
                except Exception as e:  # commit or cleanup failed: the attempt failed
                    ok, at.error = False, at.error or f"finishing failed: {e}"
            with lock:
                if self.on_end is not None:
                    try:
                        self.on_end(AttemptEnd(at.vm, at.attempt, at.round, at.proxy, at.mode, ok, at.error,
                                               at.bytes_read, result.bytes_written, self.clock() - at.started,
                                               result.point_id if ok else None, result.notes, result.stats,
                                               result.read))
                    except Exception:  # a failing observer must not lose the VM's outcome for the coordinator
                        log.exception("reporting the end of %s attempt %d failed", at.vm, at.attempt)
                submit(coordinator.on_complete(at.vm, ok, at.error, attempt=at.attempt))

        def stream(a: Assignment, at: Attempt) -> None:
            ok = False
            try:
                if a.opens:
                    try:
                        at.session = self.preparer.prepare(a)
                    except Exception as e:
                        at.error = f"preparing {a.vm} on {a.proxy} failed: {e}"
                        raise _Aborted from None
                    finally:
                        at.ready.set()
                else:
                    at.ready.wait()
                if at.error or at.session is None:
                    raise _Aborted
                source, sink = at.session.source(a.disk), at.session.sink(a.disk)
                with at.session.transport() as transport:
                    transport.open(source)
                    for offset, block in read_blocks(transport, source.capacity, offsets=sink.offsets()):
                        if at.error or at.ended:
                            raise _Aborted
                        sink.write(offset, block)
                        with lock:
                            at.bytes_read += len(block)
                            at.last_progress[a.stream] = self.clock()
                        if self.on_progress is not None:
                            self.on_progress(a.vm, a.disk, offset + len(block))
                ok = True
            except _Aborted:
                pass
            except Exception as e:
                with lock:
                    at.error = at.error or f"{a.mode} read of {a.vm} disk {a.disk} on {a.proxy} failed: {e}"
            finally:
                closing = False
                with lock:
                    at.inflight -= 1
                    at.last_progress.pop(a.stream, None)
                    if at.ended:
                        pass  # abandoned (stalled) or already ended: a late return changes nothing
                    elif ok and not at.error:
                        at.disks_read += 1
                        submit(coordinator.on_disk_done(a.vm, a.disk, a.attempt))
                        closing = at.ended = at.disks_read == at.disk_count
                    elif at.inflight == 0:
                        # failed, or read fine while another stream of the attempt failed: the last one closes it
                        closing = at.ended = True
                if closing:
                    close(at)

        def watchdog() -> None:
            now, stalled = self.clock(), []
            with lock:
                for at in attempts.values():
                    if at.ended or not at.last_progress:
                        continue
                    idle = now - min(at.last_progress.values())
                    if idle > self.stall_seconds:
                        at.error = at.error or f"no progress for {idle:.0f} s (stall limit {self.stall_seconds:g} s)"
                        at.ended = True
                        stalled.append(at)
            for at in stalled:
                close(at)

        try:
            with lock:
                submit(coordinator.start())
            while not finished.wait(self.tick):
                watchdog()
                with lock:
                    if coordinator.done:
                        finished.set()
        finally:
            for pool in pools.values():
                pool.shutdown(wait=False, cancel_futures=True)
        return coordinator.report()
