"""`vsphere-proxy backup`: run the job on the embedded engine (proxies as thread pools of this process).

At job start it sweeps what an earlier run may have left behind (our snapshots on the job's VMs, disks still
hot-added to the proxy VMs); then the coordinator assigns VMs to proxies round after round, each attempt snapshots
its VM, reads every disk through the assigned access mode into the repository and removes the snapshot. Every
attempt is recorded in the catalog. Exit 0 when every VM is backed up, 3 when some are not, 4 when none is.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import secrets
import socket
import threading
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError

from vsphere_proxy.backup_report import BackupReport, build_report
from vsphere_proxy.catalog import Catalog, StreamRecord, lease_holder
from vsphere_proxy.cli.attempts import proxy_access, record_attempt, throttles
from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    CommandError,
    Discovered,
    add_config_argument,
    console,
    emit_json,
    line,
    open_catalog,
    open_repository,
    read_config,
    repository_failure,
    styled,
    vcenter,
)
from vsphere_proxy.cli.fleet import Fleet
from vsphere_proxy.cli.plan import JobSetup, build_job
from vsphere_proxy.cli.resume import Earlier, StateKeeper
from vsphere_proxy.cli.signals import stop_on_signals
from vsphere_proxy.config import Config
from vsphere_proxy.coordinator import Assignment, Coordinator
from vsphere_proxy.engine.attempt import RepositoryPreparer
from vsphere_proxy.engine.control import JobControl
from vsphere_proxy.engine.embedded import AttemptEnd, EmbeddedEngine, describe
from vsphere_proxy.engine.lease import LeaseKeeper
from vsphere_proxy.engine.streams import StreamResult
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.repository import Repository, RepositoryError
from vsphere_proxy.units import human_size

HELP = "back up the job's VMs through the proxies into the repository"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("backup", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print the job report as JSON")
    p.add_argument("--engine", choices=("embedded", "celery"), default="embedded",
                   help="embedded: proxies as threads of this process (default); celery: proxies as workers "
                        "(`vsphere-proxy worker`), per the config's `distributed` section")
    p.add_argument("--resume", metavar="JOB", help="take over job JOB, whose coordinator stopped: what it backed up "
                   "stays done, the rest is backed up")
    p.set_defaults(func=do_backup)


def new_job_id(name: str) -> str:
    return f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


class _Progress:
    """Bytes read per VM, on a terminal only."""

    def __init__(self, progress: Progress | None, sizes: dict[str, int]) -> None:
        self.progress = progress
        self.sizes = sizes
        self.tasks: dict[str, Any] = {}
        self.done: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    def update(self, vm: str, disk: int, position: int) -> None:
        if self.progress is None:
            return
        with self.lock:
            self.done[(vm, disk)] = max(position, self.done.get((vm, disk), 0))
            if vm not in self.tasks:
                self.tasks[vm] = self.progress.add_task(vm, total=self.sizes.get(vm) or None)
            total = sum(n for (v, _), n in self.done.items() if v == vm)
        self.progress.update(self.tasks[vm], completed=total)

    def ended(self, end: AttemptEnd) -> None:
        if self.progress is None or end.vm not in self.tasks:
            return
        with self.lock:
            for key in [k for k in self.done if k[0] == end.vm]:
                del self.done[key]
        status = "done" if end.ok else f"failed (round {end.round})"  # a VM's name is never markup
        self.progress.update(self.tasks.pop(end.vm), description=f"{end.vm} {status}",
                             completed=self.sizes.get(end.vm) if end.ok else None)


def _progress_display(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    return Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                    TransferSpeedColumn(), TimeRemainingColumn(), console=console(), transient=False)


def keep_decisions(catalog: Catalog, job_id: str, coordinator: Coordinator) -> None:
    """The coordinator's decisions go to the catalog (after those of a coordinator it took over from)."""
    catalog.add_decisions(job_id, [(d.round, d.verdict, d.vm, d.proxy, d.reason) for d in coordinator.decisions
                                   if d.verdict != "skip"])


def vm_key(config: Config, moref: str) -> str:
    """A VM's identity across jobs: the vCenter it lives in and its managed object id."""
    return f"{urlsplit(config.vcenter.url).netloc}/{moref}"


