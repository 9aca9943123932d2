"""Where each restored VM goes, decided before anything in vCenter changes (DESIGN §8).

`plan_restores(points, options, inventory)` turns restore points (format 2: they hold the VM's configuration)
and the admin's options into one `VmRestorePlan` per VM: the new VM's name, host, cluster, folder, resource
pool, the target datastore of every disk and the network of every NIC, after the maps. Everything that can be
checked against the inventory is checked here, and bad input fails as `BadJob` in one line that names the option
and the value, before anything is created: a name that exists, a datastore, network, host or cluster that does
not, a host that does not mount a target datastore, too little free space. What only vCenter can answer (a
folder or resource pool path) the backend checks before the job starts.

Each plan is also the restore job's unit of scheduling: `work_vm()` is what the coordinator hands out (disks
on their target datastores, so the datastore threshold counts restore streams on the datastores they write),
and `placed_vm()` the VM as it will be placed, which the access tiers classify like a backup's VM: a proxy that
sees the target LUN writes through SAN, one on a host mounting every target datastore hot-adds, any other
writes over the network.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from vsphere_proxy.coordinator import WorkDisk, WorkVM
from vsphere_proxy.jobs.errors import BadJob
from vsphere_proxy.model import VM, Disk, Host, Inventory
from vsphere_proxy.repository import Manifest
from vsphere_proxy.units import human_size

NAME_MAX = 80  # vCenter's limit on a VM's name
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class RestoreOptions:
    """What the admin asked of a restore; None = as the restore point recorded it."""

    name: str | None = None  # only with one VM
    folder: str | None = None
    cluster: str | None = None
    host: str | None = None
    resource_pool: str | None = None
    datastore: str | None = None  # every disk (and the VM's home) on this datastore
    datastore_map: Mapping[str, str] = field(default_factory=dict)  # source datastore -> target
    network_map: Mapping[str, str] = field(default_factory=dict)  # source network -> target
    power_on: bool = False
    keep_identity: bool = False  # the source's BIOS/instance UUIDs and MAC addresses
    overwrite: bool = False  # replace the original VM once the new one is whole
    force_power_off: bool = False  # with overwrite: power the original off first


@dataclass(frozen=True)
class DiskPlan:
    """One disk of the new VM: from disk `index` of the restore point to `datastore`."""

    index: int  # the restore point's disk index
    key: int  # the device key in the saved configuration
    label: str
    capacity: int
    source_datastore: str
    datastore: str
    provisioning: str  # thin | thick-lazy | thick-eager
    allocated: int  # bytes of the point's blocks that are not holes: what a thin disk takes

    @property
    def needs(self) -> int:
        """The space the disk takes on its datastore."""
        return self.allocated if self.provisioning == "thin" else self.capacity


@dataclass(frozen=True)
class NicPlan:
    key: int
    label: str
    source_network: str
    network: str  # the target network's name, after --network-map
    network_moref: str
    network_kind: str = ""  # standard | distributed | opaque ("" when the inventory does not say)
    portgroup_key: str = ""  # a distributed port group's key
    switch_uuid: str = ""  # its distributed switch's UUID


@dataclass(frozen=True)
class VmRestorePlan:
    """One VM to restore, decided."""

    point: Manifest
    name: str  # the new VM's final name
    create_as: str  # the name it is created under: `name`, or a temporary one while the original is replaced
    folder: str  # path below the datacenter's VM folder
    host: str
    cluster: str | None
    resource_pool: str  # path or name; "" = the host's or cluster's root pool
    home_datastore: str
    disks: tuple[DiskPlan, ...]
    nics: tuple[NicPlan, ...]
    power_on: bool
    keep_identity: bool
    replaces: VM | None = None  # with --overwrite: the original, removed once the new VM is whole
    force_power_off: bool = False

    @property
    def source(self) -> str:
        return self.point.vm.name

    def work_vm(self) -> WorkVM:
        """The coordinator's view: disks by restore point index, on their target datastores."""
        return WorkVM(self.create_as, tuple(WorkDisk(d.index, d.capacity, d.datastore) for d in self.disks))

    def placed_vm(self) -> VM:
        """The new VM as it will sit in the inventory, for the access tiers of its disks' writes."""
        disks = tuple(Disk(d.key, d.label, f"[{d.datastore}] {self.create_as}/{self.create_as}.vmdk", d.datastore,
                           d.capacity, "", "") for d in self.disks)
        return VM("", self.create_as, host=self.host, cluster=self.cluster, folder=self.folder, disks=disks)

    def to_json(self) -> dict[str, object]:
        return {
            "vm": self.source, "point": self.point.id, "name": self.name, "created_as": self.create_as,
            "folder": self.folder, "host": self.host, "cluster": self.cluster, "resource_pool": self.resource_pool,
            "home_datastore": self.home_datastore, "power_on": self.power_on, "keep_identity": self.keep_identity,
            "replaces": self.replaces.moref if self.replaces else None,
            "disks": [{"index": d.index, "label": d.label, "capacity": d.capacity, "from": d.source_datastore,
                       "to": d.datastore, "provisioning": d.provisioning, "needs": d.needs} for d in self.disks],
            "nics": [{"label": n.label, "from": n.source_network, "to": n.network} for n in self.nics],
        }


