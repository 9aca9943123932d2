"""The vCenter side of a backup attempt: snapshot the VM, read its disks' changes, build the assigned transport.

`VSphereSnapshotter` implements `vsphere_proxy.engine.attempt.Snapshotter`; each snapshot it makes is a
`VSphereVmSnapshot` whose `release()` removes it and whose `saved()` reads what recreating the VM needs
(`adapters.vm_config`, once per snapshot). Transports by mode: `san`/`direct-nfs` read the flat extent
through the proxy's datastore -> path map, `hotadd` attaches the disk to the proxy VM, `nbd` streams it from the
datastore HTTP endpoint with the session cookie.

The job's `SnapshotPolicy` decides quiescing (a quiesce fault retried `quiesce_retries` times, then the VM fails
under `required`, or is snapshotted crash-consistent under `preferred`) and what happens when the VM's disks need
consolidation once the snapshot is removed (`auto`: ConsolidateVMDisks_Task, `report`: noted only). What it did is
in the snapshot's `notes`; a consolidation that fails is a note, never a failed backup.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from adapters.cbt import CbtUnavailable, changed_areas
from adapters.errors import VSphereError
from adapters.hotadd_transport import GuestDevices, HotAddTransport
from adapters.nbd import NbdTransport
from adapters.retry import DEFAULT_RETRY, RetryPolicy
from adapters.session import Session
from adapters.snapshots import (
    Snapshot,
    consolidate_disks,
    consolidation_needed,
    create_snapshot,
    quiesce_fault,
    remove_snapshot,
)
from adapters.tasks import TaskError, describe_fault
from adapters.vm_config import saved_vm
from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.engine.attempt import ChangesUnavailable, SavedVm, SnapshotDiskInfo
from vsphere_proxy.faults import VmFault
from vsphere_proxy.jobs.backend import SnapshotPolicy
from vsphere_proxy.model import VM
from vsphere_proxy.transports import Transport, TransportError
from vsphere_proxy.transports.file import FileTransport


@dataclass(frozen=True)
class ProxyAccess:
    """How one proxy reaches disks: its VM (hot-add), its mounted datastores (san, direct NFS)."""

    name: str
    vm_moref: str | None = None  # VM proxies only
    paths: Mapping[str, Path] = field(default_factory=dict)  # datastore name -> local mount point
    devices: GuestDevices | None = None  # how the guest names a hot-added disk


class VSphereVmSnapshot:
    def __init__(self, snapshotter: VSphereSnapshotter, snapshot: Snapshot, proxy: ProxyAccess, vm: VM,
                 notes: tuple[str, ...] = ()) -> None:
        self._owner = snapshotter
        self.notes = notes  # for the VM's report: a crash-consistent fall-back; after release(), consolidation
        self.snapshot = snapshot
        self.vm = vm
        self.name = snapshot.name
        self.proxy = proxy
        self.disks = tuple(SnapshotDiskInfo(d.index, d.key, d.label, d.capacity_bytes, d.file, d.datastore,
                                            d.change_id) for d in snapshot.disks)
        self._released = False
        self._saved: SavedVm | None = None
        self._saving = threading.Lock()
        self._lock = threading.Lock()

    def saved(self) -> SavedVm:
        """The VM's configuration at the snapshot and its NVRAM file, read once; never raises."""
        with self._saving:
            if self._saved is None:
                o = self._owner
                self._saved = saved_vm(o.session, self.snapshot.vm_moref, self.snapshot.moref, self.vm, o.datacenter,
                                       retry=o.retry)
            return self._saved

    def changed_areas(self, disk: SnapshotDiskInfo, since: str) -> list[tuple[int, int]]:
        o = self._owner
        try:
            return changed_areas(o.session, self.snapshot.vm_moref, self.snapshot.moref, disk.key, disk.capacity,
                                 since, retry=o.retry)
        except CbtUnavailable as e:
            raise ChangesUnavailable(str(e)) from None
        except VSphereError as e:
            raise ChangesUnavailable(f"QueryChangedDiskAreas failed: {e}") from None

    def transport(self, mode: str) -> Transport:
        o, p = self._owner, self.proxy
        if mode in ("san", "direct-nfs"):
            return FileTransport(mode, p.paths)
        if mode == "hotadd":
            if p.vm_moref is None or p.devices is None:
                raise TransportError(f"hotadd: proxy {p.name} is not a VM proxy with a device resolver")
            return HotAddTransport(o.session, p.vm_moref, p.devices, retry=o.retry, job_id=o.job_id)
        if mode == "nbd":
            s = o.session
            return NbdTransport(s.base_url, o.datacenter, s.cookie, s.verify, attempts=o.nbd_attempts,
                                timeout=s.timeout, renew=s.renew_cookie)
        raise TransportError(f"unknown access mode {mode!r}")

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            remove_snapshot(self._owner.session, self.snapshot.moref, retry=self._owner.retry)
            self._released = True
            self.notes += self._consolidate()

    def _consolidate(self) -> tuple[str, ...]:
        """After the removal: the VM's disks consolidated when they need it (policy `auto`), or the need noted."""
        o, moref = self._owner, self.snapshot.vm_moref
        try:
            if not consolidation_needed(o.session, moref, retry=o.retry):
                return ()
        except VSphereError as e:
            return (f"whether the disks need consolidation was not read: {e}",)
        if o.policy.consolidate != "auto":
            return (f"disks need consolidation (policy.consolidate: {o.policy.consolidate})",)
        try:
            consolidate_disks(o.session, moref, retry=o.retry)
        except VSphereError as e:
            return (f"disks need consolidation, which failed: {e}",)
        return ("disks consolidated after the snapshot was removed",)


