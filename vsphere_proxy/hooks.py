"""Running the job's hooks (`hooks:` in the configuration): commands the backup software gives us to run before and
after the job and each VM, with the job's context in `VSPHERE_PROXY_*` environment variables and no secret among
them, each bounded by its timeout, its output kept (cut to a bounded size) for the job report.

A hook that fails — exits non-zero, cannot start, or runs past its timeout (its whole process group is then
terminated, and killed 5 s later) — does what its `on_error` says: `fail_job`, `skip_vm` (before_vm only: the VM
is not backed up in this job) or `ignore`. `Hooks.run` returns the runs and raises nothing for a failure: the
caller applies the policy (`HookRun.policy`).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from vsphere_proxy.config import HookConfig, HookPolicy, HooksConfig
from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.faults import JobFault, VmFault
from vsphere_proxy.model import VM

PREFIX = "VSPHERE_PROXY_"
CONTEXT = ("EVENT", "JOB_ID", "JOB_NAME", "VM", "VM_MOREF", "STATUS", "POINT", "PROXY", "MODE", "ERROR", "EXIT_CODE",
           "REPORT")
# names that hold secrets wherever they come from: never passed to a hook, configured or not
_SECRET_NAME = re.compile(r"PASSWORD|PASSWD|PASSPHRASE|SECRET|TOKEN|CREDENTIAL|API_?KEY|PRIVATE_?KEY", re.I)
_KILL_AFTER = 5.0


@dataclass(frozen=True, slots=True)
class HookRun:
    """One run of one hook: what it was, how it ended, what it printed (stdout and stderr, cut)."""

    event: str
    index: int  # its position among the event's hooks
    command: str  # for the report: the argv joined, or the shell string
    vm: str
    policy: HookPolicy
    exit_code: int | None  # None: it did not start, or was killed after its timeout
    seconds: float
    output: str
    timed_out: bool = False
    error: str = ""  # why it could not start

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.error

    def reason(self) -> str:
        """Why it failed, one line: `before_vm hook 1 (/opt/pre.sh) exited 3: <last output line>`."""
        what = f"{self.event} hook {self.index + 1} ({self.command})"
        if self.error:
            return f"{what} could not start: {self.error}"
        if self.timed_out:
            return f"{what} ran past its timeout of {self.seconds:.0f} s and was stopped"
        last = next((ln for ln in reversed(self.output.splitlines()) if ln.strip()), "")
        return f"{what} exited {self.exit_code}" + (f": {last.strip()[:200]}" if last else "")

    def to_json(self) -> dict[str, Any]:
        return {"event": self.event, "index": self.index, "command": self.command, "vm": self.vm or None,
                "policy": self.policy, "exit_code": self.exit_code, "seconds": round(self.seconds, 3),
                "timed_out": self.timed_out, "error": self.error or None, "ok": self.ok, "output": self.output}


def hook_environment(secret_names: set[str], context: Mapping[str, str],
                     environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment without secrets (the configured secret variables, and any whose name says it
    holds one) and without stale context values, plus the context as `VSPHERE_PROXY_<NAME>`. Other
    `VSPHERE_PROXY_*` variables (`VSPHERE_PROXY_CONFIG`) stay, for a hook that calls vsphere-proxy itself."""
    base = os.environ if environ is None else environ
    stale = {f"{PREFIX}{name}" for name in CONTEXT}
    env = {k: v for k, v in base.items()
           if k not in secret_names and not _SECRET_NAME.search(k) and k not in stale}
    env.update({f"{PREFIX}{k}": str(v) for k, v in context.items() if v is not None})
    return env


class Hooks:
    """The hooks of one job. Thread-safe: `before_vm` hooks of several VMs may run at once."""

    def __init__(self, config: HooksConfig, job_id: str, job_name: str, secret_names: set[str]) -> None:
        self.config = config
        self.job_id = job_id
        self.job_name = job_name
        self.secret_names = set(secret_names)
        self._runs: list[HookRun] = []
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.config)

    @property
    def runs(self) -> list[HookRun]:
        with self._lock:
            return list(self._runs)

    def run(self, event: str, **context: Any) -> list[HookRun]:
        """Run every hook of `event` in order, with `context` (VM, STATUS, ...; lower case keys accepted); stop at
        the first that fails with a policy other than `ignore`. Returns the runs."""
        done = []
        values = {"EVENT": event, "JOB_ID": self.job_id, "JOB_NAME": self.job_name,
                  **{k.upper(): ("" if v is None else str(v)) for k, v in context.items()}}
        for index, hook in enumerate(self.config.of(event)):
            outcome = self._one(event, index, hook, values)
            with self._lock:
                self._runs.append(outcome)
            done.append(outcome)
            if not outcome.ok and outcome.policy != "ignore":
                break
        return done

    def _one(self, event: str, index: int, hook: HookConfig, context: Mapping[str, str]) -> HookRun:
        policy = self.config.policy(event, hook)
        argv: list[str] | str = hook.command
        shown = argv if isinstance(argv, str) else " ".join(argv)
        env = hook_environment(self.secret_names, context)
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, shell=hook.shell, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            return HookRun(event, index, shown, context.get("VM", ""), policy, None, 0.0, "", error=str(exc))
        kept = _Capture(proc, hook.output_bytes)
        timed_out = False
        try:
            proc.wait(timeout=hook.timeout_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop(proc)
        kept.join()
        seconds = time.monotonic() - started
        return HookRun(event, index, shown, context.get("VM", ""), policy, None if timed_out else proc.returncode,
                       hook.timeout_seconds if timed_out else seconds, kept.text(), timed_out)


class _Capture:
    """Read a process's output to its end (so it never blocks on a full pipe), keeping the first `limit` bytes."""

    def __init__(self, proc: subprocess.Popen[bytes], limit: int) -> None:
        self.limit = limit
        self.kept = bytearray()
        self.dropped = 0
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with contextlib.suppress(OSError, ValueError):
            while chunk := proc.stdout.read1(65536):
                room = self.limit - len(self.kept)
                self.kept += chunk[:max(0, room)]
                self.dropped += max(0, len(chunk) - max(0, room))
        with contextlib.suppress(OSError):
            proc.stdout.close()

    def join(self) -> None:
        self._thread.join(_KILL_AFTER + 1)

    def text(self) -> str:
        text = self.kept.decode(errors="replace")
        return text + (f"\n… ({self.dropped} more bytes not kept)" if self.dropped else "")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Terminate the hook's process group; kill it if it is still there after a grace time."""
    for sig, wait in ((signal.SIGTERM, _KILL_AFTER), (signal.SIGKILL, _KILL_AFTER)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


class HookFault(JobFault):
    """A hook whose `on_error` is `fail_job` failed: the job ends, every VM left with this reason."""


def before_vm_gate(hooks: Hooks) -> Callable[[Assignment, VM], None]:
    """What an attempt calls before it snapshots its VM: the `before_vm` hooks, then their policy — `HookFault`
    ends the job, `VmFault` ends the VM for the job, `ignore` goes on."""

    def gate(assignment: Assignment, vm: VM) -> None:
        for run in hooks.run("before_vm", vm=vm.name, vm_moref=vm.moref, proxy=assignment.proxy,
                             mode=assignment.mode, status="starting"):
            if run.ok or run.policy == "ignore":
                continue
            if run.policy == "fail_job":
                raise HookFault(run.reason())
            raise VmFault(f"skipped: {run.reason()}")

    return gate
