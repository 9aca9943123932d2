"""The vCenter privileges the service account needs for what a configuration asks, and the verdict on them.

Each `Requirement` names a vSphere privilege id, the kind of inventory object it must be granted on (through a
permission there or propagating from above) and the feature that needs it. `features_for` reads the features from
a configuration (and, when known, the job's VMs); `requirements` lists what they need, each (privilege, object
kind) once. `representatives` picks the objects of the inventory a check asks vCenter about, and `evaluate` turns
vCenter's answers into one `Check` per requirement and object.

Pure: no vSphere I/O. The names are vSphere's own privilege ids (`VirtualMachine.State.CreateSnapshot`, ...), as
roles list them and as `AuthorizationManager.HasPrivilegeOnEntities` takes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

On = Literal["vcenter", "datastore", "vm", "proxy-vm", "resource-pool", "network", "folder"]
Feature = Literal["backup", "cbt", "hotadd", "restore", "tags", "custom-attributes"]

FEATURES: tuple[Feature, ...] = ("backup", "cbt", "hotadd", "restore", "tags", "custom-attributes")
# What each kind of object is, as the checks name it.
ON: dict[On, str] = {
    "vcenter": "the root folder (every object below it)",
    "datastore": "the datastores of the job's VMs",
    "vm": "the job's VMs",
    "proxy-vm": "the proxy VMs",
    "resource-pool": "the resource pools of the job's VMs (where a restore places a VM)",
    "network": "the networks of the job's VMs",
    "folder": "the folders of the job's VMs (where a restore creates a VM)",
}
SAMPLE = 3  # objects of each kind a check asks about, besides every proxy VM


@dataclass(frozen=True, slots=True)
class Requirement:
    """One privilege, the kind of object it is needed on, the feature needing it and why (one short line)."""

    privilege: str
    on: On
    feature: Feature
    why: str


def _r(privilege: str, on: On, feature: Feature, why: str) -> Requirement:
    return Requirement(privilege, on, feature, why)


# In FEATURES order; within a feature, in the order the work needs them.
REQUIREMENTS: tuple[Requirement, ...] = (
    _r("System.Read", "vcenter", "backup", "read the inventory: hosts, datastores, networks, VMs and their disks"),
    _r("VirtualMachine.State.CreateSnapshot", "vm", "backup", "take the snapshot a backup reads (quiesced or not)"),
    _r("VirtualMachine.State.RemoveSnapshot", "vm", "backup", "remove it afterwards, and those a failed job left"),
    _r("Datastore.Browse", "datastore", "backup", "read disks (nbd) and the VM's files over datastore HTTP"),
    _r("VirtualMachine.Provisioning.DiskRandomRead", "vm", "cbt",
       "ask which blocks changed since the last backup (QueryChangedDiskAreas)"),
    _r("VirtualMachine.Config.ChangeTracking", "vm", "cbt", "turn change tracking on, off or reset it (cbt)"),
    _r("VirtualMachine.Config.AddExistingDisk", "proxy-vm", "hotadd",
       "attach a snapshot's disk, or a disk being restored, to the proxy VM"),
    _r("VirtualMachine.Config.RemoveDisk", "proxy-vm", "hotadd", "detach that disk from the proxy VM again"),
    _r("VirtualMachine.Config.AddRemoveDevice", "proxy-vm", "hotadd",
       "add a SCSI controller when every unit of the proxy VM's is taken"),
    _r("VirtualMachine.Config.AdvancedConfig", "proxy-vm", "hotadd",
       "record the attaching job in the proxy VM's extraConfig"),
    _r("VirtualMachine.Inventory.Create", "folder", "restore", "create the restored VM in its folder"),
    _r("VirtualMachine.Config.AddNewDisk", "folder", "restore", "create the restored VM's disks"),
    _r("Resource.AssignVMToPool", "resource-pool", "restore", "place the restored VM in its resource pool"),
    _r("Datastore.AllocateSpace", "datastore", "restore", "allocate the restored VM's disks and files"),
    _r("Datastore.FileManagement", "datastore", "restore",
       "make directories, upload disks and NVRAM over datastore HTTP, delete leftovers"),
    _r("Network.Assign", "network", "restore", "connect the restored VM's NICs to their networks"),
    _r("VirtualMachine.Config.Rename", "folder", "restore", "give the restored VM its final name (--overwrite)"),
    _r("VirtualMachine.Interact.PowerOn", "folder", "restore", "power the restored VM on (--power-on)"),
    _r("VirtualMachine.Inventory.Delete", "folder", "restore", "remove a VM whose restore failed"),
    _r("VirtualMachine.Interact.PowerOff", "vm", "restore",
       "power off the VM a restore replaces (--overwrite --force-power-off)"),
    _r("VirtualMachine.Inventory.Delete", "vm", "restore", "remove the VM a restore replaces (--overwrite)"),
    _r("VirtualMachine.Config.AddNewDisk", "vm", "restore", "add a restored disk to an existing VM (--to-vm)"),
    _r("VirtualMachine.Config.RemoveDisk", "vm", "restore", "take that disk off again when its restore fails"),
    _r("InventoryService.Tagging.AttachTag", "folder", "tags", "attach the backed-up VM's tags to the restored VM"),
    _r("Global.ManageCustomFields", "vcenter", "custom-attributes",
       "define a custom attribute of the backed-up VM that vCenter no longer has"),
    _r("Global.SetCustomField", "folder", "custom-attributes", "set the restored VM's custom attributes"),
)


def requirements(features: Iterable[str]) -> list[Requirement]:
    """What `features` need, in FEATURES order, each (privilege, object kind) once; ValueError for an unknown
    feature."""
    wanted = set(features)
    unknown = sorted(wanted - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown feature {unknown[0]!r} (one of {', '.join(FEATURES)})")
    out: list[Requirement] = []
    seen: set[tuple[str, str]] = set()
    for r in REQUIREMENTS:
        if r.feature in wanted and (r.privilege, r.on) not in seen:
            seen.add((r.privilege, r.on))
            out.append(r)
    return out


def features_for(config: Any, vms: Iterable[Any] | None = None) -> list[Feature]:
    """The features a configuration uses (duck-typed: `proxies[].kind`, `job.proxies`, `job.policy.incremental`,
    `job.select.tags`), in FEATURES order.

    A backup and a restore (an administrator restores with the same account) always; `cbt` when the job is
    incremental; `hotadd` when one of the job's proxies is a VM. A restore gives the new VM the tags and custom
    attributes the backup recorded: `tags` when the job selects by tag or one of `vms` (the job's VMs, when known)
    carries a tag, `custom-attributes` when one of them carries one; without `vms` both are listed, since the VMs
    may carry them."""
    job = config.job
    wanted = set(job.proxies) if job.proxies is not None else None
    proxies = [p for p in config.proxies if wanted is None or p.name in wanted]
    known = None if vms is None else list(vms)
    out: list[Feature] = ["backup"]
    if job.policy.incremental:
        out.append("cbt")
    if any(p.kind == "vm" for p in proxies):
        out.append("hotadd")
    out.append("restore")
    if job.select.tags or known is None or any(vm.tags for vm in known):
        out.append("tags")
    if known is None or any(vm.custom_attributes for vm in known):
        out.append("custom-attributes")
    return out


@dataclass(frozen=True, slots=True)
class Entity:
    """An inventory object a privilege is checked on: its managed object type (`VirtualMachine`, `Folder`, ...),
    its managed object id and its name."""

    type: str
    moref: str
    name: str


def _spread(vms: Sequence[Any], limit: int) -> list[Any]:
    """At most `limit` of `vms`, first those that each bring a datastore the earlier ones do not use."""
    chosen: list[Any] = []
    covered: set[str] = set()
    for vm in vms:
        if len(chosen) < limit and not set(vm.datastores) <= covered:
            chosen.append(vm)
            covered |= set(vm.datastores)
    for vm in vms:
        if len(chosen) < limit and vm not in chosen:
            chosen.append(vm)
    return chosen


def representatives(inventory: Any, vms: Sequence[Any], proxy_vms: Iterable[str],
                    limit: int = SAMPLE) -> dict[On, list[Entity]]:
    """The objects a check asks about that the inventory names: at most `limit` of the job's `vms` (spread over
    their datastores), at most `limit` of the datastores and of the networks the job's VMs use, and every proxy
    VM of `proxy_vms` the inventory holds. The root folder, the VMs' folders and resource pools are vCenter's to
    name (`adapters.privileges.placement`)."""
    sample = _spread(sorted(vms, key=lambda v: v.name), limit)
    datastores = list(dict.fromkeys(ds for vm in sample for ds in vm.datastores))
    datastores += [ds for ds in dict.fromkeys(ds for vm in vms for ds in vm.datastores) if ds not in datastores]
    networks = list(dict.fromkeys(nic.network for vm in [*sample, *vms] for nic in vm.nics))
    by_ds, by_net, by_vm = inventory.datastore_by_name, inventory.network_by_name, inventory.vm_by_name
    return {
        "vm": [Entity("VirtualMachine", vm.moref, vm.name) for vm in sample],
        "datastore": [Entity("Datastore", by_ds[n].moref, n) for n in datastores if n in by_ds][:limit],
        "network": [_network(by_net[n]) for n in networks if n in by_net][:limit],
        "proxy-vm": [Entity("VirtualMachine", by_vm[n].moref, n) for n in dict.fromkeys(proxy_vms) if n in by_vm],
    }


def _network(net: Any) -> Entity:
    kinds = {"distributed": "DistributedVirtualPortgroup", "opaque": "OpaqueNetwork"}
    return Entity(kinds.get(net.kind, "Network"), net.moref, net.name)


def wanted(reqs: Iterable[Requirement], targets: Mapping[str, Sequence[Entity]]) -> dict[Entity, list[str]]:
    """The privileges to ask vCenter about, per object: each requirement's privilege on each object of its kind."""
    out: dict[Entity, list[str]] = {}
    for r in reqs:
        for e in targets.get(r.on, ()):
            privileges = out.setdefault(e, [])
            if r.privilege not in privileges:
                privileges.append(r.privilege)
    return out


