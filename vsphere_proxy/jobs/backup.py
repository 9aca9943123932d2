"""One backup job, from its set-up to its report: `BackupRun(...).run(observer) -> BackupReport`.

In order: select the job's VMs and proxies (or take over a stopped run, `resume`); take the job's liveness lease
and claim its VMs (a VM another live job is backing up is skipped, or waited for); sweep what earlier jobs left
behind (sparing what live jobs made); run every round on the chosen engine, the catalog recording the job as it
goes; end the lease. The job always ends with a report (DESIGN §9): an error in a recorder or observer ends it
with the reason; the catalog failing at the end costs only that record (`report.problems`).

vCenter is reached only through a `VCenterBackend`; the engine through the `Engine` protocol.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from vsphere_proxy.backup_report import BackupReport, build_report
from vsphere_proxy.catalog import Catalog, lease_holder
from vsphere_proxy.config import Config, RetentionConfig
from vsphere_proxy.coordinator import Coordinator, JobReport
from vsphere_proxy.engine.attempt import RepositoryPreparer
from vsphere_proxy.engine.control import JobControl
from vsphere_proxy.engine.distributed import CeleryEngine
from vsphere_proxy.engine.embedded import EmbeddedEngine, describe
from vsphere_proxy.engine.events import AttemptEnd
from vsphere_proxy.engine.lease import LeaseKeeper
from vsphere_proxy.engine.protocol import Engine, JobObserver, Observer, Observers
from vsphere_proxy.faults import JobFault
from vsphere_proxy.hooks import Hooks, before_vm_gate
from vsphere_proxy.jobs.backend import SnapshotPolicy, Swept, VCenterBackend
from vsphere_proxy.jobs.errors import BadJob, JobFailed
from vsphere_proxy.jobs.fleet import Fleet
from vsphere_proxy.jobs.forget import apply_retention
from vsphere_proxy.jobs.job_hooks import JobHooks, drain_quietly
from vsphere_proxy.jobs.recorder import AttemptEnds, CatalogRecorder, record_states
from vsphere_proxy.jobs.resume import Earlier
from vsphere_proxy.jobs.setup import JobSetup, build_job, claim_vms, job_ledger, new_job_id, throttles
from vsphere_proxy.ledger import Ledger
from vsphere_proxy.model import VM, Inventory
from vsphere_proxy.notify import notify_job
from vsphere_proxy.repository import Repository, RepositoryError

JobStarted = Callable[[str, str, str, dict[str, int], list[str], dict[str, int]], None]
ENGINES = ("embedded", "celery")


class _CleanUpLost(Observer):
    """A proxy that stopped answering leaves its attempts' snapshots and hot-added disks: remove this job's."""

    def __init__(self, backend: VCenterBackend, job_id: str, setup: JobSetup, vms: dict[str, VM]) -> None:
        self.backend = backend
        self.job_id = job_id
        self.proxy_vms = {p.name: p.vm_moref for p in setup.proxies if p.vm_moref}
        self.vms = vms

    def proxy_lost(self, proxy: str, vms: Sequence[str]) -> None:
        moref = self.proxy_vms.get(proxy)
        self.backend.sweep([self.vms[v].moref for v in vms if v in self.vms], [moref] if moref else [],
                           job_id=self.job_id)


@dataclasses.dataclass
class _Held:
    """What the job holds while it runs: its catalog lease and, on the Celery engine, its Redis lease."""

    catalog: Catalog
    fleet: Fleet | None
    job_id: str
    holder: str
    seconds: float

    def renew(self) -> bool:
        held = self.catalog.renew_lease(self.job_id, self.holder, self.seconds)
        if self.fleet is not None:
            held = self.fleet.hold_job(self.holder, self.seconds) and held
        return held

    def spare(self, owner: str) -> bool:
        """Whether what job `owner` made must be left alone: it is another job, still alive."""
        if owner == self.job_id:
            return False
        return self.catalog.live(owner) or (self.fleet is not None and self.fleet.job_live(owner))


class BackupRun:
    """One run of the configuration's backup job.

    `engine`: "embedded" (proxies as thread pools of this process) or "celery" (proxies as workers, per the
    configuration's `distributed` section). `resume`: the id of a run whose coordinator stopped, to take over:
    VMs it backed up stay done, the others are backed up in the round it had reached. `control` may stop the
    run (a signal, a lost lease). `say` receives notices for the admin (waiting for a stopped run's streams).
    `ledger`: the embedded engine's ledger (default: `repository.ledger`, the file the host's jobs share).
    """

    def __init__(self, config: Config, backend: VCenterBackend, repository: Repository, catalog: Catalog, *,
                 inventory: Inventory | None = None, engine: str = "embedded", resume: str | None = None,
                 control: JobControl | None = None, say: Callable[[str], None] | None = None,
                 ledger: Ledger | None = None, on_start: JobStarted | None = None) -> None:
        """`on_start(job_id, name, engine, {vm: bytes}, proxies, stream_limits)` hears the job start, before its
        first VM (the event stream's `job_started`)."""
        if engine not in ENGINES:
            raise BadJob(f"--engine: {engine!r} is not one of {', '.join(ENGINES)}")
        self.config = config
        self.backend = backend
        self.repository = repository
        self.catalog = catalog
        self.inventory = inventory
        self.engine = engine
        self.resume = resume
        self.control = control or JobControl()
        self.say = say or (lambda _: None)
        self.ledger = ledger  # the embedded engine's; default: `job_ledger(config)`, the host's shared file
        self.on_start = on_start

    def run(self, observer: JobObserver | None = None) -> BackupReport:
        """Run the job to its end; its report. Raises `BadJob` (nothing done) or `JobFailed`."""
        try:
            return self._run(observer or Observer())
        except SQLAlchemyError as e:
            raise JobFailed(f"repository.catalog: {describe(e)}") from None
        except JobFault as e:  # before the rounds (discovery, the sweep): vCenter did not answer
            raise JobFailed(str(e)) from None

    def _run(self, observer: JobObserver) -> BackupReport:
        config, catalog = self.config, self.catalog
        self._started = time.monotonic()
        policy = config.job.policy
        fleet: Fleet | None = None
        try:
            if self.resume:
                Earlier.check(catalog, self.resume, config, self.engine)  # bad input fails before anything waits
            job_id = self.resume or new_job_id(config.job.name)
            setup = build_job(config, self.inventory or self.backend.discover(), job_id)
            if not setup.selected:
                raise BadJob(f"job.select: job {config.job.name!r} selects no VM")
            fleet = Fleet.open(config, job_id) if self.engine == "celery" else None
            if self.resume and fleet is not None:  # what the stopped coordinator's streams still do is recorded
                fleet.drain(policy.stall_seconds, say=self.say)
            earlier = Earlier.load(catalog, self.resume, config, self.engine) if self.resume else None
            if earlier is not None:
                setup = earlier.remaining(setup)
            held = _Held(catalog, fleet, job_id, lease_holder(), policy.lease_seconds)
            catalog.take_lease(job_id, held.holder, held.seconds)
            if fleet is not None:
                fleet.take_job(held.holder, held.seconds)
        except BaseException:
            if fleet is not None:
                fleet.close()
            raise
        try:
            return self._leased(setup, earlier, held, observer)
        finally:
            with contextlib.suppress(Exception):  # a dead lease expires by itself
                catalog.end_lease(job_id)
            if fleet is not None:
                with contextlib.suppress(Exception):
                    fleet.drop_job()
                fleet.close()

    def _leased(self, setup: JobSetup, earlier: Earlier | None, held: _Held, observer: JobObserver) -> BackupReport:
        config, catalog, backend, job_id = self.config, self.catalog, self.backend, held.job_id
        policy = config.job.policy
        setup, busy = claim_vms(catalog, config, job_id, setup, held.renew)
        vms = {s.vm.name: s.vm for s in setup.selected if not s.skip}
        skipped = [(s.vm.name, s.skip) for s in setup.selected if s.skip]
        keeper = LeaseKeeper(held.renew, every=policy.lease_seconds / 3, lease_seconds=policy.lease_seconds,
                             on_lost=lambda why: self.control.stop(why, "failed"))
        swept = backend.sweep([vm.moref for vm in vms.values()], [p.vm_moref for p in setup.proxies if p.vm_moref],
                              spare=held.spare)

        role = "embedded" if self.engine == "embedded" else f"coordinator@{platform.node()}"
        coordinator = Coordinator(setup.job, held.fleet.ledger if held.fleet else self.ledger or job_ledger(config))
        if earlier is None:
            catalog.start_job(job_id, config.job.name, engine=self.engine, policy=policy.model_dump(mode="json"),
                              coordinator=role, controllers=[p.name for p in setup.proxies],
                              summary={"stream_limits": dict(coordinator.limits)})  # a running job's dashboard
        else:
            catalog.reopen_job(job_id, role)
            catalog.set_states(job_id, earlier.done_states())
            coordinator.carry_over(earlier.attempts, earlier.round)
        ends = AttemptEnds(earlier.ends if earlier else ())
        recorder = CatalogRecorder(catalog, setup.job, vms, attempts=self.engine == "embedded",
                                   rounds=earlier.rounds if earlier else ())
        if self.on_start is not None:
            self.on_start(job_id, config.job.name, self.engine, {n: vm.total_bytes for n, vm in vms.items()},
                          [p.name for p in setup.proxies], dict(coordinator.limits))
        self._disk_notes = setup.disk_notes
        hooks = Hooks(config.hooks, job_id, config.job.name, config.secret_env_names())
        self._hooks = JobHooks(hooks, self.control, vms)
        watchers = Observers(ends, recorder, _CleanUpLost(backend, job_id, setup, vms), self._hooks, observer)
        engine = self._engine(setup, vms, job_id, held.fleet, hooks)
        with keeper, backend.keep_alive():
            self.control.attach(engine)
            refused = self._hooks.before_job()
            try:
                if refused:  # a `fail_job` before_job hook failed: the job ends before its first snapshot
                    coordinator.abort(refused, status="failed")
                    job_report = coordinator.report()
                else:
                    job_report = engine.run(coordinator, watchers)
            except BaseException:
                drain_quietly(self._hooks)
                with contextlib.suppress(Exception):
                    self._keep_decisions(coordinator, job_id)
                raise  # the job stays `running` in the catalog: `backup --resume` takes it over
        dispatch: dict[str, Any] = engine.stats.to_json() if isinstance(engine, CeleryEngine) else {}
        late = []
        if engine.stopped is not None and job_report.status not in ("failed", "interrupted"):
            late.append(f"after its last VM the job failed: {engine.stopped.reason}")  # a recorder, an observer
        return self._finish(coordinator, job_report, earlier, ends.ends, skipped, busy, swept, dispatch, job_id,
                            late)

    def _engine(self, setup: JobSetup, vms: dict[str, VM], job_id: str, fleet: Fleet | None,
                hooks: Hooks) -> Engine:
        policy = self.config.job.policy
        if fleet is not None:
            context = {"id": job_id, "incremental": policy.incremental, "quiesce": policy.quiesce,
                       "require_incremental": policy.require_incremental,
                       "repository": str(self.repository.path)}
            return fleet.engine(context, stall_seconds=policy.stall_seconds)
        snapshotter = self.backend.snapshotter(vms, setup.proxies, job_id, policy=SnapshotPolicy.of(policy))
        preparer = RepositoryPreparer(snapshotter, self.repository, job_id, vms, incremental=policy.incremental,
                                      before=before_vm_gate(hooks) if hooks.config.before_vm else None,
                                      refused=setup.refused, require_incremental=policy.require_incremental)
        return EmbeddedEngine(preparer, stall_seconds=policy.stall_seconds, throttle=throttles(self.config))

    def _keep_decisions(self, coordinator: Coordinator, job_id: str) -> None:
        """The coordinator's decisions go to the catalog (after those of a coordinator it took over from)."""
        self.catalog.add_decisions(job_id, [(d.round, d.verdict, d.vm, d.proxy, d.reason)
                                            for d in coordinator.decisions if d.verdict != "skip"])

    def _finish(self, coordinator: Coordinator, job_report: JobReport, earlier: Earlier | None,
                ends: list[AttemptEnd], skipped: list[tuple[str, str]], busy: list[tuple[str, str]], swept: Swept,
                dispatch: dict[str, Any], job_id: str, problems: list[str]) -> BackupReport:

        def kept(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # a full or unreachable catalog: the job's report still reaches the admin
                problems.append(f"catalog: {what} could not be recorded: {describe(e)}")

        catalog = self.catalog
        kept("the VMs' states", lambda: record_states(catalog, job_id, coordinator,
                                                      [vm.name for vm in coordinator.job.vms]))
        if earlier is not None:
            job_report = earlier.merged(job_report)
        left = [item for e in ends for item in e.left_behind]
        report = build_report(job_id, job_report, ends, skipped, swept_snapshots=list(swept.snapshots),
                              swept_disks=list(swept.disks), cleanup_errors=list(swept.errors), dispatch=dispatch,
                              left_behind=left, disk_notes=self._disk_notes)
        data = report.to_json()
        summary = {k: v for k, v in data.items() if k != "vms"}
        summary["stream_limits"] = dict(coordinator.limits)
        summary["fell_back"] = {v["vm"]: v["fell_back"] for v in data["vms"] if v["fell_back"]}
        summary["not_backed_up"] = {v["vm"]: v["error"] for v in data["vms"]
                                    if v["status"] in ("failed", "unprotected")}
        if busy:
            summary["busy"] = dict(busy)
        kept("the decisions", lambda: self._keep_decisions(coordinator, job_id))
        kept("the job's end", lambda: catalog.finish_job(job_id, report.status, summary))
        if problems:
            report = dataclasses.replace(report, problems=tuple(problems))
        retention = self.config.job.policy.retention
        if retention is not None and retention.after_backup and report.status == "complete":
            report = dataclasses.replace(report, retention=self._retention(retention, [v.vm for v in report.vms]))
        report = dataclasses.replace(report, seconds=time.monotonic() - self._started)
        report = self._hooks.finish(report, exit_code=lambda r: r.exit_code)
        if self.config.notify is not None:  # last: it tells what the job and its hooks did; it never fails the job
            report = dataclasses.replace(report, notify=notify_job(self.config.notify, report.to_json()).to_json())
        return report

    def _retention(self, retention: RetentionConfig, vms: list[str]) -> dict[str, Any]:
        """`policy.retention.after_backup`: forget what the rules remove among these VMs' points, and prune when no
        other job holds the repository. A failure here is reported with the job; it never undoes the backup."""
        try:
            result = apply_retention(self.repository, retention.rules(), retention.tz(), vms=vms,
                                     prune=retention.prune)
        except RepositoryError as e:
            return {"error": f"retention did not run: {e}"}
        data = result.to_json()
        return {"rules": data["rules"], "kept": data["kept"], "forgotten": data["forgotten"],
                "prune": data["prune"], "prune_skipped": data["prune_skipped"]}
