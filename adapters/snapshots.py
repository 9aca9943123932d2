"""Backup snapshots (DESIGN §5): create one per VM and job, read its disks, remove it, sweep what was left behind.

Every snapshot this tool makes is named `SNAPSHOT_PREFIX` + job id + UTC time + a random suffix, so a sweep
recognises ours by name and never touches a snapshot someone else made. Memory is never captured; quiescing is
the policy's choice. Removal keeps child snapshots (`removeChildren=False`) and consolidates the disks.
Reads go through the PropertyCollector; calls and tasks are retried on transient faults (`adapters.retry`).
"""

from __future__ import annotations

import contextlib
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pyVmomi import vim, vmodl

from adapters.errors import VSphereError
from adapters.properties import datastore_names, managed, read, read_one
from adapters.properties import vm as vm_ref
from adapters.retry import DEFAULT_RETRY, RetryPolicy
from adapters.session import Session
from adapters.tasks import TaskError

SNAPSHOT_PREFIX = "vsphere-proxy-"
NAME_MAX = 80  # vSphere's limit on a snapshot's name

# What a quiesced snapshot's task ends in when the guest could not be quiesced: an application or file system
# refused or timed out (ApplicationQuiesceFault), VMware Tools not running in the guest (ToolsUnavailable). A
# crash-consistent snapshot of the same VM can still succeed.
QUIESCE_FAULTS: tuple[type[BaseException], ...] = (vim.fault.ApplicationQuiesceFault, vim.fault.ToolsUnavailable)


def quiesce_fault(exc: BaseException) -> BaseException | None:
    """The quiesce fault a failed snapshot task reported (one of `QUIESCE_FAULTS`), else None."""
    fault = exc.fault if isinstance(exc, TaskError) else None
    return fault if isinstance(fault, QUIESCE_FAULTS) else None


@dataclass(frozen=True, slots=True)
class SnapshotDisk:
    """One virtual disk as the snapshot's configuration records it."""

    index: int  # position among the snapshot's disks
    key: int  # device key
    label: str
    capacity_bytes: int
    file: str  # backing file, "[datastore] vm/vm.vmdk"
    datastore: str
    change_id: str = ""  # the disk's CBT changeId at the snapshot ("" when change tracking is off)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A snapshot this tool made for a backup, with the disks a transport reads."""

    moref: str
    name: str
    vm_moref: str
    disks: tuple[SnapshotDisk, ...]
    quiesced: bool = False


@dataclass(frozen=True, slots=True)
class SnapshotEntry:
    """One node of a VM's snapshot tree."""

    moref: str
    name: str
    vm_moref: str
    description: str = ""
    created: datetime | None = None
    parent: str | None = None  # moref of the parent snapshot
    quiesced: bool = False

    @property
    def ours(self) -> bool:
        return self.name.startswith(SNAPSHOT_PREFIX)

    @property
    def job(self) -> str | None:
        """The backup job that made it (from its description), None when not ours or unreadable."""
        return owner_job(self.description) if self.ours else None


@dataclass(frozen=True, slots=True)
class SweptSnapshot:
    """A left-behind snapshot of ours found by a sweep; `error` is empty when it was removed."""

    vm_moref: str
    moref: str
    name: str
    created: datetime | None
    error: str = ""

    @property
    def removed(self) -> bool:
        return not self.error


_OWNER = re.compile(r"for backup job (\S+?);")


def description_for(job_id: str) -> str:
    """A snapshot's description: names the job owning it (the sweep reads it back with `owner_job`)."""
    return f"Made by vsphere-proxy for backup job {job_id}; vsphere-proxy removes it when the backup ends."


def owner_job(description: str) -> str | None:
    match = _OWNER.search(description or "")
    return match.group(1) if match else None


def snapshot_name(job_id: str, now: datetime) -> str:
    """`vsphere-proxy-<job>-<UTC time>-<6 hex>`, at most 80 characters (the job id is shortened to fit)."""
    if not job_id:
        raise ValueError("job_id: must not be empty")
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    tail = f"-{stamp}-{secrets.token_hex(3)}"
    return SNAPSHOT_PREFIX + job_id[: NAME_MAX - len(SNAPSHOT_PREFIX) - len(tail)] + tail


