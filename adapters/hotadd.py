"""Hot-add (DESIGN §3 tier 2, §5): attach a snapshot's base disk to a proxy VM, detach it, sweep leftovers.

The proxy VM is reconfigured to add the existing disk file — no `fileOperation`, so vCenter neither creates
nor destroys a file — in `independent_nonpersistent` mode: whatever the proxy might write goes to a redo log
that is discarded at detach, and the snapshot keeps the VM's own writes off the base disk meanwhile. The disk
goes on a free unit of an existing SCSI controller; a paravirtual controller is added when every unit is taken
(controllers stay: most guests cannot lose one while running). Reads go through the PropertyCollector.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from adapters.errors import VSphereError
from adapters.properties import host_datastores, read, read_one
from adapters.properties import vm as vm_ref
from adapters.retry import DEFAULT_RETRY, RetryPolicy
from adapters.session import Session

WRITE_DISK_MODE = "independent_persistent"  # a restore writes through the attached disk
HOTADD_DISK_MODE = "independent_nonpersistent"
SCSI_UNITS = 16  # units 0-15 per SCSI bus; the controller itself sits on one of them (7 by default)
SCSI_BUSES = 4
DEVICE_PATHS = ["config.hardware.device"]
OWNER_KEY_PREFIX = "vsphere-proxy.hotadd."  # + a digest of the disk file: the extraConfig naming its job


def owner_key(disk_file: str) -> str:
    """The proxy VM's extraConfig key recording which backup job attached `disk_file`."""
    return OWNER_KEY_PREFIX + hashlib.sha256(disk_file.encode()).hexdigest()[:24]


def owners(extra_config: Iterable[Any]) -> dict[str, str]:
    """extraConfig key -> job id of the hot-add owner records (the last value of a key wins; empty: none)."""
    out: dict[str, str] = {}
    for option in extra_config or []:
        key = str(getattr(option, "key", "") or "")
        if key.startswith(OWNER_KEY_PREFIX):
            out[key] = str(getattr(option, "value", "") or "")
    return {k: v for k, v in out.items() if v}


@dataclass(frozen=True, slots=True)
class AttachedDisk:
    """A disk attached to a proxy VM for a backup."""

    proxy_moref: str
    key: int  # device key on the proxy VM
    controller_key: int
    unit: int
    file: str  # "[datastore] vm/vm.vmdk"
    disk_mode: str = HOTADD_DISK_MODE
    uuid: str = ""  # the backing's UUID: how a guest with disk.EnableUUID names the device
    job: str = ""  # the backup job that attached it (the proxy VM's extraConfig), "" when unknown


@dataclass(frozen=True, slots=True)
class SweptDisk:
    """A left-behind disk found by `sweep_attached`; `error` is empty when it was detached."""

    disk: AttachedDisk
    error: str = ""

    @property
    def detached(self) -> bool:
        return not self.error


def _scsi_controllers(devices: Iterable[Any]) -> list[Any]:
    return sorted((d for d in devices if isinstance(d, vim.vm.device.VirtualSCSIController)),
                  key=lambda c: c.busNumber)


def free_slot(devices: Sequence[Any]) -> tuple[int, int] | None:
    """(controller key, unit) of the first free unit on the VM's SCSI controllers, lowest bus first; None if full."""
    used = {(d.controllerKey, d.unitNumber) for d in devices if getattr(d, "unitNumber", None) is not None}
    for ctrl in _scsi_controllers(devices):
        own = ctrl.scsiCtlrUnitNumber if ctrl.scsiCtlrUnitNumber is not None else 7
        for unit in range(SCSI_UNITS):
            if unit != own and (ctrl.key, unit) not in used:
                return ctrl.key, unit
    return None


def new_controller(devices: Sequence[Any], key: int = -100) -> vim.vm.device.ParaVirtualSCSIController | None:
    """A paravirtual SCSI controller on the lowest free bus (temporary key `key`); None if all 4 buses are used."""
    buses = {c.busNumber for c in _scsi_controllers(devices)}
    bus = next((b for b in range(SCSI_BUSES) if b not in buses), None)
    if bus is None:
        return None
    return vim.vm.device.ParaVirtualSCSIController(key=key, busNumber=bus, sharedBus="noSharing")


