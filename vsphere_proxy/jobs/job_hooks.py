"""A backup job's hooks around its engine (`hooks:`): `before_job` before the first snapshot, `after_vm` as each
VM ends (on a thread of its own, so that a slow hook never holds the scheduler up), then `after_job` and, when the
job did not complete, `on_failure`, with the job's JSON report in a file named by `VSPHERE_PROXY_REPORT`.

A failing hook with `on_error: fail_job` ends the job: before or while it runs it is stopped (every VM left fails
with the hook's reason); after it, the report carries the failure as a job problem (exit 4). Every run, with its
output, goes into the report's `hooks`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

from vsphere_proxy.backup_report import BackupReport
from vsphere_proxy.engine.control import JobControl
from vsphere_proxy.engine.events import AttemptEnd
from vsphere_proxy.engine.protocol import Observer
from vsphere_proxy.hooks import HookRun, Hooks
from vsphere_proxy.model import VM

_DONE = object()


class JobHooks(Observer):
    """The job-level hooks of one job; an observer of its engine for `after_vm`."""

    def __init__(self, hooks: Hooks, control: JobControl, vms: dict[str, VM]) -> None:
        self.hooks = hooks
        self.control = control
        self.vms = vms
        self.problems: list[str] = []
        self._ran_after: set[str] = set()
        self._queue: queue.Queue[object] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def before_job(self) -> str:
        """Run `before_job`; the reason of a `fail_job` failure (the job must not start), else ""."""
        for run in self.hooks.run("before_job", status="starting"):
            if not run.ok and run.policy == "fail_job":
                with self._lock:
                    self.problems.append(run.reason())
                return run.reason()
        return ""

    # -- after_vm -------------------------------------------------------------------------------------------------

    def attempt_ended(self, end: AttemptEnd) -> None:
        if end.ok:
            self._after_vm(end.vm, "done", point=end.point_id or "", proxy=end.proxy, mode=end.mode)

    def _after_vm(self, vm: str, status: str, **context: str) -> None:
        with self._lock:
            if vm in self._ran_after or not self.hooks.config.after_vm:
                return
            self._ran_after.add(vm)
            if self._thread is None:
                self._thread = threading.Thread(target=self._drain, name="after-vm-hooks", daemon=True)
                self._thread.start()
        moref = self.vms[vm].moref if vm in self.vms else ""
        self._queue.put(lambda: self.hooks.run("after_vm", vm=vm, vm_moref=moref, status=status, **context))

    def _drain(self) -> None:
        while (task := self._queue.get()) is not _DONE:
            assert callable(task)
            try:
                for run in task():
                    self._apply(run, during=True)
            except Exception as exc:  # a hook that cannot run is a hook that failed: never the engine's problem
                with self._lock:
                    self.problems.append(f"after_vm hooks: {exc}")

    # -- the job's end --------------------------------------------------------------------------------------------

    def finish(self, report: BackupReport, *, exit_code: Callable[[BackupReport], int]) -> BackupReport:
        """Run `after_vm` for the VMs that did not end done, wait for every `after_vm`, then `after_job` and (the
        job not complete) `on_failure`; the report with every run and the problems they caused."""
        for line in report.vms:
            if line.status != "done":
                self._after_vm(line.vm, line.status, proxy=line.proxy or "", mode=line.mode or "",
                               error=line.error)
        with self._lock:
            thread = self._thread
        if thread is not None:
            self._queue.put(_DONE)
            thread.join()
        if self.hooks.config.after_job or (report.status != "complete" and self.hooks.config.on_failure):
            report = self._job_end(report, exit_code)
        problems = (*report.problems, *self.problems)
        return dataclasses.replace(report, problems=problems, hooks=tuple(r.to_json() for r in self.hooks.runs))

    def _job_end(self, report: BackupReport, exit_code: Callable[[BackupReport], int]) -> BackupReport:
        with tempfile.TemporaryDirectory(prefix="vsphere-proxy-report-") as where:  # 0700: this user's only
            path = Path(where) / f"{report.job_id}.json"
            with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                json.dump({**report.to_json(), "hooks": [r.to_json() for r in self.hooks.runs]}, f, indent=1)
            context = {"status": report.status, "exit_code": str(exit_code(report)), "report": str(path)}
            events = ["after_job"] + (["on_failure"] if report.status != "complete" else [])
            for event in events:
                for run in self.hooks.run(event, **context):
                    self._apply(run, during=False)
        return report

    def _apply(self, run: HookRun, *, during: bool) -> None:
        """A failed hook's policy: `fail_job` stops a running job, or fails an ended one (a job problem)."""
        if run.ok or run.policy != "fail_job":
            return
        if during:
            self.control.stop(run.reason(), "failed")
        with self._lock:
            self.problems.append(run.reason())


def drain_quietly(hooks: JobHooks) -> None:
    """Stop the `after_vm` thread of a job that ended without a report (it raised)."""
    with contextlib.suppress(Exception):
        hooks._queue.put(_DONE)
