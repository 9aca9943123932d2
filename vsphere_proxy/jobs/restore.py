"""One restore job, from its plan to its report: `RestoreRun(...).run(observer) -> BackupReport` (DESIGN §8).

A restore is a secondary copy operation like a backup, run by the same coordinator and engine: each VM to
restore is a unit of the priority list whose disks sit on their *target* datastores, classified for each proxy
by the same access tiers (SAN or direct NFS when the proxy sees the target storage, hot-add when its host mounts
every target datastore, else the network). Every restore stream holds a ledger stream against the proxy's
system-wide limit and the target datastore's threshold, shared with the backups running at the same time; a
VM whose proxy failed is tried again in the next round with lower tiers.

An attempt creates the VM (empty disks), writes each disk from the restore point through the assigned write
transport (only blocks that are not holes), then completes it (NVRAM, tags, custom attributes, the original
replaced with `--overwrite`, powered on when asked). An attempt that fails anywhere removes what it created.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from vsphere_proxy.backup_report import BackupReport, build_report
from vsphere_proxy.catalog import Catalog, lease_holder
from vsphere_proxy.config import Config, ConfigError
from vsphere_proxy.coordinator import Assignment, Coordinator, Job
from vsphere_proxy.engine.control import JobControl
from vsphere_proxy.engine.embedded import EmbeddedEngine, describe
from vsphere_proxy.engine.lease import LeaseKeeper
from vsphere_proxy.engine.protocol import JobObserver, Observer, Observers
from vsphere_proxy.engine.session import Finished
from vsphere_proxy.faults import JobFault
from vsphere_proxy.jobs.backend import CreatedVm, Restorer, VCenterBackend
from vsphere_proxy.jobs.errors import BadJob, JobFailed
from vsphere_proxy.jobs.fleet import redis_client
from vsphere_proxy.jobs.recorder import AttemptEnds, CatalogRecorder, record_states
from vsphere_proxy.jobs.restore_plan import (
    RestoreOptions,
    RestorePlan,
    VmRestorePlan,
    plan_disk_restore,
    plan_restores,
)
from vsphere_proxy.jobs.setup import job_ledger, new_job_id, throttles
from vsphere_proxy.ledger import Ledger
from vsphere_proxy.model import Inventory
from vsphere_proxy.proxies import resolve_proxies
from vsphere_proxy.repository import Manifest, Repository, RepositoryError
from vsphere_proxy.tiers import tier_table
from vsphere_proxy.transports import DiskSource
from vsphere_proxy.transports.point import PointReader, written_offsets

RESTORE_JOB = "restore"


class RestoreSink:
    """One disk of the new VM: the blocks the restore point holds (holes are never read nor written) go to the
    write transport, opened at once on the target disk and closed when the stream ends."""

    def __init__(self, writer: Any, target: DiskSource, offsets: Sequence[int]) -> None:
        self.writer = writer
        self.target = target
        self._offsets = list(offsets)
        self.written = 0
        writer.open(target)

    def offsets(self) -> Sequence[int] | None:
        return self._offsets

    def write(self, offset: int, data: bytes) -> None:
        self.writer.write_block(offset, data)
        self.written += len(data)

    def close(self, ok: bool) -> None:
        self.writer.close(complete=ok)


class RestoreSession:
    """One attempt at restoring one VM: the VM is created; its disks are written by the attempt's streams."""

    def __init__(self, assignment: Assignment, plan: RestorePlan, created: CreatedVm, restorer: Restorer,
                 repository: Repository) -> None:
        self.assignment = assignment
        self.plan = plan
        self.created = created
        self.restorer = restorer
        self.repository = repository
        self._sinks: list[RestoreSink] = []
        self._lock = threading.Lock()
        self._result: Finished | None = None

    def source(self, disk: int) -> DiskSource:
        d = self.plan.point.disk(disk)
        return DiskSource(self.plan.source, disk, f"restore point {self.plan.point.id} disk {disk}", "", d.capacity)

    def transport(self) -> PointReader:
        return PointReader(self.repository, self.plan.point)

    def sink(self, disk: int) -> RestoreSink:
        target = self.created.disks.get(disk)
        if target is None:
            raise ValueError(f"{self.created.name}: no disk for disk {disk} of restore point {self.plan.point.id}")
        writer = self.restorer.writer(self.created, self.assignment.mode, self.assignment.proxy)
        sink = RestoreSink(writer, target, written_offsets(self.plan.point.disk(disk)))
        with self._lock:
            self._sinks.append(sink)
        return sink

    def finish(self, ok: bool) -> Finished:
        with self._lock:
            if self._result is not None:
                return self._result
            written = sum(s.written for s in self._sinks)
        notes: tuple[str, ...] = ()
        left: tuple[str, ...] = ()
        created = self.created
        if ok:
            try:
                whole_vm = isinstance(self.plan, VmRestorePlan) and self.plan.point.vm_config is not None
                nvram = self.repository.nvram(self.plan.point.id) if whole_vm else None
                notes = self.restorer.complete(created, self.plan, nvram)
            except Exception as e:
                left = self.restorer.remove(created)
                gone = "" if left else f"; {created.name} and its files were removed"
                raise RuntimeError(f"completing {created.name} failed: {e}{gone}") from None
            what = "restored as" if isinstance(self.plan, VmRestorePlan) else "restored into"
            result = Finished(self.plan.point.id, written, (f"{what} {self.plan.name} ({created.moref})", *notes))
        else:
            left = self.restorer.remove(created)
            removed = () if left else (f"{created.name} ({created.moref}) and its files were removed",)
            result = Finished(None, 0, removed, left_behind=left)
        with self._lock:
            self._result = result
        return result


