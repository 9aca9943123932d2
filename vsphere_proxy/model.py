"""The inventory and fleet as plain, immutable data.

Everything the scheduler, the tier classifier and the CLI reason about is one of these dataclasses.
They are filled by `adapters.discovery` (from vCenter) and by the configuration (physical proxies),
and never talk to vCenter themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property


class ProxyKind(StrEnum):
    VM = "vm"
    PHYSICAL = "physical"


class DatastoreKind(StrEnum):
    VMFS = "vmfs"  # shared VMFS on SAN LUNs (FibreChannel, iSCSI)
    NFS = "nfs"  # NFS v3 or v4.1 export
    LOCAL = "local"  # VMFS on a host's local disk, seen by one host only
    OTHER = "other"  # vSAN, vVol, anything without a LUN or export a proxy could read directly


@dataclass(frozen=True, slots=True, order=True)
class Tag:
    """A vSphere tag, written `Category:Tag`."""

    category: str
    name: str

    def __str__(self) -> str:
        return f"{self.category}:{self.name}"

    @classmethod
    def parse(cls, text: str) -> Tag:
        category, sep, name = text.partition(":")
        if not sep or not category or not name:
            raise ValueError(f"tag {text!r} is not of the form Category:Tag")
        return cls(category, name)


@dataclass(frozen=True, slots=True)
class Hba:
    """A host bus adapter of an ESXi host (`config.storageDevice.hostBusAdapter`)."""

    device: str  # vmhbaN
    type: str  # FibreChannel | iSCSI | Block | SAS | ...
    key: str = ""
    model: str = ""
    pci: str = ""
    wwnn: str = ""  # FibreChannel node WWN, 20:00:...
    wwpn: str = ""  # FibreChannel port WWN
    iqn: str = ""  # iSCSI name

    @property
    def identity(self) -> str:
        if self.type == "FibreChannel":
            return f"WWPN {self.wwpn}"
        if self.type == "iSCSI":
            return f"IQN {self.iqn}"
        return self.pci or self.device


@dataclass(frozen=True, slots=True)
class LunPath:
    """One multipath path from a host to a LUN (`multipathInfo.lun[].path[]`)."""

    name: str  # vmhba2:C0:T0:L1
    hba: str  # vmhba2
    state: str  # active | standby | dead | disabled | unknown

    @property
    def active(self) -> bool:
        return self.state == "active"


@dataclass(frozen=True, slots=True)
class HostLun:
    """A SCSI LUN as one host sees it, with its paths."""

    name: str  # canonical name: naa.*, eui.*, t10.*, mpx.*
    uuid: str = ""
    vendor: str = ""
    model: str = ""
    capacity_bytes: int = 0
    local: bool = False
    paths: tuple[LunPath, ...] = ()

    @property
    def active_paths(self) -> tuple[LunPath, ...]:
        return tuple(p for p in self.paths if p.active)


@dataclass(frozen=True, slots=True)
class Host:
    moref: str
    name: str
    cluster: str | None
    hbas: tuple[Hba, ...] = ()
    luns: tuple[HostLun, ...] = ()
    datastores: tuple[str, ...] = ()  # names of the datastores it mounts
    connection_state: str = "connected"

    def lun(self, name: str) -> HostLun | None:
        return next((lun for lun in self.luns if lun.name == name), None)

    def hba(self, device: str) -> Hba | None:
        return next((h for h in self.hbas if h.device == device), None)


@dataclass(frozen=True, slots=True)
class Datastore:
    moref: str
    name: str
    kind: DatastoreKind
    type: str  # summary.type: VMFS, NFS, NFS41, vsan, ...
    url: str = ""
    capacity_bytes: int = 0
    free_bytes: int = 0
    extents: tuple[str, ...] = ()  # canonical names of the LUNs backing a VMFS datastore
    nfs_remote_host: str = ""
    nfs_remote_path: str = ""
    hosts: tuple[str, ...] = ()  # names of the hosts that mount it

    @property
    def nfs_export(self) -> str:
        return f"{self.nfs_remote_host}:{self.nfs_remote_path}" if self.kind is DatastoreKind.NFS else ""


@dataclass(frozen=True, slots=True)
class Disk:
    key: int
    label: str
    file: str  # "[datastore] vm/vm.vmdk"
    datastore: str
    capacity_bytes: int
    controller: str  # pvscsi, lsilogic, lsilogic-sas, nvme, sata, ide
    unit: str  # scsi0:1
    backing: str = "flat"  # flat | rdm-virtual | rdm-physical | other
    lun: str = ""  # the LUN an RDM disk maps
    mode: str = "persistent"  # the backing's diskMode: persistent | independent_persistent | independent_nonpersistent
    excluded: str = ""  # why the job does not read it (`vsphere_proxy.disk_policy`); "" when it does

    @property
    def independent(self) -> bool:
        """An independent disk: snapshots do not capture it (its writes go on past them)."""
        return self.mode.startswith("independent")


@dataclass(frozen=True, slots=True)
class Network:
    """A network a NIC can be on: a standard port group (`vim.Network`, one object for every host carrying a port
    group of that name), a distributed port group, or an opaque network (NSX)."""

    moref: str
    name: str
    kind: str  # "standard" | "distributed" | "opaque"
    hosts: tuple[str, ...] = ()  # names of the hosts it is available on
    key: str = ""  # dvportgroup key (an opaque network's id)
    switch_uuid: str = ""  # the distributed switch's uuid


@dataclass(frozen=True, slots=True)
class Nic:
    """A virtual network adapter of a VM (a `VirtualEthernetCard` in `config.hardware.device`)."""

    key: int
    label: str
    type: str  # vmxnet3 | e1000e | e1000 | vmxnet2 | pcnet32 | sriov | ...
    network: str  # the network's name
    mac: str


@dataclass(frozen=True, slots=True)
class VM:
    moref: str
    name: str
    uuid: str = ""
    instance_uuid: str = ""
    host: str = ""
    cluster: str | None = None
    folder: str = ""  # path below the datacenter's VM folder, "" for the root
    disks: tuple[Disk, ...] = ()
    cbt: bool = False
    power_state: str = "poweredOff"
    template: bool = False
    cpus: int = 0
    memory_mb: int = 0
    passthrough: tuple[str, ...] = ()  # PCI addresses of devices passed through to the VM
    tags: tuple[Tag, ...] = ()
    nics: tuple[Nic, ...] = ()
    custom_attributes: tuple[tuple[str, str], ...] = ()  # (field name, value), sorted by name
    firmware: str = ""  # config.firmware: bios | efi
    hw_version: str = ""  # config.version: vmx-NN

    @property
    def backup_disks(self) -> tuple[Disk, ...]:
        """The disks a backup reads: every disk but physical-mode RDMs (which snapshots cannot capture) and those
        the job's policy excludes."""
        return tuple(d for d in self.disks if d.backing != "rdm-physical" and not d.excluded)

    @property
    def datastores(self) -> tuple[str, ...]:
        """The datastores holding the VM's backed-up disks, in disk order, each once."""
        return tuple(dict.fromkeys(d.datastore for d in self.backup_disks))

    @property
    def total_bytes(self) -> int:
        """Total allocated storage: the sum of disk capacities (the patent's storage size metric)."""
        return sum(d.capacity_bytes for d in self.disks)


