"""`vsphere-proxy backup`: run the job on the embedded engine (proxies as thread pools of this process).

At job start it sweeps what an earlier run may have left behind (our snapshots on the job's VMs, disks still
hot-added to the proxy VMs); then the coordinator assigns VMs to proxies round after round, each attempt snapshots
its VM, reads every disk through the assigned access mode into the repository and removes the snapshot. Every
attempt is recorded in the catalog. Exit 0 when every VM is backed up, 3 when some are not, 4 when none is.
"""

from __future__ import annotations

import argparse
import secrets
import threading
from contextlib import nullcontext
from datetime import UTC, datetime
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from vsphere_proxy.backup_report import BackupReport, build_report
from vsphere_proxy.catalog import Catalog, CatalogError, VmResult
from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAILED,
    CommandError,
    Discovered,
    add_config_argument,
    console,
    emit_json,
    read_config,
    vcenter,
)
from vsphere_proxy.cli.plan import build_job
from vsphere_proxy.config import Config
from vsphere_proxy.coordinator import Coordinator
from vsphere_proxy.engine.attempt import RepositoryPreparer
from vsphere_proxy.engine.embedded import AttemptEnd, EmbeddedEngine
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.repository import Repository, RepositoryError
from vsphere_proxy.units import human_size

HELP = "back up the job's VMs through the proxies into the repository (embedded engine)"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("backup", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print the job report as JSON")
    p.set_defaults(func=do_backup)


def new_job_id(name: str) -> str:
    return f"{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(2)}"


def open_repository(config: Config, *, create: bool = False) -> Repository:
    if config.repository is None:
        raise CommandError("repository: not configured; add `repository: {path: /absolute/dir}`", EXIT_BAD_INPUT)
    try:
        if create:
            return Repository.init(config.repository.path)
        return Repository.open(config.repository.path)
    except RepositoryError as e:
        raise CommandError(f"repository.path: {e}", EXIT_BAD_INPUT) from None


def open_catalog(config: Config) -> Catalog:
    assert config.repository is not None
    try:
        return Catalog.open(config.repository.catalog_target())
    except CatalogError as e:
        raise CommandError(f"repository.catalog: {e}", EXIT_BAD_INPUT) from None


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


def run_backup(config: Config, found: Discovered, repo: Repository, *, show_progress: bool = False) -> BackupReport:
    """Sweep, run every round of the job on the embedded engine, record it in the catalog; return the report."""
    from adapters.backup import ProxyAccess, VSphereSnapshotter
    from adapters.hotadd import sweep_attached
    from adapters.hotadd_transport import DiskUuidDevices, GuestDevices, SimulatedGuestDevices
    from adapters.snapshots import sweep_snapshots

    job_id = new_job_id(config.job.name)
    setup = build_job(config, found.inventory, job_id)
    catalog = open_catalog(config)
    session = found.session
    policy = config.job.policy
    vms = {s.vm.name: s.vm for s in setup.selected if not s.skip}
    skipped = [(s.vm.name, s.skip) for s in setup.selected if s.skip]

    swept_snaps = sweep_snapshots(session, [vm.moref for vm in vms.values()])
    swept_disks = sweep_attached(session, [p.vm_moref for p in setup.proxies if p.vm_moref])
    errors = [f"snapshot {s.name} on {s.vm_moref}: {s.error}" for s in swept_snaps if s.error]
    errors += [f"disk {d.disk.file} on {d.disk.proxy_moref}: {d.error}" for d in swept_disks if d.error]

    access = {}
    configs = {pc.name: pc for pc in config.proxies}
    for proxy in setup.proxies:
        pc = configs[proxy.name]
        devices: GuestDevices | None = None
        if proxy.vm_moref:
            devices = SimulatedGuestDevices(pc.paths) if pc.hotadd_devices == "simulated" else DiskUuidDevices()
        access[proxy.name] = ProxyAccess(proxy.name, proxy.vm_moref, dict(pc.paths), devices)
    snapshotter = VSphereSnapshotter(session, found.inventory.datacenter, vms, access, job_id,
                                     quiesce=policy.quiesce)
    preparer = RepositoryPreparer(snapshotter, repo, job_id, vms, incremental=policy.incremental)

    catalog.start_job(job_id, config.job.name, engine="embedded", policy=policy.model_dump(mode="json"),
                      coordinator="embedded", controllers=[p.name for p in setup.proxies])
    ends: list[AttemptEnd] = []
    rounds: set[int] = set()
    progress = _Progress(_progress_display(show_progress), {n: v.total_bytes for n, v in vms.items()})

    def on_end(end: AttemptEnd) -> None:
        ends.append(end)
        if end.round not in rounds:
            rounds.add(end.round)
            catalog.start_round(job_id, end.round, len(vms))
        catalog.record(job_id, VmResult(
            vm=end.vm, round=end.round, attempt=end.attempt, proxy=end.proxy, mode=end.mode,
            status="done" if end.ok else "stranded", bytes_read=end.bytes_read, bytes_written=end.bytes_written,
            seconds=end.seconds, error=end.error, point_id=end.point_id))
        if end.point_id:
            catalog.add_point(job_id, end.point_id, end.vm, len(vms[end.vm].disks), vms[end.vm].total_bytes)
        progress.ended(end)

    engine = EmbeddedEngine(preparer, stall_seconds=policy.stall_seconds, on_end=on_end,
                            on_progress=progress.update)
    coordinator = Coordinator(setup.job, InMemoryLedger())
    try:
        with progress.progress if progress.progress is not None else nullcontext():
            job_report = engine.run(coordinator)
    except BaseException:
        catalog.finish_job(job_id, "failed", {"error": "interrupted"})
        catalog.close()
        raise
    report = build_report(job_id, job_report, ends, skipped,
                          swept_snapshots=[f"{s.name} ({s.vm_moref})" for s in swept_snaps if s.removed],
                          swept_disks=[f"{d.disk.file} ({d.disk.proxy_moref})" for d in swept_disks if d.detached],
                          cleanup_errors=errors)
    summary = {k: v for k, v in report.to_json().items() if k != "vms"}
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
        table.add_row(v.vm, f"[{colour}]{v.status}[/]" if colour else v.status, v.proxy or "", v.mode or "",
                      str(v.round or ""), human_size(v.bytes_read) if v.bytes_read else "",
                      human_size(v.bytes_written) if v.status == "done" else "",
                      _ratio(v.dedup_ratio, v.status),
                      f"{v.seconds:.1f}" if v.seconds else "", escape(v.read if v.status == "done" else v.error))
    out.print(table)
    for v in report.vms:
        if v.fell_back:
            out.print(f"[yellow]{v.vm}[/]: {escape(v.fell_back)}", soft_wrap=True)
        if v.status in ("failed", "unprotected"):
            out.print(f"[red]{v.vm}[/]: {escape(v.error)}", soft_wrap=True)
        for note in v.notes:
            out.print(f"{v.vm}: {escape(note)}", soft_wrap=True)
    for what, items in (("removed left-behind snapshots", data["swept"]["snapshots"]),
                        ("detached left-behind disks", data["swept"]["attached_disks"]),
                        ("[red]cleanup errors[/]", data["swept"]["errors"])):
        if items:
            out.print(f"{what}: {escape(', '.join(items))}", soft_wrap=True)
    counts = ", ".join(f"{n} {s}" for s, n in sorted(data["counts"].items()))
    modes = ", ".join(f"{n} {m}" for m, n in data["modes"].items()) or "none"
    out.print(f"[bold]{report.status}[/]: {counts}; by mode: {modes}; rounds {data['rounds']}; "
              f"read {human_size(data['bytes_read'])}, stored {human_size(data['bytes_written'])}", soft_wrap=True)


def do_backup(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    repo = open_repository(config, create=True)  # a bad repository is bad input: say so before touching vCenter
    with vcenter(config) as found:
        try:
            report = run_backup(config, found, repo, show_progress=not args.json and console().is_terminal)
        except RepositoryError as e:
            raise CommandError(str(e), EXIT_FAILED) from None
    if args.json:
        emit_json(report.to_json())
    else:
        print_report(report)
    return report.exit_code