def default_name(vm: str, now: datetime) -> str:
    """`<vm>-restored-<UTC time>`, shortened to vCenter's 80 characters."""
    tail = f"-restored-{now.astimezone(UTC):%Y%m%dT%H%M%SZ}"
    return vm[: NAME_MAX - len(tail)] + tail


def check_name(name: str, option: str = "--name") -> str:
    if not name or not name.strip():
        raise BadJob(f"{option}: a VM name must not be empty")
    if len(name) > NAME_MAX:
        raise BadJob(f"{option}: {name!r} is longer than vCenter's {NAME_MAX} characters")
    if _CONTROL.search(name):
        raise BadJob(f"{option}: {name!r} holds a control character")
    return name


def allocated_bytes(point: Manifest, index: int) -> int:
    disk = point.disk(index)
    return sum(disk.block_length(i) for i, chunk in enumerate(disk.blocks) if chunk is not None)


class _Planner:
    """Plans VMs one after the other; names and datastore space are counted across the whole job."""

    def __init__(self, options: RestoreOptions, inventory: Inventory, now: datetime) -> None:
        self.o = options
        self.inv = inventory
        self.now = now
        self.names: set[str] = set()
        self.space: Counter[str] = Counter()  # bytes the job's plans take per datastore
        self.networks = {n.name: n for n in getattr(inventory, "networks", ())}
        self._check_options()

    def _check_options(self) -> None:
        o, inv = self.o, self.inv
        if o.host is not None and o.host not in inv.host_by_name:
            raise BadJob(f"--host: no host {o.host!r} in datacenter {inv.datacenter}")
        if o.cluster is not None and o.cluster not in {c.name for c in inv.clusters}:
            raise BadJob(f"--cluster: no cluster {o.cluster!r} in datacenter {inv.datacenter}")
        if o.host is not None and o.cluster is not None and inv.host_by_name[o.host].cluster != o.cluster:
            raise BadJob(f"--host: {o.host} is not in cluster {o.cluster}")
        for option, names in (("--datastore", [o.datastore] if o.datastore else []),
                              ("--datastore-map", list(o.datastore_map.values()))):
            for ds in names:
                if ds not in inv.datastore_by_name:
                    raise BadJob(f"{option}: no datastore {ds!r} in datacenter {inv.datacenter}")
        if self.networks or o.network_map:
            for net in o.network_map.values():
                if net not in self.networks:
                    raise BadJob(f"--network-map: no network {net!r} in datacenter {inv.datacenter}")
        if o.force_power_off and not o.overwrite:
            raise BadJob("--force-power-off: only with --overwrite")

    def plan(self, point: Manifest, single: bool) -> VmRestorePlan:
        o, inv = self.o, self.inv
        cfg = point.vm_config
        if cfg is None:
            raise BadJob(f"--point: restore point {point.id} of {point.vm.name!r} is format {point.version}: it "
                         "holds the disks but not the VM's configuration; restore its disks with `restore disk`")
        replaces = None
        if o.overwrite:
            replaces = self._original(point)
            name = check_name(o.name) if o.name is not None else point.vm.name
            create_as = check_name(default_name(name, self.now).replace("-restored-", "-restoring-"))
        else:
            if o.name is not None and not single:
                raise BadJob("--name: names one VM; with several VMs each is named <vm>-restored-<UTC time>")
            name = check_name(o.name) if o.name is not None else default_name(point.vm.name, self.now)
            create_as = name
        for n in {name, create_as}:
            if n in self.names:
                raise BadJob(f"--name: two restored VMs would be named {n!r}")
            existing = inv.vm_by_name.get(n)
            if existing is not None and (replaces is None or existing.moref != replaces.moref):
                raise BadJob(f"--name: a VM named {n!r} already exists ({existing.moref}); choose another --name")
        targets = {}
        layouts = {d.index: d for d in cfg.disks if d.index is not None}
        for disk in point.disks:
            layout = layouts.get(disk.index)
            source = layout.datastore if layout else cfg.datastore
            targets[disk.index] = o.datastore_map.get(source) or o.datastore or source
        home_source = cfg.datastore or next(iter(targets.values()), "")
        home = o.datastore_map.get(home_source) or o.datastore or home_source
        for index, ds in {**targets, -1: home}.items():
            if ds not in inv.datastore_by_name:
                what = "the VM's home" if index < 0 else f"disk {index}"
                raise BadJob(f"--datastore: {point.vm.name}'s {what} was on datastore {ds!r}, which does not "
                             f"exist in datacenter {inv.datacenter}; pass --datastore or --datastore-map {ds}=NEW")
        host = self._host(point, {*targets.values(), home})
        disks = []
        for disk in point.disks:
            layout = layouts.get(disk.index)
            provisioning = layout.provisioning if layout else "thin"
            disks.append(DiskPlan(disk.index, layout.key if layout else 2000 + disk.index, disk.label,
                                  disk.capacity, layout.datastore if layout else home_source, targets[disk.index],
                                  provisioning, allocated_bytes(point, disk.index)))
        self._reserve(point, disks)
        nics = []
        for nic in cfg.nics:
            target = o.network_map.get(nic.network, nic.network)
            found = self.networks.get(target)
            if self.networks and found is None:
                hint = "" if target in o.network_map.values() else f"; pass --network-map {nic.network}=NEW"
                raise BadJob(f"--network-map: {point.vm.name}'s {nic.label} was on network {target!r}, which does "
                             f"not exist in datacenter {inv.datacenter}{hint}")
            if found is not None and found.hosts and host.name not in found.hosts:
                raise BadJob(f"--network-map: network {target!r} is not available on host {host.name}")
            nics.append(NicPlan(nic.key, nic.label, nic.network, target, found.moref if found else "",
                                found.kind if found else "", found.key if found else "",
                                found.switch_uuid if found else ""))
        folder = o.folder if o.folder is not None else cfg.folder
        same_place = host.cluster == cfg.cluster and o.host is None and o.cluster is None
        pool = o.resource_pool if o.resource_pool is not None else (cfg.resource_pool if same_place else "")
        self.names.update({name, create_as})
        return VmRestorePlan(point, name, create_as, folder.strip("/"), host.name, host.cluster, pool, home,
                             tuple(disks), tuple(nics), o.power_on, o.keep_identity, replaces, o.force_power_off)

    def _original(self, point: Manifest) -> VM:
        inv = self.inv
        original = next((v for v in inv.vms if v.moref == point.vm.moref and v.name == point.vm.name), None)
        original = original or inv.vm_by_name.get(point.vm.name)
        if original is None:
            raise BadJob(f"--overwrite: {point.vm.name!r} is not in vCenter any more; restore it without "
                         "--overwrite")
        if original.power_state != "poweredOff" and not self.o.force_power_off:
            raise BadJob(f"--overwrite: {original.name} is {original.power_state}; power it off, or pass "
                         "--force-power-off")
        return original

    def _host(self, point: Manifest, datastores: set[str]) -> Host:
        """The host the new VM is registered on: --host, else the recorded one (when it is in --cluster and
        mounts the target datastores), else the first host of the cluster that mounts them all."""
        o, inv = self.o, self.inv
        cfg = point.vm_config
        assert cfg is not None

        def mounts(h: Host) -> bool:
            return datastores <= set(h.datastores) and h.connection_state == "connected"

        if o.host is not None:
            host = inv.host_by_name[o.host]
            missing = sorted(datastores - set(host.datastores))
            if missing:
                raise BadJob(f"--host: {host.name} does not mount datastore {', '.join(missing)}")
            return host
        cluster = o.cluster if o.cluster is not None else cfg.cluster
        recorded = inv.host_by_name.get(cfg.host)
        if recorded is not None and (cluster is None or recorded.cluster == cluster) and mounts(recorded):
            return recorded
        candidates = [h for h in sorted(inv.hosts, key=lambda h: h.name)
                      if (cluster is None or h.cluster == cluster) and mounts(h)]
        if not candidates and o.cluster is None:  # the recorded cluster cannot hold it: any host that can
            candidates = [h for h in sorted(inv.hosts, key=lambda h: h.name) if mounts(h)]
        if not candidates:
            where = f"in cluster {cluster}" if cluster else "in the datacenter"
            raise BadJob(f"--datastore: no connected host {where} mounts {', '.join(sorted(datastores))}; pass "
                         "--host or other datastores")
        return candidates[0]

    def _reserve(self, point: Manifest, disks: Sequence[DiskPlan]) -> None:
        need: Counter[str] = Counter()
        for d in disks:
            need[d.datastore] += d.needs
        for ds, n in sorted(need.items()):
            free = self.inv.datastore_by_name[ds].free_bytes - self.space[ds]
            if n > free:
                raise BadJob(f"--datastore: {ds} has {human_size(max(free, 0))} free; restoring "
                             f"{point.vm.name} needs {human_size(n)} there")
        self.space.update(need)