def claim_vms(catalog: Catalog, config: Config, job_id: str, setup: JobSetup, keep_alive: Callable[[], object],
              sleep: Callable[[float], None] = time.sleep) -> tuple[JobSetup, list[tuple[str, str]]]:
    """Claim the job's VMs; a VM another live job is backing up is skipped ("being backed up by job X"), or
    waited for first when the policy says `on_busy: wait`. Returns the job without them, and them."""
    policy = config.job.policy
    keys = {vm_key(config, s.vm.moref): s.vm.name for s in setup.selected if not s.skip}
    busy = catalog.claim_vms(job_id, keys)
    deadline = time.monotonic() + policy.busy_wait_seconds
    while busy and policy.on_busy == "wait" and time.monotonic() < deadline:
        sleep(min(5.0, max(0.1, deadline - time.monotonic())))
        keep_alive()
        busy = catalog.claim_vms(job_id, {k: keys[k] for k in busy})
    if not busy:
        return setup, []
    names = {keys[k]: other for k, other in busy.items()}
    why = {name: f"being backed up by job {other}" for name, other in names.items()}
    selected = [dataclasses.replace(s, skip=why[s.vm.name]) if s.vm.name in why and not s.skip else s
                for s in setup.selected]
    job = dataclasses.replace(setup.job, vms=tuple(vm for vm in setup.job.vms if vm.name not in why))
    return dataclasses.replace(setup, selected=selected, job=job), sorted(why.items())


def run_backup(config: Config, found: Discovered, repo: Repository, *, show_progress: bool = False,
               engine: str = "embedded", resume: str | None = None,
               control: JobControl | None = None) -> BackupReport:
    """Sweep, run every round of the job on the chosen engine, keep it in the catalog; return the report.

    With `resume`, take over a job whose coordinator stopped: VMs it backed up stay done, the others are
    backed up in the round it had reached. The job holds a liveness lease while it runs (DESIGN §9): its VMs are
    claimed, another job's sweep never removes what it made, and `control` may stop it (a signal)."""
    try:
        return _run_backup(config, found, repo, show_progress=show_progress, engine=engine, resume=resume,
                           control=control or JobControl())
    except SQLAlchemyError as e:
        raise CommandError(f"repository.catalog: {describe(e)}", EXIT_FAILED) from None


def _run_backup(config: Config, found: Discovered, repo: Repository, *, show_progress: bool, engine: str,
                resume: str | None, control: JobControl) -> BackupReport:
    policy = config.job.policy
    holder = lease_holder()
    catalog = open_catalog(config)
    fleet: Fleet | None = None
    try:
        if resume:
            Earlier.check(catalog, resume, config, engine)  # bad input fails before anything waits
        job_id = resume or new_job_id(config.job.name)
        setup = build_job(config, found.inventory, job_id)
        if not setup.selected:
            raise CommandError(f"job.select: job {config.job.name!r} selects no VM", EXIT_BAD_INPUT)
        fleet = Fleet.open(config, job_id) if engine == "celery" else None
        if resume and fleet is not None:  # what the stopped coordinator's streams still do ends up in the catalog
            fleet.drain(config.job.policy.stall_seconds, out=console() if show_progress else None)
        earlier = Earlier.load(catalog, resume, config, engine) if resume else None
        if earlier is not None:
            setup = earlier.remaining(setup)
        catalog.take_lease(job_id, holder, policy.lease_seconds)
        if fleet is not None:
            fleet.take_job(holder, policy.lease_seconds)
    except BaseException:
        if fleet is not None:
            fleet.close()
        catalog.close()
        raise

    def renew() -> bool:
        held = catalog.renew_lease(job_id, holder, policy.lease_seconds)
        if fleet is not None:
            held = fleet.hold_job(holder, policy.lease_seconds) and held
        return held

    def spare(owner: str) -> bool:
        """Whether what job `owner` made must be left alone: it is another job, still alive."""
        if owner == job_id:
            return False
        return catalog.live(owner) or (fleet is not None and fleet.job_live(owner))

    try:
        return _run_leased(config, found, repo, catalog, fleet, setup, earlier, job_id, renew, spare,
                           show_progress=show_progress, engine=engine, control=control)
    finally:
        with contextlib.suppress(Exception):  # a dead lease expires by itself
            catalog.end_lease(job_id)
        if fleet is not None:
            with contextlib.suppress(Exception):
                fleet.drop_job()
            fleet.close()
        catalog.close()