def walk(trees: Iterable[Any], vm_moref: str, parent: str | None = None) -> list[SnapshotEntry]:
    """Flatten `snapshot.rootSnapshotList` (vim.vm.SnapshotTree nodes), parents before their children."""
    out: list[SnapshotEntry] = []
    for node in trees or []:
        moref = node.snapshot._moId
        out.append(SnapshotEntry(
            moref=moref, name=str(node.name or ""), vm_moref=vm_moref, description=str(node.description or ""),
            created=node.createTime, parent=parent, quiesced=bool(node.quiesced),
        ))
        out.extend(walk(node.childSnapshotList, vm_moref, moref))
    return out


def ours_children_first(entries: Iterable[SnapshotEntry]) -> list[SnapshotEntry]:
    """Our snapshots among `entries` (as `walk` lists them), every child before its parent: the removal order."""
    return [e for e in reversed(list(entries)) if e.ours]


def _entries(info: Any, vm_moref: str) -> list[SnapshotEntry]:
    return walk(info.rootSnapshotList if info is not None else [], vm_moref)


def list_snapshots(session: Session, vm_moref: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> list[SnapshotEntry]:
    """Every snapshot of the VM, ours and others', parents before children."""
    props = retry.call(lambda: read_one(session, vm_ref(session, vm_moref), ["snapshot"]),
                       f"read the snapshots of {vm_moref}")
    return _entries(props.get("snapshot"), vm_moref)


def snapshot_disks(session: Session, snapshot_moref: str, *, retry: RetryPolicy = DEFAULT_RETRY
                   ) -> tuple[SnapshotDisk, ...]:
    """The virtual disks of the snapshot's `config.hardware.device`, with their datastores' names."""
    def read_disks() -> tuple[SnapshotDisk, ...]:
        ref = managed(session, vim.vm.Snapshot, snapshot_moref)
        devices = read_one(session, ref, ["config.hardware.device"]).get("config.hardware.device") or []
        disks = sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)), key=lambda d: d.key)
        names = datastore_names(session, (getattr(d.backing, "datastore", None) for d in disks))
        out = []
        for index, d in enumerate(disks):
            file = str(getattr(d.backing, "fileName", "") or "")
            ds = getattr(d.backing, "datastore", None)
            datastore = names.get(ds._moId, "") if ds is not None else ""
            if not datastore and file.startswith("[") and "]" in file:
                datastore = file[1:file.index("]")]
            out.append(SnapshotDisk(
                index=index, key=d.key, label=d.deviceInfo.label if d.deviceInfo else f"disk {d.key}",
                capacity_bytes=int(d.capacityInBytes or 0) or int(d.capacityInKB or 0) * 1024,
                file=file, datastore=datastore, change_id=str(getattr(d.backing, "changeId", "") or ""),
            ))
        return tuple(out)

    return retry.call(read_disks, f"read the disks of snapshot {snapshot_moref}")


