"""`vsphere-proxy backup`: run the configuration's backup job (`vsphere_proxy.jobs.backup.BackupRun`) on the
embedded engine (proxies as thread pools of this process) or the Celery engine, with a progress display on a
terminal, then print its report. Exit 0 when every VM is backed up, 3 when some are not, 4 when none is.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, redirect_stdout
from typing import Any

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from vsphere_proxy.backup_report import BackupReport
from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    CommandError,
    add_config_argument,
    console,
    emit_json,
    job_failure,
    line,
    open_catalog,
    open_repository,
    print_job_end,
    read_config,
    repository_failure,
    styled,
    vcenter,
)
from vsphere_proxy.cli.signals import stop_on_signals
from vsphere_proxy.engine.control import JobControl
from vsphere_proxy.engine.events import AttemptEnd
from vsphere_proxy.engine.protocol import Observer, Observers
from vsphere_proxy.jobs.backup import ENGINES, BackupRun
from vsphere_proxy.jobs.errors import JobError
from vsphere_proxy.jobs.job_events import EventWriter
from vsphere_proxy.repository import RepositoryError
from vsphere_proxy.units import human_size

HELP = "back up the job's VMs through the proxies into the repository"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("backup", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print the job report as JSON")
    p.add_argument("--engine", choices=ENGINES, default="embedded",
                   help="embedded: proxies as threads of this process (default); celery: proxies as workers "
                        "(`vsphere-proxy worker`), per the config's `distributed` section")
    p.add_argument("--resume", metavar="JOB", help="take over job JOB, whose coordinator stopped: what it backed up "
                   "stays done, the rest is backed up")
    p.add_argument("--events", metavar="FILE|-",
                   help="write the job's events as JSON lines to FILE, or to stdout with - (docs/events.md); with -, "
                        "the report goes to stderr")
    p.set_defaults(func=do_backup)


class ProgressDisplay(Observer):
    """Bytes read per VM, as bars on a terminal."""

    def __init__(self, sizes: dict[str, int]) -> None:
        self.progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), DownloadColumn(),
                                 TransferSpeedColumn(), TimeRemainingColumn(), console=console(), transient=False)
        self.sizes = sizes
        self.tasks: dict[str, Any] = {}
        self.done: dict[tuple[str, int], int] = {}
        self.lock = threading.Lock()

    def block_read(self, vm: str, disk: int, position: int) -> None:
        with self.lock:
            self.done[(vm, disk)] = max(position, self.done.get((vm, disk), 0))
            if vm not in self.tasks:
                self.tasks[vm] = self.progress.add_task(vm, total=self.sizes.get(vm) or None)
            total = sum(n for (v, _), n in self.done.items() if v == vm)
        self.progress.update(self.tasks[vm], completed=total)

    def attempt_ended(self, end: AttemptEnd) -> None:
        with self.lock:
            if end.vm not in self.tasks:
                return
            for key in [k for k in self.done if k[0] == end.vm]:
                del self.done[key]
            task = self.tasks.pop(end.vm)
        status = "done" if end.ok else f"failed (round {end.round})"  # a VM's name is never markup
        self.progress.update(task, description=f"{end.vm} {status}",
                             completed=self.sizes.get(end.vm) if end.ok else None)


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
    print_job_end(report.status, data, (
        ("removed left-behind snapshots", data["swept"]["snapshots"]),
        ("detached left-behind disks", data["swept"]["attached_disks"]),
        (styled("cleanup errors", "red"), data["swept"]["errors"]),
        (styled("left behind (the next job's sweep removes them)", "red"), data["left_behind"]),
        ("hooks", [f"{h['event']} {h['command']}" + (f" ({h['vm']})" if h["vm"] else "") + ": "
                   + ("ok" if h["ok"] else "exited " + str(h["exit_code"]) if h["exit_code"] is not None
                      else "timed out" if h["timed_out"] else f"not started: {h['error']}")
                   for h in data["hooks"]]),
        (styled("job errors", "red"), data["problems"]),
        ("notified", [f"{data['notify']['sent']} of {data['notify']['targets']} targets"]
         if data["notify"] and data["notify"]["wanted"] else []),
        (styled("notification problems", "yellow"), data["notify"]["problems"] if data["notify"] else []),
        ("retention", _retention_lines(report.retention))),
        f"read {human_size(data['bytes_read'])}, stored {human_size(data['bytes_written'])}")


def _retention_lines(retention: dict[str, Any] | None) -> list[str]:
    """policy.retention.after_backup's outcome, as the job's end lists it."""
    if retention is None:
        return []
    if "error" in retention:
        return [retention["error"]]
    said = [f"{retention['rules']}: kept {retention['kept']}, forgot {len(retention['forgotten'])}"]
    if retention["prune"] is not None:
        said.append(f"pruned {human_size(retention['prune']['bytes_freed'])}")
    if retention["prune_skipped"]:
        said.append(retention["prune_skipped"])
    return said


def do_backup(args: argparse.Namespace) -> int:
    if args.events == "-" and args.json:
        raise CommandError("--events -: stdout carries the events; --json cannot go there too (use --events FILE)",
                           EXIT_BAD_INPUT)
    with open_events(args.events) as events:
        try:
            return _backup(args, events)
        except CommandError as e:
            if events is not None:
                events.job_failed(str(e), e.code)
            raise


@contextmanager
def open_events(where: str | None) -> Iterator[EventWriter | None]:
    """The event stream `--events` names: stdout for `-`, else a new file (replacing one there)."""
    if where is None:
        yield None
        return
    if where == "-":
        yield EventWriter(sys.stdout)
        return
    try:
        stream = open(where, "w", encoding="utf-8")  # noqa: SIM115 - closed below, after the job's last event
    except OSError as e:
        raise CommandError(f"--events: cannot write {where}: {e.strerror or e}", EXIT_BAD_INPUT) from None
    with stream:
        yield EventWriter(stream)


def _backup(args: argparse.Namespace, events: EventWriter | None) -> int:
    config = read_config(args.config)
    repo = open_repository(config, create=True)  # a bad repository is bad input: say so before touching vCenter
    control = JobControl()
    out = console()
    with stop_on_signals(control), vcenter(config) as found:
        catalog = open_catalog(config)
        display = ProgressDisplay({vm.name: vm.total_bytes for vm in found.inventory.vms}) \
            if not args.json and out.is_terminal and args.events != "-" else None
        watchers = Observers(*(o for o in (display, events) if o is not None))
        run = BackupRun(config, found.backend, repo, catalog, inventory=found.inventory, engine=args.engine,
                        resume=args.resume, control=control,
                        say=None if display is None else lambda text: out.print(text, soft_wrap=True),
                        on_start=events.job_started if events is not None else None)
        try:
            with display.progress if display is not None else nullcontext():
                report = run.run(watchers)
        except JobError as e:
            raise job_failure(e) from None
        except RepositoryError as e:
            raise repository_failure(e) from None
        finally:
            catalog.close()
    if events is not None:
        if events.problem:
            report = dataclasses.replace(report, problems=(*report.problems, events.problem))
        events.job_ended(report)
    if args.json:
        emit_json(report.to_json())
    else:
        with redirect_stdout(sys.stderr) if args.events == "-" else nullcontext():
            print_report(report)
    request = control.request
    if report.status == "interrupted" and request is not None and request.signal is not None:
        return 128 + request.signal  # 130 after SIGINT, 143 after SIGTERM
    return report.exit_code
