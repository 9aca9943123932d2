"""The report of one backup job: the coordinator's outcome of every VM joined with what its last attempt moved
(bytes read and stored, dedup, how the disks were read, seconds, restore point), the VMs skipped with their reason,
and what the job-start sweeps cleaned up."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vsphere_proxy.coordinator import JobReport, VmStatus
from vsphere_proxy.engine.events import AttemptEnd

EXIT_FOR_STATUS = {"complete": 0, "partial": 3, "failed": 4}


@dataclass(frozen=True)
class VmLine:
    vm: str
    status: str  # done | failed | unprotected | skipped
    proxy: str | None = None
    mode: str | None = None
    round: int = 0
    attempts: int = 0
    bytes_read: int = 0
    bytes_written: int = 0  # new chunk bytes stored (compressed)
    dedup_ratio: float | None = None  # bytes read / bytes written; None when nothing new was written
    seconds: float = 0.0
    read: str = ""  # full | incremental (CBT) | full: <why>
    point: str | None = None
    error: str = ""
    fell_back: str = ""
    notes: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class BackupReport:
    job_id: str
    job: JobReport
    vms: tuple[VmLine, ...]
    swept_snapshots: tuple[str, ...] = ()
    swept_disks: tuple[str, ...] = ()
    cleanup_errors: tuple[str, ...] = ()
    modes: dict[str, int] = field(default_factory=dict)  # done VMs per access mode
    dispatch: dict[str, Any] = field(default_factory=dict)  # distributed engine: assignments, decide/queue ms
    left_behind: tuple[str, ...] = ()  # snapshots and hot-added disks cleanup could not remove (next sweep does)
    problems: tuple[str, ...] = ()  # job-level failures besides the VMs' (the catalog could not record the end)
    retention: dict[str, Any] | None = None  # policy.retention.after_backup: what the retention run decided and did
    hooks: tuple[dict[str, Any], ...] = ()  # every hook run of the job (`vsphere_proxy.hooks.HookRun.to_json`)
    notify: dict[str, Any] | None = None  # the job-end notification (`vsphere_proxy.notify.NotifyOutcome.to_json`)
    seconds: float = 0.0  # the job's wall time

    @property
    def status(self) -> str:
        return self.job.status

    @property
    def exit_code(self) -> int:
        return 4 if self.problems else EXIT_FOR_STATUS.get(self.status, 4)

    def totals(self) -> dict[str, int]:
        return {"bytes_read": sum(v.bytes_read for v in self.vms),
                "bytes_written": sum(v.bytes_written for v in self.vms)}

    def to_json(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for v in self.vms:
            counts[v.status] = counts.get(v.status, 0) + 1
        return {
            "job_id": self.job_id, "job": self.job.job, "status": self.status, "exit_code": self.exit_code,
            "rounds": self.job.rounds, "job_limit": self.job.limit, "counts": counts, "modes": self.modes,
            **self.totals(),
            "swept": {"snapshots": list(self.swept_snapshots), "attached_disks": list(self.swept_disks),
                      "errors": list(self.cleanup_errors)},
            "dispatch": self.dispatch,
            "left_behind": list(self.left_behind),
            "problems": list(self.problems),
            "retention": self.retention,
            "hooks": list(self.hooks),
            "notify": self.notify,
            "seconds": round(self.seconds, 3),
            "vms": [v.to_json() for v in self.vms],
        }


def build_report(job_id: str, job: JobReport, ends: Iterable[AttemptEnd], skipped: Sequence[tuple[str, str]],
                 *, swept_snapshots: Sequence[str] = (), swept_disks: Sequence[str] = (),
                 cleanup_errors: Sequence[str] = (), dispatch: dict[str, Any] | None = None,
                 left_behind: Sequence[str] = (),
                 disk_notes: Mapping[str, Sequence[str]] | None = None) -> BackupReport:
    """Join the coordinator's outcomes with each VM's last attempt; `skipped` is (vm, reason)."""
    last: dict[str, AttemptEnd] = {}
    for e in ends:
        if e.vm not in last or (e.round, e.attempt) >= (last[e.vm].round, last[e.vm].attempt):
            last[e.vm] = e
    lines = []
    for v in job.vms:
        e = last.get(v.vm)
        ok = v.status is VmStatus.DONE
        written = e.bytes_written if e and ok else 0
        read = e.bytes_read if e else 0
        lines.append(VmLine(
            vm=v.vm, status=v.status.value, proxy=v.proxy, mode=v.mode, round=v.round, attempts=v.attempts,
            bytes_read=read, bytes_written=written,
            dedup_ratio=round(read / written, 2) if ok and written else None,
            seconds=round(e.seconds, 3) if e else 0.0, read=e.read if e and ok else "",
            point=e.point_id if e and ok else None, error=v.error, fell_back=v.fell_back,
            notes=(*(disk_notes or {}).get(v.vm, ()), *(e.notes if e else ())),
        ))
    lines += [VmLine(vm=name, status="skipped", error=reason) for name, reason in skipped]
    modes: dict[str, int] = {}
    for line in lines:
        if line.status == VmStatus.DONE.value and line.mode:
            modes[line.mode] = modes.get(line.mode, 0) + 1
    return BackupReport(job_id, job, tuple(sorted(lines, key=lambda x: x.vm)), tuple(swept_snapshots),
                        tuple(swept_disks), tuple(cleanup_errors), dict(sorted(modes.items())), dict(dispatch or {}),
                        tuple(dict.fromkeys(left_behind)))
