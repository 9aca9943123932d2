"""The ConfigSpec of a restored VM, built from the `vim.vm.ConfigInfo` its restore point saved (DESIGN §8).

What is recreated: the VM's name, guest, CPUs (and cores per socket), memory, hardware version, firmware and
boot options, CPU/memory allocation, annotation, the advanced settings that belong to the guest, the storage
controllers (their type, bus and sharing), every backed-up disk (same controller, unit, capacity, mode and
provisioning, on its target datastore) and every NIC (same adapter type, on its target network, a new MAC
address unless the identity is kept). With `keep_identity` the BIOS and instance UUIDs are the source's too.
Devices that cannot be carried to another VM (CD/DVD media, floppies, serial and parallel ports, USB, PCI
passthrough) are left out and listed, as are disks the backup did not read (physical RDMs).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim

from adapters.vmomi_json import from_json
from vsphere_proxy.jobs.restore_plan import DiskPlan, NicPlan, VmRestorePlan

Device = vim.vm.device
_CONTROLLERS = (Device.VirtualSCSIController, Device.VirtualSATAController, Device.VirtualNVMEController)
_BUILT_IN = (Device.VirtualIDEController, Device.VirtualPCIController, Device.VirtualPS2Controller,
             Device.VirtualSIOController, Device.VirtualKeyboard, Device.VirtualPointingDevice,
             Device.VirtualVideoCard, Device.VirtualVMCIDevice)
# advanced settings that name the source VM's files, identity or state: never carried to a new VM
_DROPPED = re.compile(r"^(nvram|uuid\..*|vc\.uuid|sched\.swap\.derivedName|migrate\..*|ethernet\d+\.generatedAddress.*|"
                      r"vmware\.tools\.internalversion|vmware\.tools\.requiredversion|hpet\d+\.present|"
                      r"checkpoint\..*|vsphere-proxy\..*|tools\.guest\.desktop\.autolock|monitor\.phys_bits_used|"
                      r"numa\.autosize\..*|softPowerOff|svga\.guestBackedPrimaryAware|vmotion\..*|guestinfo\.ip.*)$")


def file_base(name: str) -> str:
    """A VM name as a file or directory name: characters other than letters, digits, `.`, `_`, `-` become `_`."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return safe or "vm"


def disk_file(plan: VmRestorePlan, disk: DiskPlan) -> str:
    """Where the new VM's disk is created: in the VM's directory on the disk's datastore."""
    base = file_base(plan.create_as)
    suffix = "" if disk.index == 0 else f"_{disk.index}"
    return f"[{disk.datastore}] {base}/{base}{suffix}.vmdk"


@dataclass(frozen=True)
class Spec:
    """The ConfigSpec, and what of the saved configuration it leaves out (one line each)."""

    spec: vim.vm.ConfigSpec
    left_out: tuple[str, ...]


def _label(device: Any) -> str:
    info = getattr(device, "deviceInfo", None)
    return getattr(info, "label", "") or type(device).__name__.rsplit(".", 1)[-1]


def _controller(saved: Any, key: int) -> Any:
    new = type(saved)()
    new.key = key
    new.busNumber = saved.busNumber
    if isinstance(saved, Device.VirtualSCSIController):
        new.sharedBus = saved.sharedBus or "noSharing"
    return new


def _disk(saved: Any, plan: VmRestorePlan, d: DiskPlan, key: int, controller_key: int) -> Any:
    backing = Device.VirtualDisk.FlatVer2BackingInfo(
        fileName=disk_file(plan, d), diskMode=getattr(saved.backing, "diskMode", None) or "persistent",
        thinProvisioned=d.provisioning == "thin", eagerlyScrub=d.provisioning == "thick-eager")
    sharing = getattr(saved.backing, "sharing", None)
    if sharing:
        backing.sharing = sharing
    disk = Device.VirtualDisk(key=key, controllerKey=controller_key, unitNumber=saved.unitNumber,
                              capacityInKB=d.capacity // 1024, capacityInBytes=d.capacity, backing=backing)
    for field in ("storageIOAllocation", "shares"):
        if getattr(saved, field, None) is not None:
            setattr(disk, field, getattr(saved, field))
    return disk


def _nic(saved: Any, n: NicPlan, key: int, keep_identity: bool) -> Any:
    nic = type(saved)()
    nic.key = key
    if n.network_kind == "distributed":
        nic.backing = Device.VirtualEthernetCard.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(switchUuid=n.switch_uuid, portgroupKey=n.portgroup_key))
    elif n.network_kind == "opaque":
        nic.backing = Device.VirtualEthernetCard.OpaqueNetworkBackingInfo(opaqueNetworkId=n.network_moref)
    else:
        nic.backing = Device.VirtualEthernetCard.NetworkBackingInfo(
            deviceName=n.network, network=vim.Network(n.network_moref) if n.network_moref else None)
    connectable = getattr(saved, "connectable", None)
    nic.connectable = Device.VirtualDevice.ConnectInfo(
        startConnected=bool(connectable.startConnected) if connectable else True,
        allowGuestControl=bool(connectable.allowGuestControl) if connectable else True, connected=False)
    if keep_identity and saved.macAddress:
        nic.addressType, nic.macAddress = "manual", saved.macAddress
    else:
        nic.addressType = "generated"
    if getattr(saved, "wakeOnLanEnabled", None) is not None:
        nic.wakeOnLanEnabled = saved.wakeOnLanEnabled
    return nic