def plan_restores(points: Sequence[Manifest], options: RestoreOptions, inventory: Inventory, *,
                  now: datetime | None = None) -> list[VmRestorePlan]:
    """One plan per restore point, in order; `BadJob` on the first that cannot be restored as asked."""
    if not points:
        raise BadJob("--vm: no VM to restore")
    sources = [p.vm.name for p in points]
    dup = next((n for n, k in Counter(sources).items() if k > 1), None)
    if dup is not None:
        raise BadJob(f"--vm: {dup!r} is asked for twice")
    planner = _Planner(options, inventory, now or datetime.now(UTC))
    return [planner.plan(p, len(points) == 1) for p in points]


@dataclass(frozen=True)
class DiskRestorePlan:
    """One disk of a restore point, restored as a new disk of an existing VM (`restore disk --to-vm`)."""

    point: Manifest
    disk: DiskPlan
    target: VM  # the VM that gets the disk

    @property
    def source(self) -> str:
        return self.point.vm.name

    @property
    def create_as(self) -> str:
        """The unit the coordinator schedules: the target VM and which disk it receives."""
        return f"{self.target.name} <- {self.point.vm.name} disk {self.disk.index}"

    @property
    def name(self) -> str:
        return self.target.name

    def work_vm(self) -> WorkVM:
        d = self.disk
        return WorkVM(self.create_as, (WorkDisk(d.index, d.capacity, d.datastore),))

    def placed_vm(self) -> VM:
        d = self.disk
        disk = Disk(d.key, d.label, f"[{d.datastore}] {self.target.name}/new.vmdk", d.datastore, d.capacity, "", "")
        return VM("", self.create_as, host=self.target.host, cluster=self.target.cluster, disks=(disk,))

    def to_json(self) -> dict[str, object]:
        d = self.disk
        return {"vm": self.source, "point": self.point.id, "disk": d.index, "to_vm": self.target.name,
                "to_vm_moref": self.target.moref, "datastore": d.datastore, "capacity": d.capacity,
                "provisioning": d.provisioning, "needs": d.needs}