class RestorePreparer:
    """Prepares the attempts of one restore job: the VM is created when its first stream starts."""

    def __init__(self, plans: Mapping[str, RestorePlan], restorer: Restorer, repository: Repository) -> None:
        self.plans = dict(plans)
        self.restorer = restorer
        self.repository = repository

    def prepare(self, assignment: Assignment) -> RestoreSession:
        plan = self.plans[assignment.vm]
        created = self.restorer.create(plan)
        return RestoreSession(assignment, plan, created, self.restorer, self.repository)


@dataclasses.dataclass(frozen=True)
class DryRun:
    """What a restore would do: the plan and the ConfigSpec of every VM, and each VM's best write tier."""

    plans: tuple[RestorePlan, ...]
    specs: tuple[dict[str, Any], ...]
    tiers: tuple[tuple[str, str | None, tuple[str, ...]], ...]  # (vm, best mode, its proxies in that mode)

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": True, "vms": [
            {**plan.to_json(), "write": {"mode": mode, "proxies": list(proxies)}, "config_spec": spec}
            for plan, spec, (_, mode, proxies) in zip(self.plans, self.specs, self.tiers, strict=True)]}


class RestoreRun:
    """One restore job: `plan(inventory)` says what to restore where (`vms` and `disk` make it from what the
    admin asked). `ledger`: the ledger shared with the other jobs (default: the Redis ledger with `distributed:`,
    else `repository.ledger`, the file the host's embedded jobs share).
    """

    def __init__(self, config: Config, backend: VCenterBackend, repository: Repository, catalog: Catalog,
                 plan: Callable[[Inventory], Sequence[RestorePlan]], *, inventory: Inventory | None = None,
                 ledger: Ledger | None = None, control: JobControl | None = None) -> None:
        self.config = config
        self.backend = backend
        self.repository = repository
        self.catalog = catalog
        self.plan = plan
        self.inventory = inventory
        self.ledger = ledger
        self.control = control or JobControl()
        self.job_id = new_job_id(RESTORE_JOB)
        self.plans: list[RestorePlan] = []  # once prepared

    @classmethod
    def vms(cls, config: Config, backend: VCenterBackend, repository: Repository, catalog: Catalog,
            points: Sequence[Manifest], options: RestoreOptions, **kwargs: Any) -> RestoreRun:
        """Each point's VM recreated as `options` say."""
        return cls(config, backend, repository, catalog, lambda inv: plan_restores(points, options, inv), **kwargs)

    @classmethod
    def disk(cls, config: Config, backend: VCenterBackend, repository: Repository, catalog: Catalog,
             point: Manifest, index: int, to_vm: str, datastore: str | None, **kwargs: Any) -> RestoreRun:
        """Disk `index` of `point` added to the existing VM `to_vm`."""
        return cls(config, backend, repository, catalog,
                   lambda inv: [plan_disk_restore(point, index, to_vm, datastore, inv)], **kwargs)

    def prepare(self) -> tuple[list[RestorePlan], Job, Restorer]:
        """Plan every VM and check it against vCenter; nothing is created. `BadJob` on bad input."""
        inventory = self.inventory or self.backend.discover()
        plans = self.plans = list(self.plan(inventory))
        try:
            proxies = resolve_proxies(self.config.job_proxies(), inventory)
        except ConfigError as e:
            raise BadJob(str(e)) from None
        restorer = self.backend.restorer(inventory, proxies, self.job_id)
        restorer.check(plans)
        table = tier_table([p.placed_vm() for p in plans], proxies, inventory)
        unreachable = [p.create_as for p in plans if table.best_tier(p.create_as) is None]
        if unreachable:
            why = "; ".join(c.reason for c in table.for_vm(unreachable[0]))
            raise BadJob(f"--vm: no proxy can write {unreachable[0]}'s disks: {why}")
        job = Job(self.job_id, tuple(p.work_vm() for p in plans), table, tuple(proxies),
                  self.config.job.policy.to_policy())
        return plans, job, restorer

    def dry_run(self) -> DryRun:
        plans, job, restorer = self.prepare()
        tiers = []
        for p in plans:
            best = job.table.best_tier(p.create_as)
            ranked = [c for c in job.table.for_vm(p.create_as) if c.tier is not None and c.tier == best]
            tiers.append((p.create_as, ranked[0].mode if ranked else None, tuple(c.proxy for c in ranked)))
        return DryRun(tuple(plans), tuple(restorer.config_spec(p) for p in plans), tuple(tiers))

    def run(self, observer: JobObserver | None = None) -> BackupReport:
        """Restore every VM; the job's report. Raises `BadJob` (nothing done) or `JobFailed`."""
        try:
            return self._run(observer or Observer())
        except SQLAlchemyError as e:
            raise JobFailed(f"repository.catalog: {describe(e)}") from None
        except JobFault as e:
            raise JobFailed(str(e)) from None

    def _run(self, observer: JobObserver) -> BackupReport:
        config, catalog, job_id = self.config, self.catalog, self.job_id
        policy = config.job.policy
        plans, job, restorer = self.prepare()
        try:
            lock = self.repository.lock("shared", f"restore job {job_id}")
        except RepositoryError as e:
            raise BadJob(f"repository: {e}") from None
        with lock:
            holder = lease_holder()
            catalog.take_lease(job_id, holder, policy.lease_seconds)
            try:
                return self._leased(plans, job, restorer, holder, observer)
            finally:
                with contextlib.suppress(Exception):
                    catalog.end_lease(job_id)

    def _ledger(self) -> tuple[Ledger, Callable[[Coordinator], object] | None]:
        """The ledger the job takes its streams in, and how its leases are renewed (when they expire): the one
        given; with `distributed:`, the Redis ledger the Celery proxies' backups use (so a restore counts against
        the same system-wide limits); else the host's shared file (`repository.ledger`)."""
        if self.ledger is not None:
            return self.ledger, None
        if self.config.distributed is not None:
            _, redis_ledger = redis_client(self.config.distributed)
            return redis_ledger, lambda c: redis_ledger.renew_streams([s for s, _, _ in c.running()])
        return job_ledger(self.config), None

    def _leased(self, plans: list[RestorePlan], job: Job, restorer: Restorer, holder: str,
                observer: JobObserver) -> BackupReport:
        config, catalog, job_id = self.config, self.catalog, self.job_id
        policy = config.job.policy
        ledger, renews = self._ledger()
        coordinator = Coordinator(job, ledger)
        catalog.start_job(job_id, RESTORE_JOB, engine="embedded", policy=policy.model_dump(mode="json"),
                          coordinator=f"embedded@{platform.node()}", controllers=[p.name for p in job.proxies],
                          summary={"kind": "restore", "stream_limits": dict(coordinator.limits),
                                   "restores": {p.create_as: {"vm": p.source, "point": p.point.id, "name": p.name}
                                                for p in plans}},
                          kind="restore")
        keeper = LeaseKeeper(lambda: catalog.renew_lease(job_id, holder, policy.lease_seconds),
                             every=policy.lease_seconds / 3, lease_seconds=policy.lease_seconds,
                             on_lost=lambda why: self.control.stop(why, "failed"))
        ends = AttemptEnds()
        recorder = CatalogRecorder(catalog, job, {}, attempts=True)
        engine = EmbeddedEngine(RestorePreparer({p.create_as: p for p in plans}, restorer, self.repository),
                                stall_seconds=policy.stall_seconds, throttle=throttles(config))
        ttl = config.distributed.lease_seconds if config.distributed else policy.lease_seconds
        streams = LeaseKeeper(lambda: bool(renews(coordinator)) or True, every=ttl / 3, lease_seconds=ttl,
                              on_lost=lambda why: None) if renews else contextlib.nullcontext()
        with keeper, streams, self.backend.keep_alive():
            self.control.attach(engine)
            job_report = engine.run(coordinator, Observers(ends, recorder, observer))
        problems = []
        if engine.stopped is not None and job_report.status not in ("failed", "interrupted"):
            problems.append(f"after its last VM the job failed: {engine.stopped.reason}")

        def kept(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:
                problems.append(f"catalog: {what} could not be recorded: {describe(e)}")

        kept("the VMs' states", lambda: record_states(catalog, job_id, coordinator, [p.create_as for p in plans]))
        report = build_report(job_id, job_report, ends.ends, [],
                              left_behind=[item for e in ends.ends for item in e.left_behind])
        data = report.to_json()
        summary = {k: v for k, v in data.items() if k != "vms"}
        summary["kind"] = "restore"
        summary["stream_limits"] = dict(coordinator.limits)
        summary["not_restored"] = {v["vm"]: v["error"] for v in data["vms"] if v["status"] != "done"}
        kept("the decisions", lambda: catalog.add_decisions(job_id, [
            (d.round, d.verdict, d.vm, d.proxy, d.reason) for d in coordinator.decisions if d.verdict != "skip"]))
        kept("the job's end", lambda: catalog.finish_job(job_id, report.status, summary))
        if problems:
            report = dataclasses.replace(report, problems=tuple(problems))
        return report
