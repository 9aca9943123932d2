"""`FakeBackend`: a `VCenterBackend` held in memory, for tests. It is not vCenter and talks to nothing.

It serves an `Inventory` given to it (or built by `FakeBackend.build`: N VMs with the disk sizes asked, on the
datastores asked, one ESXi host mounting them all, and physical proxies), and disk contents keyed by descriptor
file ("[ds] vm/vm.vmdk": bytes). Its snapshots are records — name, owning job, VM — kept in `present` until
removed (`removed`); `made` lists every snapshot its snapshotters made. Their transports are `FakeTransport`s,
whatever the access mode. Sweeps remove our snapshots (named with `PREFIX`) of jobs not spared, like the real
sweep; a fake has no hot-add, so a sweep never detaches a disk.

Faults, injected through attributes a test may change between runs (nothing is patched):
- `snapshot_fails`: names of VMs whose snapshot creation raises `FakeVCenterError`, every time;
- `removal_fails`: names of VMs whose snapshots cannot be removed (a release raises, a sweep reports an error;
  the snapshot stays in `present`);
- `read_fails(vm, offset)`, `hang` / `hang_on`: the transports' faults (see `vsphere_proxy.transports.fake`);
- `unresponsive`: `discover` raises `vsphere_proxy.faults.Unresponsive`.
Restores go through `FakeRestorer` (`restorer`): created VMs in `restored`, their disks in `written`.
`changed_areas` raises `ChangesUnavailable("fake: no change tracking")` unless `areas` holds the disk's file.
A snapshot's `saved()` is a `VmConfig` built from the in-memory VM (`fake_vm_config`: a ConfigInfo of the shape
pyVmomi's encoder writes, with its controllers and thin disks) and a deterministic NVRAM file (`fake_nvram`).
"""

from __future__ import annotations

import contextlib
import hashlib
import random
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.engine.attempt import ChangesUnavailable, SavedVm, SnapshotDiskInfo
from vsphere_proxy.faults import Unresponsive
from vsphere_proxy.jobs.backend import CreatedVm, SnapshotPolicy, Swept
from vsphere_proxy.jobs.fake_restorer import FakeRestorer
from vsphere_proxy.model import (
    VM,
    Cluster,
    Datastore,
    DatastoreKind,
    Disk,
    Host,
    HostLun,
    Inventory,
    LunAccess,
    LunPath,
    Proxy,
    ProxyKind,
)
from vsphere_proxy.repository import DiskLayout, NvramRecord, TagRecord, VmConfig
from vsphere_proxy.transports import BLOCK
from vsphere_proxy.transports.fake import FakeTransport, ReadLog, Rule

__all__ = ["PREFIX", "FakeBackend", "FakeVCenterError", "SnapshotRecord", "disk_image", "fake_nvram", "fake_vm_config"]

PREFIX = "vsphere-proxy-"  # the name prefix of the snapshots vsphere-proxy makes (as in `adapters.snapshots`)


class FakeVCenterError(Exception):
    """A call to the fake vCenter failed because the test injected the fault; the message names the call."""


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """A snapshot the fake vCenter holds: its name, the job that made it (None: not made by vsphere-proxy), its VM."""

    name: str
    owner: str | None
    vm_moref: str
    vm: str
    quiesced: bool = False

    @property
    def ours(self) -> bool:
        return self.name.startswith(PREFIX)

    def __str__(self) -> str:
        return f"{self.name} ({self.vm_moref})"


