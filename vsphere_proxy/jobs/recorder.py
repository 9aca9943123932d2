"""The job in the catalog as it runs: a `JobObserver` that writes each round as it starts, each stream as it ends
(the window's bars), each attempt (its restore point), and where every VM stands after each change — so that
`jobs`, `report` and the dashboard show a running job, and `backup --resume` can take over a stopped one."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

from vsphere_proxy.catalog import Catalog, StreamRecord, VmResult, VmState
from vsphere_proxy.coordinator import Assignment, Coordinator, Job
from vsphere_proxy.engine.events import AttemptEnd, StreamResult
from vsphere_proxy.engine.protocol import Observer
from vsphere_proxy.model import VM


class AttemptEnds(Observer):
    """Every attempt's end, for the job's report (with those of a run taken over, when resumed)."""

    def __init__(self, earlier: Iterable[AttemptEnd] = ()) -> None:
        self.ends: list[AttemptEnd] = list(earlier)

    def attempt_ended(self, end: AttemptEnd) -> None:
        self.ends.append(end)


def attempt_result(end: AttemptEnd) -> VmResult:
    """An attempt as the catalog keeps it."""
    return VmResult(vm=end.vm, round=end.round, attempt=end.attempt, proxy=end.proxy, mode=end.mode,
                    status="done" if end.ok else "stranded", bytes_read=end.bytes_read,
                    bytes_written=end.bytes_written, seconds=end.seconds, error=end.error, point_id=end.point_id)


def record_attempt(catalog: Catalog, job_id: str, end: AttemptEnd, vm: VM | None) -> None:
    """An attempt's end, and its restore point when it made one."""
    catalog.record(job_id, attempt_result(end))
    if end.point_id and vm is not None:
        catalog.add_point(job_id, end.point_id, end.vm, len(vm.backup_disks), vm.total_bytes)


def record_states(catalog: Catalog, job_id: str, coordinator: Coordinator, vms: Iterable[str]) -> None:
    """Where these VMs of the coordinator's job stand now (pending, running, stranded, done, failed)."""
    names = {vm.name for vm in coordinator.job.vms}
    states = []
    for vm in dict.fromkeys(vms):
        if vm in names:
            o = coordinator.outcome(vm)
            states.append(VmState(vm, o.status.value, o.round, o.attempts, o.proxy, o.mode, o.error))
    if states:
        catalog.set_states(job_id, states)


class CatalogRecorder(Observer):
    """Writes a running job to the catalog. `attempts`: whether this process records attempts (the embedded
    engine); a Celery proxy worker records the attempts it ran itself."""

    def __init__(self, catalog: Catalog, job: Job, vms: Mapping[str, VM], *, attempts: bool,
                 rounds: Iterable[int] = ()) -> None:
        self.catalog = catalog
        self.job = job
        self.vms = dict(vms)
        self.attempts = attempts
        self.rounds = set(rounds)  # rounds already in the catalog
        self._datastores = {(vm.name, d.index): d.datastore for vm in job.vms for d in vm.disks}

    def assignment_started(self, assignment: Assignment) -> None:
        if assignment.round not in self.rounds:
            self.rounds.add(assignment.round)
            self.catalog.start_round(self.job.id, assignment.round, len(self.job.vms))

    def stream_ended(self, a: Assignment, r: StreamResult) -> None:
        self.catalog.add_stream(self.job.id, StreamRecord(
            a.stream, a.vm, a.disk, a.proxy, a.mode, self._datastores.get((a.vm, a.disk), ""), a.round, a.attempt,
            datetime.fromtimestamp(r.started, UTC), datetime.fromtimestamp(r.ended, UTC), r.bytes, r.outcome))

    def attempt_ended(self, end: AttemptEnd) -> None:
        if self.attempts:
            record_attempt(self.catalog, self.job.id, end, self.vms.get(end.vm))

    def states_changed(self, coordinator: Coordinator, vms: Iterable[str]) -> None:
        record_states(self.catalog, self.job.id, coordinator, vms)