def place_disk(devices: Sequence[Any]) -> tuple[list[Any], tuple[int, int]] | None:
    """Where a disk added to a VM goes: (the device changes a new controller needs, (controller key, unit)) — the
    first free SCSI unit, else unit 0 of a new paravirtual controller; None when every bus is taken."""
    slot = free_slot(devices)
    if slot is not None:
        return [], slot
    ctrl = new_controller(devices)
    if ctrl is None:
        return None
    return [vim.vm.device.VirtualDeviceSpec(operation="add", device=ctrl)], (ctrl.key, 0)


def _file(device: Any) -> str:
    return str(getattr(device.backing, "fileName", "") or "")


def _disks(devices: Iterable[Any]) -> list[Any]:
    return [d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)]


def _attached(proxy_moref: str, disk: Any, job: str = "") -> AttachedDisk:
    return AttachedDisk(proxy_moref=proxy_moref, key=disk.key, controller_key=disk.controllerKey,
                        unit=disk.unitNumber, file=_file(disk),
                        disk_mode=str(getattr(disk.backing, "diskMode", "") or ""),
                        uuid=str(getattr(disk.backing, "uuid", "") or ""), job=job)


def _datastore(datastore_path: str) -> str:
    """`[ds] vm/vm.vmdk` -> `ds`."""
    if not datastore_path.startswith("[") or "] " not in datastore_path:
        raise ValueError(f"{datastore_path!r}: not a datastore path ('[datastore] folder/file.vmdk')")
    return datastore_path[1:datastore_path.index("] ")]


def _directory(datastore_path: str) -> str:
    """`[ds] vm/vm.vmx` -> `vm` (the folder inside its datastore)."""
    path = datastore_path.split("] ", 1)[1] if datastore_path.startswith("[") else datastore_path
    return posixpath.dirname(path.strip())


def left_behind(devices: Sequence[Any], vmx_path: str, owned: Iterable[str] = ()) -> list[Any]:
    """Disks attached for a backup or a restore and not detached: backing file outside the VM's own folder (on
    any datastore), in the hot-add disk mode, or in the write mode with an owner recorded (`owned`: the files
    the VM's extraConfig names an owning job for). The VM's own disks — its folder, persistent modes without an
    owner — are never listed.
    """
    own, recorded = _directory(vmx_path), set(owned)
    return [d for d in _disks(devices)
            if _file(d) and _directory(_file(d)) != own
            and (getattr(d.backing, "diskMode", None) == HOTADD_DISK_MODE
                 or (getattr(d.backing, "diskMode", None) == WRITE_DISK_MODE and _file(d) in recorded))]


def attach_disk(
    session: Session,
    proxy_vm_moref: str,
    disk_file: str,
    capacity_bytes: int,
    *,
    retry: RetryPolicy = DEFAULT_RETRY,
    job_id: str = "",
    writable: bool = False,
) -> AttachedDisk:
    """Attach the existing disk `disk_file` ("[datastore] vm/vm.vmdk") to the proxy VM; return where it went.
    Read-only by default (independent non-persistent: nothing the proxy does reaches the file); `writable`
    attaches it independent persistent, so that a restore's writes land in the disk's file.

    The same reconfiguration records `job_id` in the proxy VM's extraConfig (`owner_key`): a sweep by another
    job leaves the disk alone while `job_id` is alive.

    The proxy's host must mount the disk's datastore (the hot-add condition, DESIGN §3). Refuses a file the
    proxy already has attached; a retried attempt adopts the disk an interrupted attempt attached, so a retry
    never attaches it twice.
    """
    ref = vm_ref(session, proxy_vm_moref)
    what = f"attach {disk_file} to {proxy_vm_moref}"
    datastore = _datastore(disk_file)
    attempts = 0

    def attempt() -> AttachedDisk:
        nonlocal attempts
        attempts += 1
        props = read_one(session, ref, [*DEVICE_PATHS, "runtime.host"])
        devices = props.get("config.hardware.device") or []
        present = next((d for d in _disks(devices) if _file(d) == disk_file), None)
        if present is not None:
            if attempts > 1:
                return _attached(proxy_vm_moref, present)
            raise VSphereError(f"{what}: already attached as device {present.key}")
        if props.get("runtime.host") is None:
            raise VSphereError(f"{what}: the proxy VM has no host")
        host, mounted = host_datastores(session, props["runtime.host"])
        if datastore not in mounted:
            raise VSphereError(f"{what}: its host {host} does not mount datastore {datastore!r}")
        placed = place_disk(devices)
        if placed is None:
            raise VSphereError(f"{what}: every unit of its {SCSI_BUSES} SCSI controllers is taken")
        changes, slot = placed
        disk = vim.vm.device.VirtualDisk(
            key=-101, controllerKey=slot[0], unitNumber=slot[1],
            capacityInKB=capacity_bytes // 1024, capacityInBytes=capacity_bytes,
            backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(
                fileName=disk_file, diskMode=WRITE_DISK_MODE if writable else HOTADD_DISK_MODE),
        )
        changes.append(vim.vm.device.VirtualDeviceSpec(operation="add", device=disk))
        extra = [vim.option.OptionValue(key=owner_key(disk_file), value=job_id)] if job_id else []
        spec = vim.vm.ConfigSpec(deviceChange=changes, extraConfig=extra)
        retry.wait_task(session, ref.ReconfigVM_Task(spec=spec), what)
        devices = read_one(session, ref, DEVICE_PATHS).get("config.hardware.device") or []
        added = next((d for d in _disks(devices) if _file(d) == disk_file), None)
        if added is None:
            raise VSphereError(f"{what}: the reconfiguration succeeded but the disk is not on the VM")
        return _attached(proxy_vm_moref, added, job_id)

    return retry.call(attempt, what)