def disk_image(seed: str, capacity: int) -> bytes:
    """Deterministic contents for a disk of `capacity` bytes: random bytes, then a repeated pattern, over its
    first three quarters; the rest is never written (reads zeros)."""
    rng = random.Random(seed)
    length = capacity * 3 // 4
    noise = rng.randbytes(min(length // 2, 1 << 20))
    pattern = rng.randbytes(4096)
    repeats = -(-(length - len(noise)) // len(pattern))
    return (noise + pattern * repeats)[:length]


# controller name (as `Disk.controller` says it) -> (its vmodl type, the device key of its bus 0)
_CONTROLLERS = {
    "pvscsi": ("vim.vm.device.ParaVirtualSCSIController", 1000),
    "lsilogic": ("vim.vm.device.VirtualLsiLogicController", 1000),
    "lsilogic-sas": ("vim.vm.device.VirtualLsiLogicSASController", 1000),
    "buslogic": ("vim.vm.device.VirtualBusLogicController", 1000),
    "nvme": ("vim.vm.device.VirtualNVMEController", 31000),
    "sata": ("vim.vm.device.VirtualAHCIController", 15000),
    "ide": ("vim.vm.device.VirtualIDEController", 200),
}


def fake_nvram(vm: VM) -> bytes:
    """A deterministic 8 KiB NVRAM file for `vm`."""
    return random.Random(f"nvram/{vm.name}").randbytes(8192)


def fake_vm_config(vm: VM, datastores: Mapping[str, str] | None = None) -> VmConfig:
    """What a snapshot of `vm` on the fake vCenter saves: a ConfigInfo as pyVmomi's VmomiJSONEncoder would write
    it (controllers and thin flat disks as the VM's disks say; `datastores`: name -> moref), the disk layout, the
    VM's place and tags. The NVRAM record names `fake_nvram(vm)`."""
    datastores = datastores or {}
    home = vm.datastores[0] if vm.datastores else ""
    backed_up = {d.key: i for i, d in enumerate(vm.backup_disks)}
    controllers: dict[tuple[str, int], int] = {}
    layout, disks = [], []
    for d in vm.disks:
        kind = d.controller if d.controller in _CONTROLLERS else "pvscsi"
        slot = d.unit.rsplit(":", 1)
        bus = int("".join(c for c in slot[0] if c.isdigit()) or 0)
        unit = int(slot[1]) if len(slot) == 2 and slot[1].isdigit() else 0
        ckey = controllers.setdefault((kind, bus), _CONTROLLERS[kind][1] + bus)
        backing = {"_vimtype": "vim.vm.device.VirtualDisk.FlatVer2BackingInfo", "fileName": d.file,
                   "datastore": f"vim.Datastore:{datastores[d.datastore]}" if d.datastore in datastores else None,
                   "diskMode": "persistent", "thinProvisioned": True, "eagerlyScrub": None, "sharing": "sharingNone"}
        disks.append({"_vimtype": "vim.vm.device.VirtualDisk", "key": d.key, "controllerKey": ckey,
                      "unitNumber": unit, "capacityInKB": d.capacity_bytes // 1024,
                      "capacityInBytes": d.capacity_bytes, "backing": backing,
                      "deviceInfo": {"_vimtype": "vim.Description", "label": d.label, "summary": d.label}})
        layout.append(DiskLayout(index=backed_up.get(d.key), key=d.key, label=d.label, controller_key=ckey,
                                 controller=kind, bus=bus, unit=unit, capacity=d.capacity_bytes, file=d.file,
                                 datastore=d.datastore, provisioning="thin", sharing="sharingNone"))
    devices = [{"_vimtype": _CONTROLLERS[kind][0], "key": key, "busNumber": bus,
                "device": [d["key"] for d in disks if d["controllerKey"] == key],
                "deviceInfo": {"_vimtype": "vim.Description", "label": f"{kind} {bus}", "summary": kind},
                **({"sharedBus": "noSharing"} if kind not in ("nvme", "sata", "ide") else {})}
               for (kind, bus), key in sorted(controllers.items(), key=lambda kv: kv[1])]
    vmx = f"[{home}] {vm.name}/{vm.name}.vmx" if home else ""
    info = {
        "_vimtype": "vim.vm.ConfigInfo", "name": vm.name, "guestFullName": "Other (64-bit)", "guestId": "otherGuest64",
        "version": "vmx-19", "uuid": vm.uuid, "instanceUuid": vm.instance_uuid, "template": vm.template,
        "firmware": "bios",
        "files": {"_vimtype": "vim.vm.FileInfo", "vmPathName": vmx, "snapshotDirectory": vmx.rsplit("/", 1)[0],
                  "suspendDirectory": vmx.rsplit("/", 1)[0], "logDirectory": vmx.rsplit("/", 1)[0]},
        "hardware": {"_vimtype": "vim.vm.VirtualHardware", "numCPU": vm.cpus, "numCoresPerSocket": 1,
                     "memoryMB": vm.memory_mb, "device": devices + disks},
        "extraConfig": [],
    }
    nvram = fake_nvram(vm)
    return VmConfig(
        config_info=info, hardware_version="vmx-19", firmware="bios", guest_id="otherGuest64", cpus=vm.cpus,
        cores_per_socket=1, memory_mb=vm.memory_mb, host=vm.host, cluster=vm.cluster, folder=vm.folder,
        resource_pool=f"{vm.cluster or vm.host}/Resources", datastore=home, disks=tuple(layout),
        tags=tuple(TagRecord(category=t.category, name=t.name) for t in vm.tags),
        nvram=NvramRecord(chunk=hashlib.sha256(nvram).hexdigest(), size=len(nvram),
                          file=f"[{home}] {vm.name}/{vm.name}.nvram") if home else None,
        notes=() if home else ("nvram not saved: the VM has no home datastore",),
    )


class FakeVmSnapshot:
    """One snapshot of the fake vCenter as an attempt uses it (`VmSnapshot`)."""

    def __init__(self, backend: FakeBackend, record: SnapshotRecord, disks: tuple[SnapshotDiskInfo, ...],
                 vm: VM) -> None:
        self.backend = backend
        self.record = record
        self.name = record.name
        self.disks = disks
        self.vm = vm

    def saved(self) -> SavedVm:
        config = fake_vm_config(self.vm, {d.name: d.moref for d in self.backend.inventory.datastores})
        return SavedVm(config, fake_nvram(self.vm) if config.nvram is not None else None)

    def changed_areas(self, disk: SnapshotDiskInfo, since: str) -> list[tuple[int, int]]:
        areas = (self.backend.areas or {}).get(disk.file)
        if areas is None:
            raise ChangesUnavailable("fake: no change tracking")
        return list(areas)

    def transport(self, mode: str) -> FakeTransport:
        b = self.backend
        return FakeTransport(mode, b.contents, fail=b.read_fails, hang=b.hang, hang_on=b.hang_on, log=b.reads)

    def release(self) -> None:
        self.backend.remove(self.record)


class FakeSnapshotter:
    """Snapshots of one job's VMs on the fake vCenter (`Snapshotter`)."""

    def __init__(self, backend: FakeBackend, vms: Mapping[str, VM], job_id: str, *, quiesce: bool) -> None:
        self.backend = backend
        self.vms = dict(vms)
        self.job_id = job_id
        self.quiesce = quiesce

    def snapshot(self, assignment: Assignment) -> FakeVmSnapshot:
        vm = self.vms[assignment.vm]
        record = self.backend.create(vm, self.job_id, quiesce=self.quiesce and vm.power_state == "poweredOn")
        change_id = f"fake-change-{record.name}" if vm.cbt else ""
        disks = tuple(SnapshotDiskInfo(i, d.key, d.label, d.capacity_bytes, d.file, d.datastore, change_id)
                      for i, d in enumerate(vm.backup_disks))
        return FakeVmSnapshot(self.backend, record, disks, vm)


class FakeBackend:
    """A `VCenterBackend` in memory, for tests: an inventory, disk contents, snapshot records and faults."""

    def __init__(self, inventory: Inventory, contents: Mapping[str, bytes], *, proxies: Sequence[Proxy] = (),
                 snapshot_fails: Sequence[str] = (), removal_fails: Sequence[str] = (),
                 read_fails: Rule | None = None, hang: threading.Event | None = None, hang_on: Rule | None = None,
                 unresponsive: bool = False, areas: Mapping[str, Sequence[tuple[int, int]]] | None = None) -> None:
        self.inventory = inventory
        self.datacenter = inventory.datacenter
        self.contents: dict[str, bytes] = dict(contents)
        self.proxies = tuple(proxies)  # physical proxies, for the test's configuration (`proxy_configs`)
        self.snapshot_fails = set(snapshot_fails)
        self.removal_fails = set(removal_fails)
        self.read_fails = read_fails
        self.hang = hang
        self.hang_on = hang_on
        self.unresponsive = unresponsive
        self.areas = areas
        self.reads = ReadLog()
        self.made: list[SnapshotRecord] = []  # by this backend's snapshotters, in order
        self.removed: list[SnapshotRecord] = []  # by a release or a sweep, in order
        self.creations: Counter[str] = Counter()  # VM name -> snapshot creations asked (failed ones included)
        self.discoveries = 0
        # restores (`vsphere_proxy.jobs.fake_restorer`): the VMs created and their disks, and the faults
        self.restored: dict[str, CreatedVm] = {}
        self.written: dict[str, bytearray] = {}
        self.nvram_put: dict[str, bytes] = {}
        self.renamed: dict[str, str] = {}
        self.write_fails: Rule | None = None
        self.create_fails: set[str] = set()
        self.remove_fails: set[str] = set()
        self.lock = threading.Lock()
        self.seq = 0
        self._present: list[SnapshotRecord] = []
        self._lock = threading.Lock()
        self._seq = 0

    @classmethod
    def build(cls, vms: int = 3, disks: Sequence[int] = (BLOCK + 65536,), *, datastores: Sequence[str] = ("ds-1",),
              proxies: Sequence[str] = ("proxy-1",), streams: int = 2, san: bool = False, cbt: bool = False,
              datacenter: str = "DC0", **faults: Any) -> FakeBackend:
        """A fake vCenter with `vms` VMs named vm-01, vm-02, ... (powered on, on host esx-01 of cluster-1), each
        with one disk per size in `disks`, placed on `datastores` in turn; `disk_image` contents for each disk;
        and physical proxies of `streams` streams each that reach the host over the network (nbd). With `san`, every
        datastore is VMFS on a LUN the proxies also see (tier 1); otherwise it is a VMFS datastore no proxy reads
        directly. `faults` are FakeBackend's keyword arguments."""
        if vms < 0 or streams < 1 or not disks or not datastores:
            raise ValueError("build: needs vms >= 0, streams >= 1, at least one disk size and one datastore")
        luns = {ds: f"naa.6000c29fa4e0000000000000000{i:05d}" for i, ds in enumerate(datastores)} if san else {}
        host_luns = tuple(HostLun(lun, paths=(LunPath(f"vmhba2:C0:T0:L{i}", "vmhba2", "active"),))
                          for i, lun in enumerate(luns.values()))
        host = Host("host-10", "esx-01", "cluster-1", luns=host_luns, datastores=tuple(datastores))
        stores = tuple(Datastore(f"datastore-{20 + i}", ds, DatastoreKind.VMFS, "VMFS",
                                 capacity_bytes=1 << 40, free_bytes=1 << 39,
                                 extents=(luns[ds],) if san else (), hosts=(host.name,))
                       for i, ds in enumerate(datastores))
        machines: list[VM] = []
        contents: dict[str, bytes] = {}
        for n in range(1, vms + 1):
            name, ds = f"vm-{n:02d}", datastores[(n - 1) % len(datastores)]
            vm_disks = []
            for i, size in enumerate(disks):
                file = f"[{ds}] {name}/{name}.vmdk" if i == 0 else f"[{ds}] {name}/{name}_{i}.vmdk"
                vm_disks.append(Disk(2000 + i, f"Hard disk {i + 1}", file, ds, size, "pvscsi", f"scsi0:{i}"))
                contents[file] = disk_image(f"{name}/{i}", size)
            machines.append(VM(f"vm-{1000 + n}", name, uuid=f"4200{n:04d}-fake", instance_uuid=f"5000{n:04d}-fake",
                               host=host.name, cluster="cluster-1", disks=tuple(vm_disks), cbt=cbt,
                               power_state="poweredOn", cpus=2, memory_mb=2048))
        inventory = Inventory(datacenter, clusters=(Cluster("domain-c7", "cluster-1", (host.name,)),), hosts=(host,),
                              datastores=stores, vms=tuple(machines))
        fleet = [Proxy(p, ProxyKind.PHYSICAL, cpus=max(1, streams), ram_mb=100 * streams,
                       luns=tuple(LunAccess(lun, f"reported by {p}'s agent") for lun in luns.values()))
                 for p in proxies]
        return cls(inventory, contents, proxies=fleet, **faults)

    def proxy_configs(self) -> list[dict[str, Any]]:
        """The physical proxies as the configuration's `proxies:` entries declare them."""
        return [{"name": p.name, "kind": "physical", "cpus": p.cpus, "ram_mb": p.ram_mb,
                 "luns": [a.lun for a in p.luns], "nbd": p.nbd} for p in self.proxies]

    # ---- VCenterBackend ------------------------------------------------------------------------------------

    def discover(self) -> Inventory:
        with self._lock:
            self.discoveries += 1
        if self.unresponsive:
            raise Unresponsive("vCenter did not answer in 60 s (fake: injected)")
        return self.inventory

    def keep_alive(self) -> AbstractContextManager[object]:
        return contextlib.nullcontext()

    def sweep(self, vms: Sequence[str], proxies: Sequence[str], *, spare: Callable[[str], bool] | None = None,
              job_id: str | None = None) -> Swept:
        removed: list[str] = []
        errors: list[str] = []
        wanted = dict.fromkeys(vms)
        with self._lock:
            found = [s for s in reversed(self._present) if s.vm_moref in wanted and s.ours]  # newest first
        for snap in found:
            if job_id is not None and snap.owner != job_id:
                continue
            if spare is not None and snap.owner is not None and snap.owner != job_id and spare(snap.owner):
                continue
            try:
                self.remove(snap)
            except FakeVCenterError as e:
                errors.append(f"snapshot {snap.name} on {snap.vm_moref}: {e}")
            else:
                removed.append(str(snap))
        return Swept(snapshots=tuple(removed), errors=tuple(errors))

    def restorer(self, inventory: Inventory, proxies: Sequence[Proxy], job_id: str) -> FakeRestorer:
        return FakeRestorer(self, job_id)

    def snapshotter(self, vms: Mapping[str, VM], proxies: Sequence[Proxy], job_id: str, *,
                    policy: SnapshotPolicy) -> FakeSnapshotter:
        return FakeSnapshotter(self, vms, job_id, quiesce=policy.quiesces)

    # ---- the fake vCenter's snapshots ----------------------------------------------------------------------

    @property
    def present(self) -> list[SnapshotRecord]:
        """Every snapshot the fake vCenter holds now, oldest first."""
        with self._lock:
            return list(self._present)

    def present_of(self, job_id: str) -> list[SnapshotRecord]:
        return [s for s in self.present if s.owner == job_id]

    def vm(self, name: str) -> VM:
        return self.inventory.vm_by_name[name]

    def plant(self, vm: str, owner: str | None, name: str = "") -> SnapshotRecord:
        """A snapshot already on VM `vm` (by name), as an earlier job (`owner`) or someone else (None) left it."""
        v = self.vm(vm)
        with self._lock:
            self._seq += 1
            if not name:
                name = f"{PREFIX}{owner}-planted-{self._seq:04d}" if owner else f"before-upgrade-{self._seq:04d}"
            record = SnapshotRecord(name, owner, v.moref, v.name)
            self._present.append(record)
        return record

    def create(self, vm: VM, job_id: str, *, quiesce: bool = False) -> SnapshotRecord:
        """Snapshot `vm` for job `job_id`; raises FakeVCenterError when the VM is in `snapshot_fails`."""
        with self._lock:
            self.creations[vm.name] += 1
            if vm.name in self.snapshot_fails:
                raise FakeVCenterError(f"fake vCenter: CreateSnapshot_Task on {vm.name} ({vm.moref}) failed: "
                                       "injected fault")
            self._seq += 1
            record = SnapshotRecord(f"{PREFIX}{job_id}-{self._seq:04d}", job_id, vm.moref, vm.name, quiesce)
            self._present.append(record)
            self.made.append(record)
        return record

    def remove(self, record: SnapshotRecord) -> None:
        """Remove a snapshot (nothing when it is gone already); raises FakeVCenterError when its VM is in
        `removal_fails`, and the snapshot stays."""
        with self._lock:
            if record not in self._present:
                return
            if record.vm in self.removal_fails:
                raise FakeVCenterError(f"fake vCenter: RemoveSnapshot_Task of {record.name} on {record.vm} "
                                       f"({record.vm_moref}) failed: injected fault")
            self._present.remove(record)
            self.removed.append(record)