Status = Literal["ok", "missing", "not checked"]


@dataclass(frozen=True, slots=True)
class Check:
    """A requirement on one object: granted (True), not granted (False) or not known (None, with a note)."""

    requirement: Requirement
    entity: Entity | None
    granted: bool | None
    note: str = ""

    @property
    def status(self) -> Status:
        return "not checked" if self.granted is None else "ok" if self.granted else "missing"

    def describe(self) -> str:
        """`Privilege on name`, as a missing privilege is named."""
        where = self.entity.name if self.entity is not None else ON[self.requirement.on]
        return f"{self.requirement.privilege} on {where}"


NOT_ANSWERED = "vCenter did not answer for this object"


def evaluate(reqs: Iterable[Requirement], targets: Mapping[str, Sequence[Entity]],
             answers: Mapping[tuple[Entity, str], bool | None]) -> list[Check]:
    """One check per requirement and object of its kind, from vCenter's `answers` ((object, privilege) -> granted,
    None or absent when vCenter did not answer); a requirement without an object to check it on is one check
    "not checked"."""
    out: list[Check] = []
    for r in reqs:
        entities = targets.get(r.on, ())
        if not entities:
            out.append(Check(r, None, None, f"no object to check it on ({ON[r.on]}: none)"))
        for e in entities:
            granted = answers.get((e, r.privilege))
            out.append(Check(r, e, granted, NOT_ANSWERED if granted is None else ""))
    return out


def counts(checks: Iterable[Check]) -> dict[Status, int]:
    """How many checks are ok, missing and not checked."""
    out: dict[Status, int] = {"ok": 0, "missing": 0, "not checked": 0}
    for c in checks:
        out[c.status] += 1
    return out