def plan_disk_restore(point: Manifest, index: int, to_vm: str, datastore: str | None,
                      inventory: Inventory) -> DiskRestorePlan:
    """Disk `index` of `point` as a new disk of the VM `to_vm`, on `datastore` (default: where that VM's first
    disk is, else the datastore the disk was on). `BadJob` on bad input, before anything changes."""
    indexes = [d.index for d in point.disks]
    if index not in indexes:
        raise BadJob(f"--disk: restore point {point.id} has disks {indexes}, not {index}")
    target = inventory.vm_by_name.get(to_vm)
    if target is None:
        raise BadJob(f"--to-vm: no VM named {to_vm!r} in datacenter {inventory.datacenter}")
    if target.template:
        raise BadJob(f"--to-vm: {to_vm} is a template")
    record = point.disk(index)
    layout = next((d for d in point.vm_config.disks if d.index == index), None) if point.vm_config else None
    source = layout.datastore if layout else ""
    ds = datastore or (target.disks[0].datastore if target.disks else source)
    if not ds or ds not in inventory.datastore_by_name:
        raise BadJob(f"--datastore: no datastore {ds!r} in datacenter {inventory.datacenter}")
    host = inventory.host_by_name.get(target.host)
    if host is not None and ds not in host.datastores:
        raise BadJob(f"--datastore: {ds} is not mounted on {to_vm}'s host {host.name}")
    plan = DiskPlan(index, layout.key if layout else 2000 + index, record.label, record.capacity, source or ds, ds,
                    layout.provisioning if layout else "thin", allocated_bytes(point, index))
    free = inventory.datastore_by_name[ds].free_bytes
    if plan.needs > free:
        raise BadJob(f"--datastore: {ds} has {human_size(free)} free; disk {index} of {point.id} needs "
                     f"{human_size(plan.needs)}")
    return DiskRestorePlan(point, plan, target)


RestorePlan = VmRestorePlan | DiskRestorePlan