def _detach(session: Session, ref: Any, disk: AttachedDisk, retry: RetryPolicy) -> bool:
    what = f"detach {disk.file} (device {disk.key}) from {ref._moId}"

    def attempt() -> bool:
        devices = read_one(session, ref, DEVICE_PATHS).get("config.hardware.device") or []
        device = next((d for d in _disks(devices) if d.key == disk.key and _file(d) == disk.file), None)
        if device is None:
            return False
        # No fileOperation: the device goes, the file stays; its owner record is cleared (an empty value).
        change = vim.vm.device.VirtualDeviceSpec(operation="remove", device=device)
        extra = [vim.option.OptionValue(key=owner_key(disk.file), value="")]
        spec = vim.vm.ConfigSpec(deviceChange=[change], extraConfig=extra)
        retry.wait_task(session, ref.ReconfigVM_Task(spec=spec), what)
        return True

    return retry.call(attempt, what)


def detach_disk(
    session: Session, proxy_vm_moref: str, attached: AttachedDisk, *, retry: RetryPolicy = DEFAULT_RETRY
) -> bool:
    """Remove the attached disk's device from the proxy VM, keeping its file. False if it was already gone."""
    if attached.proxy_moref != proxy_vm_moref:
        raise ValueError(f"{attached.file} is attached to {attached.proxy_moref}, not {proxy_vm_moref}")
    return _detach(session, vm_ref(session, proxy_vm_moref), attached, retry)


def left_behind_disks(session: Session, proxy_vm_morefs: Iterable[str], *, retry: RetryPolicy = DEFAULT_RETRY
                      ) -> dict[str, list[AttachedDisk]]:
    """Per proxy VM, the disks attached for a backup and left behind (see `left_behind`); one round trip."""
    refs = [vm_ref(session, m) for m in dict.fromkeys(proxy_vm_morefs)]
    props = retry.call(lambda: read(session, refs, [*DEVICE_PATHS, "config.files.vmPathName", "config.extraConfig"]),
                       "read the devices of the proxy VMs")
    out: dict[str, list[AttachedDisk]] = {}
    for moref, p in props.items():
        devices = p.get("config.hardware.device") or []
        jobs = owners(p.get("config.extraConfig") or [])
        owned = [_file(d) for d in _disks(devices) if owner_key(_file(d)) in jobs]
        out[moref] = [_attached(moref, d, jobs.get(owner_key(_file(d)), ""))
                      for d in left_behind(devices, str(p.get("config.files.vmPathName") or ""), owned)]
    return out


def sweep_attached(
    session: Session, proxy_vm_morefs: Iterable[str], *, retry: RetryPolicy = DEFAULT_RETRY,
    spare: Callable[[str], bool] | None = None, job_id: str | None = None,
) -> list[SweptDisk]:
    """Detach every disk left behind on the proxy VMs; a failure is reported with its error and the sweep goes on.
    With `job_id`, only that job's disks; with `spare`, a disk whose owning job `spare` says is alive stays."""
    swept: list[SweptDisk] = []
    for moref, disks in left_behind_disks(session, proxy_vm_morefs, retry=retry).items():
        ref = vm_ref(session, moref)
        for disk in disks:
            if job_id is not None and disk.job != job_id:
                continue
            if spare is not None and disk.job and disk.job != job_id and spare(disk.job):
                continue
            error = ""
            try:
                _detach(session, ref, disk, retry)
            except VSphereError as e:
                error = str(e)
            swept.append(SweptDisk(disk=disk, error=error))
    return swept