def create_snapshot(
    session: Session,
    vm_moref: str,
    job_id: str,
    *,
    quiesce: bool = False,
    retry: RetryPolicy = DEFAULT_RETRY,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> Snapshot:
    """Snapshot the VM for backup job `job_id` (memory off) and return it with its disks.

    A retried attempt first looks for the snapshot an interrupted attempt may have made (same name), so a retry
    never leaves two. If reading the new snapshot's disks fails, the snapshot is removed before the error is raised.
    """
    name = snapshot_name(job_id, now())
    description = description_for(job_id)
    what = f"create snapshot {name} of {vm_moref}"
    ref = vm_ref(session, vm_moref)
    attempts = 0

    def attempt() -> str:
        nonlocal attempts
        attempts += 1
        if attempts > 1:
            props = read_one(session, ref, ["snapshot"])
            made = [e for e in _entries(props.get("snapshot"), vm_moref) if e.name == name]
            if made:
                return made[0].moref
        task = ref.CreateSnapshot_Task(name=name, description=description, memory=False, quiesce=quiesce)
        result = retry.wait_task(session, task, what)
        if result is None:
            raise VSphereError(f"{what}: the task succeeded without returning the snapshot")
        return str(result._moId)

    try:
        moref = retry.call(attempt, what)
    except Exception as e:  # unless vCenter said the task failed, it may still carry the request out
        if not (isinstance(e, TaskError) and e.fault is not None):
            e.left_behind = f"snapshot {name} of {vm_moref} may have been made: {e}"  # type: ignore[attr-defined]
        raise
    try:
        disks = snapshot_disks(session, moref, retry=retry)
    except BaseException:
        with contextlib.suppress(Exception):
            remove_snapshot(session, moref, retry=retry)
        raise
    return Snapshot(moref=moref, name=name, vm_moref=vm_moref, disks=disks, quiesced=quiesce)


def remove_snapshot(
    session: Session, snapshot: Snapshot | SnapshotEntry | str, *, retry: RetryPolicy = DEFAULT_RETRY
) -> bool:
    """Remove one snapshot (children kept, disks consolidated). False if it was already gone: removal is idempotent."""
    moref = snapshot if isinstance(snapshot, str) else snapshot.moref
    ref = managed(session, vim.vm.Snapshot, moref)
    what = f"remove snapshot {moref}"

    def attempt() -> bool:
        try:
            task = ref.RemoveSnapshot_Task(removeChildren=False, consolidate=True)
        except vmodl.fault.ManagedObjectNotFound:
            return False
        try:
            retry.wait_task(session, task, what)
        except TaskError as e:
            if isinstance(e.fault, vmodl.fault.ManagedObjectNotFound):
                return False
            raise
        return True

    return retry.call(attempt, what)


def job_prefix(job_id: str) -> str:
    """The start of the name of every snapshot `snapshot_name` makes for `job_id`."""
    stamp = 1 + len("20260101T000000Z") + 1 + 6
    return SNAPSHOT_PREFIX + job_id[: NAME_MAX - len(SNAPSHOT_PREFIX) - stamp] + "-"


def sweep_snapshots(
    session: Session, vm_morefs: Iterable[str], *, retry: RetryPolicy = DEFAULT_RETRY, job_id: str | None = None,
    spare: Callable[[str], bool] | None = None,
) -> list[SweptSnapshot]:
    """Remove every snapshot of ours (name starts with `SNAPSHOT_PREFIX`; with `job_id`, only that job's) on the
    VMs; leave all others. With `spare`, a snapshot whose owning job (its description) `spare` says is alive is
    left alone: a running job's snapshots are never removed by another job.

    Children are removed before their parents. A removal that fails is reported with its error and the sweep
    goes on with the next one.
    """
    refs = [vm_ref(session, m) for m in dict.fromkeys(vm_morefs)]
    props = retry.call(lambda: read(session, refs, ["snapshot"]), "read the snapshots of the VMs to sweep")
    swept: list[SweptSnapshot] = []
    for ref in refs:
        entries = _entries(props.get(ref._moId, {}).get("snapshot"), ref._moId)
        for entry in ours_children_first(entries):
            if job_id is not None and not entry.name.startswith(job_prefix(job_id)):
                continue
            owner = entry.job
            if spare is not None and owner is not None and owner != job_id and spare(owner):
                continue
            error = ""
            try:
                remove_snapshot(session, entry.moref, retry=retry)
            except VSphereError as e:
                error = str(e)
            swept.append(SweptSnapshot(vm_moref=entry.vm_moref, moref=entry.moref, name=entry.name,
                                       created=entry.created, error=error))
    return swept


def consolidation_needed(session: Session, vm_moref: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> bool:
    """The VM's `runtime.consolidationNeeded`: its disks still have delta files a snapshot removal left."""
    props = retry.call(lambda: read_one(session, vm_ref(session, vm_moref), ["runtime.consolidationNeeded"]),
                       f"read runtime.consolidationNeeded of {vm_moref}")
    return bool(props.get("runtime.consolidationNeeded"))


def consolidate_disks(session: Session, vm_moref: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Merge the VM's left-over delta disks (ConsolidateVMDisks_Task), waiting for the task within the policy's
    task timeout."""
    ref = vm_ref(session, vm_moref)
    what = f"consolidate the disks of {vm_moref}"
    retry.call(lambda: retry.wait_task(session, ref.ConsolidateVMDisks_Task(), what), what)