@dataclass(frozen=True, slots=True)
class Cluster:
    moref: str
    name: str
    hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Inventory:
    """What discovery read from vCenter, indexed by name."""

    datacenter: str
    clusters: tuple[Cluster, ...] = ()
    hosts: tuple[Host, ...] = ()
    datastores: tuple[Datastore, ...] = ()
    vms: tuple[VM, ...] = ()
    round_trips: int = 0  # SOAP calls the read took
    networks: tuple[Network, ...] = ()

    @cached_property
    def host_by_name(self) -> dict[str, Host]:
        return {h.name: h for h in self.hosts}

    @cached_property
    def datastore_by_name(self) -> dict[str, Datastore]:
        return {d.name: d for d in self.datastores}

    @cached_property
    def vm_by_name(self) -> dict[str, VM]:
        return {v.name: v for v in self.vms}

    @cached_property
    def network_by_name(self) -> dict[str, Network]:
        return {n.name: n for n in self.networks}

    @cached_property
    def _paths_by_lun(self) -> dict[str, list[tuple[str, LunPath]]]:
        index: dict[str, list[tuple[str, LunPath]]] = {}
        for h in self.hosts:
            for hl in h.luns:
                index.setdefault(hl.name, []).extend((h.name, p) for p in hl.paths)
        return index

    def lun_paths(self, lun: str) -> list[tuple[str, LunPath]]:
        """Every (host name, path) to a LUN across the inventory."""
        return list(self._paths_by_lun.get(lun, ()))


@dataclass(frozen=True, slots=True)
class LunAccess:
    """A LUN a proxy can read directly, and how it sees it (for the reason text)."""

    lun: str
    via: str  # "vmhba3 passed through from esx-01", "RDM disk 'Hard disk 2'", "reported by phys-01's agent"


@dataclass(frozen=True, slots=True)
class Proxy:
    """A backup proxy: a VM running the VSDA, or a physical host running it."""

    name: str
    kind: ProxyKind
    cpus: int
    ram_mb: int
    alive: bool = True
    vsda_active: bool = True
    host: str | None = None  # ESXi host of a VM proxy
    cluster: str | None = None
    luns: tuple[LunAccess, ...] = ()
    nfs_exports: frozenset[str] = field(default_factory=frozenset)  # "nas:/export" it can mount
    nbd: bool = True  # reaches ESXi hosts over the network
    vm_moref: str | None = None
    down_reason: str = ""

    def lun_access(self, lun: str) -> LunAccess | None:
        return next((a for a in self.luns if a.lun == lun), None)
