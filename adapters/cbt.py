"""Changed Block Tracking (DESIGN §5, incremental): which areas of a snapshot's disk changed since a changeId.

A disk's changeId is read from a snapshot (`SnapshotDisk.change_id`) and kept with the restore point; the next
backup asks `QueryChangedDiskAreas` on its own snapshot for the areas changed since that changeId ("*" asks for
every allocated area, for a first full backup). vCenter answers one window at a time, so the query is repeated
from offset 0 until the whole capacity is covered. When tracking is off, or was reset since the changeId was
taken (the VM's changeIds start anew), vCenter refuses and `CbtUnavailable` says why: the backup then reads the
whole disk. Reads go through the PropertyCollector; calls and tasks are retried on transient faults.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pyVmomi import vim, vmodl

from adapters.errors import VSphereError
from adapters.properties import managed, read_one
from adapters.properties import vm as vm_ref
from adapters.retry import DEFAULT_RETRY, RetryPolicy
from adapters.session import Session
from adapters.snapshots import create_snapshot, remove_snapshot
from adapters.tasks import describe_fault

ALL_AREAS = "*"  # the changeId that asks for every allocated area of the disk


class CbtUnavailable(VSphereError):
    """Changed areas cannot be had for this disk and changeId (tracking off, reset, or never active): read all."""


def merge_areas(areas: Iterable[tuple[int, int]], capacity: int | None = None) -> list[tuple[int, int]]:
    """(offset, length) areas sorted, overlapping and adjacent ones merged, empty ones dropped, clipped to
    [0, capacity) when a capacity is given."""
    spans = []
    for offset, length in areas:
        start, end = max(0, offset), offset + length
        if capacity is not None:
            end = min(end, capacity)
        if end > start:
            spans.append((start, end))
    spans.sort()
    out: list[list[int]] = []
    for start, end in spans:
        if out and start <= out[-1][1]:
            out[-1][1] = max(out[-1][1], end)
        else:
            out.append([start, end])
    return [(start, end - start) for start, end in out]


def changed_areas(
    session: Session,
    vm_moref: str,
    snapshot_moref: str,
    device_key: int,
    capacity: int,
    change_id: str,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
) -> list[tuple[int, int]]:
    """The (offset, length) areas of disk `device_key` of the snapshot that changed since `change_id`, merged
    and sorted; `change_id` "*" gives every allocated area.

    Raises `CbtUnavailable` when vCenter refuses the changeId (tracking reset since) or has no change tracking
    for the disk (tracking off, or off when the snapshot was taken); `VSphereError` on any other failure,
    transient faults having been retried per call.
    """
    if capacity <= 0:
        raise ValueError(f"capacity: must be > 0, got {capacity}")
    if not change_id:
        raise CbtUnavailable(f"{vm_moref} disk {device_key}: no changeId to query changes from")
    vm = vm_ref(session, vm_moref)
    snapshot = managed(session, vim.vm.Snapshot, snapshot_moref)
    where = f"{vm_moref} disk {device_key}"
    areas: list[tuple[int, int]] = []
    offset = 0
    while offset < capacity:
        what = f"query changed areas of {where} in snapshot {snapshot_moref} from offset {offset}"

        def query(start: int = offset) -> Any:
            try:
                return vm.QueryChangedDiskAreas(snapshot=snapshot, deviceKey=device_key, startOffset=start,
                                                changeId=change_id)
            except vim.fault.FileFault as e:
                raise CbtUnavailable(f"{where}: change tracking is not available ({_reason(e)})") from e
            except vmodl.fault.InvalidArgument as e:
                if getattr(e, "invalidProperty", None) == "changeId":
                    raise CbtUnavailable(f"{where}: changeId {change_id} is no longer valid (change tracking "
                                         f"was reset)") from e
                raise

        info = retry.call(query, what)
        start, length = int(info.startOffset), int(info.length)
        if start != offset or length <= 0:
            raise VSphereError(f"{what}: vCenter answered the window ({start}, {length}), which does not "
                               "advance from there")
        areas.extend((int(a.start), int(a.length)) for a in info.changedArea or [])
        offset = start + length
    return merge_areas(areas, capacity)


def _reason(fault: Any) -> str:
    msg = str(getattr(fault, "msg", "") or "")
    return msg or describe_fault(fault)


def cbt_enabled(session: Session, vm_moref: str, *, retry: RetryPolicy = DEFAULT_RETRY) -> bool:
    """The VM's `config.changeTrackingEnabled`."""
    props = retry.call(lambda: read_one(session, vm_ref(session, vm_moref), ["config.changeTrackingEnabled"]),
                       f"read change tracking of {vm_moref}")
    return bool(props.get("config.changeTrackingEnabled"))


def set_cbt(session: Session, vm_moref: str, enabled: bool, *, retry: RetryPolicy = DEFAULT_RETRY) -> bool:
    """Turn the VM's change tracking on or off and return its previous state; no reconfiguration when it is
    already so. On a powered-on VM, vSphere applies the change at the VM's next stun (a snapshot's creation or
    removal); `reset_cbt` does that."""
    ref = vm_ref(session, vm_moref)
    what = f"turn change tracking {'on' if enabled else 'off'} on {vm_moref}"
    previous: bool | None = None

    def attempt() -> bool:
        nonlocal previous
        current = bool(read_one(session, ref, ["config.changeTrackingEnabled"]).get("config.changeTrackingEnabled"))
        if previous is None:
            previous = current
        if current != enabled:  # a retried attempt finds the state an interrupted one may already have set
            task = ref.ReconfigVM_Task(spec=vim.vm.ConfigSpec(changeTrackingEnabled=enabled))
            retry.wait_task(session, task, what)
        return previous

    return retry.call(attempt, what)


def reset_cbt(session: Session, vm_moref: str, job_id: str = "cbt-reset", *,
              retry: RetryPolicy = DEFAULT_RETRY) -> None:
    """Reset the VM's change tracking: off, a snapshot made and removed (the stun that applies it), on again.

    Every changeId taken before is invalid afterwards. Tracking is turned back on even when the snapshot fails.
    """
    set_cbt(session, vm_moref, False, retry=retry)
    try:
        # Creating and removing the snapshot is the stun cycle; nothing happens between them to fail.
        snapshot = create_snapshot(session, vm_moref, job_id, retry=retry)
        remove_snapshot(session, snapshot, retry=retry)
    finally:
        set_cbt(session, vm_moref, True, retry=retry)
