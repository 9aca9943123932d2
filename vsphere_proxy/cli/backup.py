"""`vsphere-proxy backup`: run the job on the embedded engine (proxies as thread pools of this process).

At job start it sweeps what an earlier run may have left behind (our snapshots on the job's VMs, disks still
hot-added to the proxy VMs); then the coordinator assigns VMs to proxies round after round, each attempt snapshots
its VM, reads every disk through the assigned access mode into the repository and removes the snapshot. Every
attempt is recorded in the catalog. Exit 0 when every VM is backed up, 3 when some are not, 4 when none is.
"""

from __future__ import annotations

import argparse
import secrets
import socket
import threading
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from vsphere_proxy.backup_report import BackupReport, build_report
from vsphere_proxy.catalog import Catalog, StreamRecord
from vsphere_proxy.cli.attempts import proxy_access, record_attempt, throttles
from vsphere_proxy.cli.common import (
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
    styled,
    vcenter,
)
from vsphere_proxy.cli.fleet import Fleet
from vsphere_proxy.cli.plan import build_job
from vsphere_proxy.cli.resume import Earlier, StateKeeper
from vsphere_proxy.config import Config
from vsphere_proxy.coordinator import Assignment, Coordinator
from vsphere_proxy.engine.attempt import RepositoryPreparer
from vsphere_proxy.engine.embedded import AttemptEnd, EmbeddedEngine
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
        status = "[green]done[/]" if end.ok else f"[red]failed[/] (round {end.round})"
        self.progress.update(self.tasks.pop(end.vm), description=f"{end.vm} {status}",
                             completed=self.sizes.get(end.vm) if end.ok else None)


def _progress_display(enabled: bool) -> Progress | None:
    if not enabled:
        return None
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=console(), transient=False)


def keep_decisions(catalog: Catalog, job_id: str, coordinator: Coordinator) -> None:
    """The coordinator's decisions go to the catalog (after those of a coordinator it took over from)."""
    catalog.add_decisions(job_id, [(d.round, d.verdict, d.vm, d.proxy, d.reason) for d in coordinator.decisions
                                   if d.verdict != "skip"])


def run_backup(config: Config, found: Discovered, repo: Repository, *, show_progress: bool = False,
               engine: str = "embedded", resume: str | None = None) -> BackupReport:
    """Sweep, run every round of the job on the chosen engine, keep it in the catalog; return the report.

    With `resume`, take over a job whose coordinator stopped: VMs it backed up stay done, the others are
    backed up in the round it had reached."""
    from adapters.backup import VSphereSnapshotter
    from adapters.hotadd import sweep_attached
    from adapters.snapshots import sweep_snapshots

    catalog = open_catalog(config)
    try:
        if resume:
            Earlier.check(catalog, resume, config, engine)  # bad input fails before anything waits
        job_id = resume or new_job_id(config.job.name)
        setup = build_job(config, found.inventory, job_id)
        fleet = Fleet.open(config, job_id) if engine == "celery" else None
        if resume and fleet is not None:  # what the stopped coordinator's streams still do ends up in the catalog
            fleet.drain(config.job.policy.stall_seconds, out=console() if show_progress else None)
        earlier = Earlier.load(catalog, resume, config, engine) if resume else None
        if earlier is not None:
            setup = earlier.remaining(setup)
    except BaseException:
        catalog.close()
        raise
    session = found.session
    policy = config.job.policy
    vms = {s.vm.name: s.vm for s in setup.selected if not s.skip}
    skipped = [(s.vm.name, s.skip) for s in setup.selected if s.skip]

    swept_snaps = sweep_snapshots(session, [vm.moref for vm in vms.values()])
    swept_disks = sweep_attached(session, [p.vm_moref for p in setup.proxies if p.vm_moref])
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
    try:
        with progress.progress if progress.progress is not None else nullcontext():
            if fleet is not None:
                def lost(proxy: str, running: list[str]) -> None:
                    moref = next((p.vm_moref for p in setup.proxies if p.name == proxy), None)
                    if moref:
                        sweep_attached(session, [moref])
                    sweep_snapshots(session, [vms[v].moref for v in running if v in vms], job_id=job_id)

                job_context = {"id": job_id, "incremental": policy.incremental, "quiesce": policy.quiesce,
                               "repository": str(repo.path)}
                celery_engine = fleet.engine(job_context, on_start=on_start, on_end=on_end, on_proxy_lost=lost,
                                             on_change=states.changed, on_progress=progress.update,
                                             on_stream=on_stream)
                job_report = celery_engine.run(coordinator)
                dispatch = celery_engine.stats.to_json()
            else:
                snapshotter = VSphereSnapshotter(session, found.inventory.datacenter, vms,
                                                 proxy_access(config, setup.proxies), job_id, quiesce=policy.quiesce)
                preparer = RepositoryPreparer(snapshotter, repo, job_id, vms, incremental=policy.incremental)

                def started(a: Assignment) -> None:
                    on_start(a)
                    states.changed(coordinator, [a.vm])

                def ended(end: AttemptEnd) -> None:
                    on_end(end)
                    states.changed(coordinator, [end.vm])

                embedded = EmbeddedEngine(preparer, stall_seconds=policy.stall_seconds, on_end=ended,
                                          on_progress=progress.update, on_start=started,
                                          throttle=throttles(config), on_stream=on_stream)
                states.changed(coordinator, [vm.name for vm in setup.job.vms])
                job_report = embedded.run(coordinator)
                dispatch = {}
    except BaseException:
        keep_decisions(catalog, job_id, coordinator)
        catalog.close()  # the job stays `running` in the catalog: `backup --resume` takes it over
        raise
    finally:
        if fleet is not None:
            fleet.close()
    states.changed(coordinator, [vm.name for vm in setup.job.vms])
    if earlier is not None:
        job_report = earlier.merged(job_report)
    report = build_report(job_id, job_report, ends, skipped,
                          swept_snapshots=[f"{s.name} ({s.vm_moref})" for s in swept_snaps if s.removed],
                          swept_disks=[f"{d.disk.file} ({d.disk.proxy_moref})" for d in swept_disks if d.detached],
                          cleanup_errors=errors, dispatch=dispatch)
    data = report.to_json()
    summary = {k: v for k, v in data.items() if k != "vms"}
    summary["stream_limits"] = dict(coordinator.limits)
    summary["fell_back"] = {v["vm"]: v["fell_back"] for v in data["vms"] if v["fell_back"]}
    summary["not_backed_up"] = {v["vm"]: v["error"] for v in data["vms"] if v["status"] in ("failed", "unprotected")}
    keep_decisions(catalog, job_id, coordinator)
    catalog.finish_job(job_id, report.status, summary)
    catalog.close()
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
                        (styled("cleanup errors", "red"), data["swept"]["errors"])):
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
    with vcenter(config) as found:
        try:
            report = run_backup(config, found, repo, show_progress=not args.json and console().is_terminal,
                                engine=args.engine, resume=args.resume)
        except RepositoryError as e:
            raise CommandError(str(e), EXIT_FAILED) from None
    if args.json:
        emit_json(report.to_json())
    else:
        print_report(report)
    return report.exit_code

