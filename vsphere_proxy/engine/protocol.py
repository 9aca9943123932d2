"""The seam between a job and what executes it.

An `Engine` runs a coordinator's rounds to their end: the embedded engine (proxies as thread pools), the Celery
engine (proxies as workers) and the simulator (a discrete-event clock) all do, and all report what happens to one
`JobObserver`: the catalog recorder, the progress display, a test. An observer that raises ends the job with the
error as its reason (DESIGN §9); it is never lost in a thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from vsphere_proxy.coordinator import Assignment, Coordinator, JobReport
from vsphere_proxy.engine.events import AttemptEnd, Stop, StreamResult

__all__ = ["Engine", "JobObserver", "Observer", "Observers"]


class JobObserver(Protocol):
    def assignment_started(self, assignment: Assignment) -> None:
        """An assignment that opens a VM attempt, before its first stream runs."""

    def block_read(self, vm: str, disk: int, position: int) -> None:
        """A stream read its disk up to `position` bytes."""

    def stream_ended(self, assignment: Assignment, result: StreamResult) -> None:
        """A stream ended: read its disk, failed, or stopped because its attempt ended."""

    def attempt_ended(self, end: AttemptEnd) -> None:
        """A VM attempt ended, after the coordinator took it in (the VM's new state is readable)."""

    def states_changed(self, coordinator: Coordinator, vms: Iterable[str]) -> None:
        """Where these VMs stand changed (pending, running, stranded, done, failed)."""

    def proxy_lost(self, proxy: str, vms: Sequence[str]) -> None:
        """A proxy stopped answering while it ran these VMs: what it left in vCenter is to be cleaned up."""


class Observer:
    """A `JobObserver` that ignores every event: subclass it and override the events you watch."""

    def assignment_started(self, assignment: Assignment) -> None:
        pass

    def block_read(self, vm: str, disk: int, position: int) -> None:
        pass

    def stream_ended(self, assignment: Assignment, result: StreamResult) -> None:
        pass

    def attempt_ended(self, end: AttemptEnd) -> None:
        pass

    def states_changed(self, coordinator: Coordinator, vms: Iterable[str]) -> None:
        pass

    def proxy_lost(self, proxy: str, vms: Sequence[str]) -> None:
        pass


class Observers(Observer):
    """Several observers as one: each event goes to each, in order."""

    def __init__(self, *observers: JobObserver) -> None:
        self.observers = observers

    def assignment_started(self, assignment: Assignment) -> None:
        for o in self.observers:
            o.assignment_started(assignment)

    def block_read(self, vm: str, disk: int, position: int) -> None:
        for o in self.observers:
            o.block_read(vm, disk, position)

    def stream_ended(self, assignment: Assignment, result: StreamResult) -> None:
        for o in self.observers:
            o.stream_ended(assignment, result)

    def attempt_ended(self, end: AttemptEnd) -> None:
        for o in self.observers:
            o.attempt_ended(end)

    def states_changed(self, coordinator: Coordinator, vms: Iterable[str]) -> None:
        names = tuple(vms)
        for o in self.observers:
            o.states_changed(coordinator, names)

    def proxy_lost(self, proxy: str, vms: Sequence[str]) -> None:
        for o in self.observers:
            o.proxy_lost(proxy, vms)


class Engine(Protocol):
    name: str
    stopped: Stop | None  # why the job ended early, once it did (a fault, an error, the watchdog, `stop`)

    def run(self, coordinator: Coordinator, observer: JobObserver) -> JobReport:
        """Run every round of the coordinator's job to its end, reporting to `observer`; the job's report."""

    def stop(self, reason: str, status: str = "interrupted") -> None:
        """End the running job as soon as possible, every VM left failed with `reason` (safe from a signal
        handler: it only records and wakes)."""