NO_QUIESCE = SnapshotPolicy()  # a snapshotter's default: crash-consistent snapshots, consolidation auto


class VSphereSnapshotter:
    def __init__(self, session: Session, datacenter: str, vms: Mapping[str, VM], proxies: Mapping[str, ProxyAccess],
                 job_id: str, *, policy: SnapshotPolicy = NO_QUIESCE, retry: RetryPolicy = DEFAULT_RETRY,
                 nbd_attempts: int = 4, quiesce_pause: float = 2.0,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        """`policy`: the job's `SnapshotPolicy`; `quiesce_pause`: seconds between two tries of a quiesced
        snapshot."""
        self.session = session
        self.datacenter = datacenter
        self.vms = dict(vms)
        self.proxies = dict(proxies)
        self.job_id = job_id
        self.policy = policy
        self.quiesce = policy.quiesces
        self.quiesce_pause = quiesce_pause
        self.sleep = sleep
        self.retry = retry
        self.nbd_attempts = nbd_attempts

    def snapshot(self, assignment: Assignment) -> VSphereVmSnapshot:
        vm = self.vms[assignment.vm]
        proxy = self.proxies.get(assignment.proxy) or ProxyAccess(assignment.proxy)
        if not (self.quiesce and vm.power_state == "poweredOn"):  # a powered-off VM has no guest to quiesce
            return VSphereVmSnapshot(self, self._create(vm, quiesce=False), proxy, vm)
        tries = self.policy.quiesce_retries + 1
        for n in range(1, tries + 1):
            try:
                return VSphereVmSnapshot(self, self._create(vm, quiesce=True), proxy, vm)
            except TaskError as e:
                fault = quiesce_fault(e)
                if fault is None:
                    raise
                if n < tries:
                    self.sleep(self.quiesce_pause)
                    continue
                if self.policy.quiesce == "required":  # the policy's retries are spent: later rounds would repeat them
                    raise VmFault(f"{e} (quiesced snapshot tried {tries} times, policy.quiesce: required)") from e
                note = (f"quiesce failed ({_short(fault)}), backed up from a crash-consistent snapshot "
                        f"(tried {tries} times, policy.quiesce: preferred)")
        return VSphereVmSnapshot(self, self._create(vm, quiesce=False), proxy, vm, (note,))

    def _create(self, vm: VM, *, quiesce: bool) -> Snapshot:
        return create_snapshot(self.session, vm.moref, self.job_id, quiesce=quiesce, retry=self.retry)


def _short(fault: BaseException) -> str:
    """`describe_fault` without pyVmomi's module path: "ApplicationQuiesceFault: ..."."""
    return describe_fault(fault).removeprefix("vim.fault.")
