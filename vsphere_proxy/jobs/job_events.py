"""The job's event stream for callers (`backup --events FILE|-`): one JSON object per line, as `docs/events.md`
specifies (version 1), so that a backup product can show progress and take the results without scraping text.

`EventWriter` is a `JobObserver`; the job calls `job_started` before its first VM and the caller `job_ended` with
the report. Writing never fails the job: a stream that cannot be written (a reader gone, a full disk) is given up
and the failure kept in `problem`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

from vsphere_proxy.backup_report import BackupReport
from vsphere_proxy.coordinator import Assignment, Coordinator, VmStatus
from vsphere_proxy.engine.events import AttemptEnd
from vsphere_proxy.engine.protocol import Observer

SCHEMA_VERSION = 1
PROGRESS_EVERY = 1.0  # seconds: at most one vm_progress event per VM this often


class EventWriter(Observer):
    def __init__(self, out: TextIO, *, clock: Callable[[], float] = time.monotonic,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.out = out
        self.clock = clock
        self.now = now
        self.job = ""
        self.problem = ""
        self._seq = 0
        self._lock = threading.Lock()
        self._sizes: dict[str, int] = {}
        self._read: dict[str, dict[int, int]] = {}  # vm -> disk -> bytes read in its current attempt
        self._last_progress: dict[str, float] = {}
        self._stranded: set[tuple[str, int]] = set()
        self._round = 0
        self._coordinator: Coordinator | None = None

    def emit(self, kind: str, **fields: Any) -> None:
        with self._lock:
            if self.problem:
                return
            self._seq += 1
            record = {"v": SCHEMA_VERSION, "seq": self._seq, "time": self.now().isoformat(timespec="milliseconds"),
                      "type": kind, "job": self.job, **fields}
            try:
                self.out.write(json.dumps(record, default=str) + "\n")
                self.out.flush()
            except (OSError, ValueError) as exc:  # a closed pipe, a full disk: the job goes on without events
                self.problem = f"events: the stream could not be written ({exc}); no further events"

    # -- called by the job and its caller -------------------------------------------------------------------------

    def job_started(self, job_id: str, name: str, engine: str, vms: dict[str, int], proxies: Sequence[str],
                    limits: dict[str, int]) -> None:
        """`vms`: name -> bytes to read (the VMs the job will back up)."""
        self.job = job_id
        self._sizes = dict(vms)
        self.emit("job_started", name=name, engine=engine, vms=sorted(vms), proxies=list(proxies),
                  stream_limits=dict(limits))

    def job_ended(self, report: BackupReport) -> None:
        """One `vm_ended` per VM of the report (skipped ones included), then `job_ended` with the rest of it."""
        data = report.to_json()
        self.job = report.job_id
        for line in data["vms"]:
            self.emit("vm_ended", **{"vm": line["vm"], "result": line})
        self.emit("job_ended", summary={k: v for k, v in data.items() if k != "vms"})

    def job_failed(self, message: str, exit_code: int) -> None:
        """The job could not run (bad input, vCenter unreachable): the last event."""
        self.emit("job_ended", summary=None, error=message, exit_code=exit_code)

    # -- engine events --------------------------------------------------------------------------------------------

    def assignment_started(self, assignment: Assignment) -> None:
        a = assignment
        with self._lock:
            self._read[a.vm] = {}
        self.emit("vm_assigned", vm=a.vm, proxy=a.proxy, mode=a.mode, round=a.round, attempt=a.attempt,
                  disks=a.disk_count, reason=a.reason)

    def block_read(self, vm: str, disk: int, position: int) -> None:
        at = self.clock()
        with self._lock:
            disks = self._read.setdefault(vm, {})
            disks[disk] = max(disks.get(disk, 0), position)
            if at - self._last_progress.get(vm, -PROGRESS_EVERY) < PROGRESS_EVERY:
                return
            self._last_progress[vm] = at
            done = sum(disks.values())
        total = self._sizes.get(vm, 0)
        self.emit("vm_progress", vm=vm, bytes_read=done, bytes_total=total,
                  percent=round(100 * min(done, total) / total, 1) if total else None)

    def attempt_ended(self, end: AttemptEnd) -> None:
        self.emit("vm_attempt_ended", vm=end.vm, round=end.round, attempt=end.attempt, proxy=end.proxy,
                  mode=end.mode, ok=end.ok, error=end.error or None, bytes_read=end.bytes_read,
                  bytes_written=end.bytes_written, seconds=round(end.seconds, 3), point=end.point_id, read=end.read,
                  final=end.final)
        coordinator = self._coordinator
        if end.ok or end.final or coordinator is None:
            return
        # the coordinator took the failure in before this event: a VM not failed for good waits for a later round
        # (it may already be running again, when that round had begun)
        status = coordinator.outcome(end.vm).status
        if status not in (VmStatus.FAILED, VmStatus.UNPROTECTED, VmStatus.DONE) and \
                (end.vm, end.round) not in self._stranded:
            self._stranded.add((end.vm, end.round))
            self.emit("vm_stranded", vm=end.vm, round=end.round, error=end.error)

    def states_changed(self, coordinator: Coordinator, vms: Iterable[str]) -> None:
        self._coordinator = coordinator
        if coordinator.round != self._round:
            self._round = coordinator.round
            self.emit("round_started", round=self._round)


def rebuild_report(events: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The job's final report (`backup --json`) from its events alone: `job_ended`'s summary with the VMs of the
    `vm_ended` events, in their order."""
    vms: list[dict[str, Any]] = []
    summary: dict[str, Any] | None = None
    for event in events:
        if event["type"] == "vm_ended":
            vms.append(event["result"])
        elif event["type"] == "job_ended":
            summary = event["summary"]
    if summary is None:
        raise ValueError("no job_ended event with a summary")
    return {**summary, "vms": vms}