def _run_leased(config: Config, found: Discovered, repo: Repository, catalog: Catalog, fleet: Fleet | None,
                setup: JobSetup, earlier: Earlier | None, job_id: str, renew: Callable[[], bool],
                spare: Callable[[str], bool], *, show_progress: bool, engine: str, control: JobControl) -> BackupReport:
    from adapters.backup import VSphereSnapshotter
    from adapters.hotadd import sweep_attached
    from adapters.snapshots import sweep_snapshots

    session = found.session
    policy = config.job.policy
    setup, busy = claim_vms(catalog, config, job_id, setup, renew)
    vms = {s.vm.name: s.vm for s in setup.selected if not s.skip}
    skipped = [(s.vm.name, s.skip) for s in setup.selected if s.skip]
    keeper = LeaseKeeper(renew, every=policy.lease_seconds / 3, lease_seconds=policy.lease_seconds,
                         on_lost=lambda why: control.stop(why, "failed"))

    swept_snaps = sweep_snapshots(session, [vm.moref for vm in vms.values()], spare=spare)
    swept_disks = sweep_attached(session, [p.vm_moref for p in setup.proxies if p.vm_moref], spare=spare)
    errors = [f"snapshot {s.name} on {s.vm_moref}: {s.error}" for s in swept_snaps if s.error]
    errors += [f"disk {d.disk.file} on {d.disk.proxy_moref}: {d.error}" for d in swept_disks if d.error]

    coordinator_role = "embedded" if engine == "embedded" else f"coordinator@{socket.gethostname()}"
    if earlier is None:
        limits = {p.name: setup.job.policy.formula(p) for p in setup.proxies}  # for a dashboard of the running job
        catalog.start_job(job_id, config.job.name, engine=engine, policy=policy.model_dump(mode="json"),
                          coordinator=coordinator_role, controllers=[p.name for p in setup.proxies],
                          summary={"stream_limits": limits})
    else:
        catalog.reopen_job(job_id, coordinator_role)
        catalog.set_states(job_id, earlier.done_states())
    ends: list[AttemptEnd] = list(earlier.ends) if earlier else []
    rounds: set[int] = set(earlier.rounds) if earlier else set()
    progress = _Progress(_progress_display(show_progress), {n: v.total_bytes for n, v in vms.items()})
    states = StateKeeper(catalog, job_id)

    def on_start(a: Assignment) -> None:
        if a.round not in rounds:
            rounds.add(a.round)
            catalog.start_round(job_id, a.round, len(setup.job.vms))

    def on_end(end: AttemptEnd) -> None:
        ends.append(end)
        if engine == "embedded":  # a proxy worker records its own attempts
            record_attempt(catalog, job_id, end, vms.get(end.vm))
        progress.ended(end)

    datastores = {(vm.name, d.index): d.datastore for vm in setup.job.vms for d in vm.disks}

    def on_stream(a: Assignment, r: StreamResult) -> None:
        catalog.add_stream(job_id, StreamRecord(
            a.stream, a.vm, a.disk, a.proxy, a.mode, datastores.get((a.vm, a.disk), ""), a.round, a.attempt,
            datetime.fromtimestamp(r.started, UTC), datetime.fromtimestamp(r.ended, UTC), r.bytes, r.outcome))

    coordinator = Coordinator(setup.job, fleet.ledger if fleet else InMemoryLedger())
    if earlier is not None:
        coordinator.carry_over(earlier.attempts, earlier.round)
    with keeper, session.keep_alive(), progress.progress if progress.progress is not None else nullcontext():
        try:
            if fleet is not None:
                def lost(proxy: str, running: list[str]) -> None:
                    moref = next((p.vm_moref for p in setup.proxies if p.name == proxy), None)
                    if moref:
                        sweep_attached(session, [moref], job_id=job_id)
                    sweep_snapshots(session, [vms[v].moref for v in running if v in vms], job_id=job_id)

                job_context = {"id": job_id, "incremental": policy.incremental, "quiesce": policy.quiesce,
                               "repository": str(repo.path)}
                celery_engine = fleet.engine(job_context, on_start=on_start, on_end=on_end, on_proxy_lost=lost,
                                             on_change=states.changed, on_progress=progress.update,
                                             on_stream=on_stream, stall_seconds=policy.stall_seconds)
                control.attach(celery_engine)
                job_report = celery_engine.run(coordinator)
                dispatch = celery_engine.stats.to_json()
            else:
                vsphere = VSphereSnapshotter(session, found.inventory.datacenter, vms,
                                      proxy_access(config, setup.proxies), job_id, quiesce=policy.quiesce)
                preparer = RepositoryPreparer(vsphere, repo, job_id, vms, incremental=policy.incremental)

                def started(a: Assignment) -> None:
                    on_start(a)
                    states.changed(coordinator, [a.vm])

                def ended(end: AttemptEnd) -> None:
                    on_end(end)
                    states.changed(coordinator, [end.vm])

                embedded = EmbeddedEngine(preparer, stall_seconds=policy.stall_seconds, on_end=ended,
                                          on_progress=progress.update, on_start=started,
                                          throttle=throttles(config), on_stream=on_stream)
                control.attach(embedded)
                states.changed(coordinator, [vm.name for vm in setup.job.vms])
                job_report = embedded.run(coordinator)
                dispatch = {}
        except BaseException:
            with contextlib.suppress(Exception):
                keep_decisions(catalog, job_id, coordinator)
            raise  # the job stays `running` in the catalog: `backup --resume` takes it over
    problems: list[str] = []

    def kept(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except Exception as e:  # a full or unreachable catalog: the job's report still reaches the admin
            problems.append(f"catalog: {what} could not be recorded: {describe(e)}")

    kept("the VMs' states", lambda: states.changed(coordinator, [vm.name for vm in setup.job.vms]))
    if earlier is not None:
        job_report = earlier.merged(job_report)
    left = [item for e in ends for item in e.left_behind]
    report = build_report(job_id, job_report, ends, skipped,
                          swept_snapshots=[f"{s.name} ({s.vm_moref})" for s in swept_snaps if s.removed],
                          swept_disks=[f"{d.disk.file} ({d.disk.proxy_moref})" for d in swept_disks if d.detached],
                          cleanup_errors=errors, dispatch=dispatch, left_behind=left)
    data = report.to_json()
    summary = {k: v for k, v in data.items() if k != "vms"}
    summary["stream_limits"] = dict(coordinator.limits)
    summary["fell_back"] = {v["vm"]: v["fell_back"] for v in data["vms"] if v["fell_back"]}
    summary["not_backed_up"] = {v["vm"]: v["error"] for v in data["vms"] if v["status"] in ("failed", "unprotected")}
    if busy:
        summary["busy"] = dict(busy)
    kept("the decisions", lambda: keep_decisions(catalog, job_id, coordinator))
    kept("the job's end", lambda: catalog.finish_job(job_id, report.status, summary))
    if problems:
        report = dataclasses.replace(report, problems=tuple(problems))
    return report


def _ratio(ratio: float | None, status: str) -> str:
    if ratio is None:
        return "all dup" if status == "done" else ""
    return f"{ratio:.1f}x" if ratio < 1000 else ">999x"


def print_report(report: BackupReport) -> None:
    out = console()
    data = report.to_json()
    table = Table("VM", "status", "proxy", "mode", "round", "read", "stored", "dedup", "s", "how",
                  title=f"Backup {report.job_id}")
    for v in report.vms:
        colour = {"done": "green", "failed": "red", "unprotected": "red", "skipped": "yellow"}.get(v.status, "")
        table.add_row(v.vm, styled(v.status, colour), v.proxy or "", v.mode or "",
                      str(v.round or ""), human_size(v.bytes_read) if v.bytes_read else "",
                      human_size(v.bytes_written) if v.status == "done" else "",
                      _ratio(v.dedup_ratio, v.status),
                      f"{v.seconds:.1f}" if v.seconds else "", v.read if v.status == "done" else v.error)
    out.print(table)
    for v in report.vms:
        if v.fell_back:
            out.print(line(styled(v.vm, "yellow"), f": {v.fell_back}"), soft_wrap=True)
        if v.status in ("failed", "unprotected"):
            out.print(line(styled(v.vm, "red"), f": {v.error}"), soft_wrap=True)
        for note in v.notes:
            out.print(f"{v.vm}: {note}", soft_wrap=True)
    for what, items in (("removed left-behind snapshots", data["swept"]["snapshots"]),
                        ("detached left-behind disks", data["swept"]["attached_disks"]),
                        (styled("cleanup errors", "red"), data["swept"]["errors"]),
                        (styled("left behind (the next job's sweep removes them)", "red"), data["left_behind"]),
                        (styled("job errors", "red"), data["problems"])):
        if items:
            out.print(line(what, f": {', '.join(items)}"), soft_wrap=True)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(data["counts"].items()))
    modes = ", ".join(f"{n} {m}" for m, n in data["modes"].items()) or "none"
    out.print(line(styled(report.status, "bold"), f": {counts}; by mode: {modes}; rounds {data['rounds']}; "
                   f"read {human_size(data['bytes_read'])}, stored {human_size(data['bytes_written'])}"),
              soft_wrap=True)


def do_backup(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config, create=True)  # a bad repository is bad input: say so before touching vCenter
    control = JobControl()
    with stop_on_signals(control), vcenter(config) as found:
        try:
            report = run_backup(config, found, repo, show_progress=not args.json and console().is_terminal,
                                engine=args.engine, resume=args.resume, control=control)
        except RepositoryError as e:
            raise repository_failure(e) from None
    if args.json:
        emit_json(report.to_json())
    else:
        print_report(report)
    request = control.request
    if report.status == "interrupted" and request is not None and request.signal is not None:
        return 128 + request.signal  # 130 after SIGINT, 143 after SIGTERM
    return report.exit_code