def _settings(options: Iterable[Any]) -> list[Any]:
    return [vim.option.OptionValue(key=o.key, value=o.value) for o in options or []
            if o.key and not _DROPPED.match(o.key)]


def build_spec(plan: VmRestorePlan) -> Spec:
    """The ConfigSpec to create `plan`'s VM with (`CreateVM_Task`), from the saved ConfigInfo."""
    cfg = plan.point.vm_config
    if cfg is None:
        raise ValueError(f"restore point {plan.point.id} holds no VM configuration")
    info = from_json(cfg.config_info)
    hw = info.hardware
    devices = list(hw.device or []) if hw else []
    by_key = {d.key: d for d in devices}
    left: list[str] = []
    spec = vim.vm.ConfigSpec(
        name=plan.create_as, guestId=info.guestId or cfg.guest_id or "otherGuest64",
        numCPUs=(hw.numCPU if hw else 0) or cfg.cpus or 1, memoryMB=(hw.memoryMB if hw else 0) or cfg.memory_mb or 1024,
        files=vim.vm.FileInfo(vmPathName=f"[{plan.home_datastore}]"),
        annotation=info.annotation or None, extraConfig=_settings(info.extraConfig))
    if hw and hw.numCoresPerSocket:
        spec.numCoresPerSocket = hw.numCoresPerSocket
    if info.version or cfg.hardware_version:
        spec.version = info.version or cfg.hardware_version
    if info.firmware or cfg.firmware:
        spec.firmware = info.firmware or cfg.firmware
    for field in ("bootOptions", "cpuAllocation", "memoryAllocation", "flags", "tools", "cpuHotAddEnabled",
                  "memoryHotAddEnabled", "nestedHVEnabled", "vPMCEnabled", "latencySensitivity"):
        value = getattr(info, field, None)
        if value is not None:
            setattr(spec, field, value)
    if plan.keep_identity:
        spec.uuid, spec.instanceUuid = info.uuid, info.instanceUuid
    changes: list[Any] = []
    keys = iter(range(-100, -100000, -1))
    controllers: dict[int, int] = {}  # saved controller key -> key in the spec
    for d in devices:
        if isinstance(d, _CONTROLLERS):
            controllers[d.key] = next(keys)
            changes.append(Device.VirtualDeviceSpec(operation="add", device=_controller(d, controllers[d.key])))
        elif isinstance(d, Device.VirtualIDEController):
            controllers[d.key] = d.key  # built into every VM, under the same key
    planned = {d.key for d in plan.disks}
    for d in plan.disks:
        saved = by_key.get(d.key)
        if saved is None or saved.controllerKey not in controllers:
            raise ValueError(f"restore point {plan.point.id}: disk {d.index} ({d.label}) is not in the saved "
                             "configuration's devices")
        disk = _disk(saved, plan, d, next(keys), controllers[saved.controllerKey])
        changes.append(Device.VirtualDeviceSpec(operation="add", fileOperation="create", device=disk))
    for n in plan.nics:
        saved = by_key.get(n.key)
        if saved is None:
            raise ValueError(f"restore point {plan.point.id}: NIC {n.label} is not in the saved configuration")
        changes.append(Device.VirtualDeviceSpec(operation="add", device=_nic(saved, n, next(keys), plan.keep_identity)))
    nic_keys = {n.key for n in plan.nics}
    for d in devices:
        if isinstance(d, (*_CONTROLLERS, *_BUILT_IN)) or d.key in planned or d.key in nic_keys:
            continue
        what = "not backed up" if isinstance(d, Device.VirtualDisk) else "not carried to a new VM"
        left.append(f"{_label(d)} ({what})")
    spec.deviceChange = changes
    return Spec(spec, tuple(left))
