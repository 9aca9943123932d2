"""Read the inventory from vCenter with the PropertyCollector (DESIGN §3, STYLE §5).

One ContainerView over the root folder, one RetrievePropertiesEx carrying an explicit path set per
type, ContinueRetrievePropertiesEx while vCenter pages, DestroyView in `finally`: a fixed number of
round trips whatever the number of VMs. The same call reads the custom field definitions (the
CustomFieldsManager's `field`, a second object of the filter) that name the VMs' custom attributes.
Never pyvmomi's lazy per-attribute access in a loop. Each call is bounded by the session
(`adapters.session.Bounded`); when vCenter stops answering, the view is left to end with the session
rather than waited for again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from pyVmomi import vim, vmodl

from adapters.session import Session
from vsphere_proxy.faults import Unresponsive
from vsphere_proxy.model import (
    VM,
    Cluster,
    Datastore,
    DatastoreKind,
    Disk,
    Hba,
    Host,
    HostLun,
    Inventory,
    LunPath,
    Network,
    Nic,
    Tag,
)

PC = vmodl.query.PropertyCollector

PATHS: dict[type, list[str]] = {
    vim.VirtualMachine: [
        "name", "parent", "config.uuid", "config.instanceUuid", "config.template", "config.changeTrackingEnabled",
        "config.hardware.numCPU", "config.hardware.memoryMB", "config.hardware.device", "config.firmware",
        "config.version", "customValue", "runtime.host", "runtime.powerState",
    ],
    vim.HostSystem: [
        "name", "parent", "datastore", "runtime.connectionState", "config.storageDevice.hostBusAdapter",
        "config.storageDevice.scsiLun", "config.storageDevice.multipathInfo",
    ],
    vim.Datastore: ["name", "summary", "info", "host"],
    vim.ComputeResource: ["name", "host"],  # clusters and standalone hosts' compute resources
    vim.Folder: ["name", "parent"],
    vim.Datacenter: ["name", "vmFolder"],
    # Standard port groups, and (the same objects, subtypes of vim.Network) distributed port groups and opaque
    # networks with their own properties; the switches for their uuids.
    vim.Network: ["name", "host"],
    vim.dvs.DistributedVirtualPortgroup: ["key", "config.distributedVirtualSwitch"],
    vim.OpaqueNetwork: ["summary"],
    vim.DistributedVirtualSwitch: ["uuid"],
}

NIC_TYPES: list[tuple[type, str]] = [  # most specific first
    (vim.vm.device.VirtualVmxnet3, "vmxnet3"),
    (vim.vm.device.VirtualE1000e, "e1000e"),
    (vim.vm.device.VirtualE1000, "e1000"),
    (vim.vm.device.VirtualVmxnet2, "vmxnet2"),
    (vim.vm.device.VirtualPCNet32, "pcnet32"),
    (vim.vm.device.VirtualSriovEthernetCard, "sriov"),
]

CONTROLLERS: list[tuple[type, str]] = [
    (vim.vm.device.ParaVirtualSCSIController, "pvscsi"),
    (vim.vm.device.VirtualLsiLogicSASController, "lsilogic-sas"),
    (vim.vm.device.VirtualLsiLogicController, "lsilogic"),
    (vim.vm.device.VirtualBusLogicController, "buslogic"),
    (vim.vm.device.VirtualNVMEController, "nvme"),
    (vim.vm.device.VirtualAHCIController, "sata"),
    (vim.vm.device.VirtualIDEController, "ide"),
]

HBA_TYPES: list[tuple[type, str]] = [
    (vim.host.FibreChannelOverEthernetHba, "FCoE"),
    (vim.host.FibreChannelHba, "FibreChannel"),
    (vim.host.InternetScsiHba, "iSCSI"),
    (vim.host.SerialAttachedHba, "SAS"),
    (vim.host.ParallelScsiHba, "ParallelSCSI"),
    (vim.host.BlockHba, "Block"),
]


@dataclass
class RawObject:
    ref: Any
    props: dict[str, Any]


def retrieve(session: Session, paths: dict[type, list[str]] = PATHS,
             singletons: Iterable[tuple[Any, list[str]]] = ()) -> Iterator[RawObject]:
    """Every object of the given types below the root folder, with the given properties; and, in the same call,
    the given properties of each `singletons` object (a service object outside the inventory, such as the
    CustomFieldsManager)."""
    content = session.content
    view = content.viewManager.CreateContainerView(content.rootFolder, list(paths), True)
    silent = False  # vCenter stopped answering: the view is not destroyed (it ends with the session)
    try:
        traversal = PC.TraversalSpec(name="view", path="view", skip=False, type=vim.view.ContainerView)
        extra = list(singletons)
        spec = PC.FilterSpec(
            objectSet=[PC.ObjectSpec(obj=view, skip=True, selectSet=[traversal]),
                       *(PC.ObjectSpec(obj=obj, skip=False) for obj, _ in extra)],
            propSet=[PC.PropertySpec(type=t, pathSet=p, all=False) for t, p in paths.items()]
            + [PC.PropertySpec(type=type(obj), pathSet=p, all=False) for obj, p in extra],
        )
        collector = content.propertyCollector
        result = collector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
        while result is not None:
            for obj in result.objects:
                yield RawObject(obj.obj, {p.name: p.val for p in obj.propSet})
            if not result.token:
                break
            result = collector.ContinueRetrievePropertiesEx(result.token)
    except Unresponsive:
        silent = True
        raise
    finally:
        if not silent:
            view.DestroyView()


def _wwn(value: int) -> str:
    raw = value & 0xFFFFFFFFFFFFFFFF
    return ":".join(f"{(raw >> s) & 0xFF:02x}" for s in range(56, -8, -8))


def _hba(h: Any) -> Hba:
    kind = next((name for cls, name in HBA_TYPES if isinstance(h, cls)), type(h).__name__)
    extra: dict[str, str] = {}
    if isinstance(h, vim.host.FibreChannelHba):
        extra = {"wwnn": _wwn(h.nodeWorldWideName), "wwpn": _wwn(h.portWorldWideName)}
    elif isinstance(h, vim.host.InternetScsiHba):
        extra = {"iqn": h.iScsiName or ""}
    return Hba(device=h.device, type=kind, key=h.key or "", model=h.model or "", pci=h.pci or "", **extra)


def _host(ref: Any, p: dict[str, Any], clusters: dict[str, str], datastores: dict[str, str]) -> Host:
    hbas = [_hba(h) for h in p.get("config.storageDevice.hostBusAdapter") or []]
    hba_by_key = {h.key: h.device for h in hbas}
    scsi = {lun.key: lun for lun in p.get("config.storageDevice.scsiLun") or []}
    multipath = p.get("config.storageDevice.multipathInfo")
    paths_by_lun: dict[str, list[LunPath]] = {}
    for mlun in (multipath.lun if multipath else None) or []:
        paths_by_lun[mlun.lun] = [
            LunPath(name=mp.name, hba=hba_by_key.get(mp.adapter, mp.adapter), state=mp.pathState or mp.state or "")
            for mp in mlun.path or []
        ]
    luns = []
    for key, lun in scsi.items():
        capacity = getattr(lun, "capacity", None)
        luns.append(HostLun(
            name=lun.canonicalName, uuid=lun.uuid or "", vendor=(lun.vendor or "").strip(),
            model=(lun.model or "").strip(),
            capacity_bytes=(capacity.block * capacity.blockSize) if capacity else 0,
            local=bool(getattr(lun, "localDisk", False)), paths=tuple(paths_by_lun.get(key, ())),
        ))
    parent = p.get("parent")
    return Host(
        moref=ref._moId, name=p["name"], cluster=clusters.get(parent._moId) if parent is not None else None,
        hbas=tuple(hbas), luns=tuple(luns),
        datastores=tuple(sorted(datastores[d._moId] for d in p.get("datastore") or [] if d._moId in datastores)),
        connection_state=str(p.get("runtime.connectionState") or "connected"),
    )


def _datastore(ref: Any, p: dict[str, Any], hosts: dict[str, str], local_luns: set[str]) -> Datastore:
    summary, info = p.get("summary"), p.get("info")
    ds_type = str(summary.type) if summary else ""
    extents: tuple[str, ...] = ()
    remote_host = remote_path = ""
    kind = DatastoreKind.OTHER
    if isinstance(info, vim.host.VmfsDatastoreInfo) and info.vmfs is not None:
        extents = tuple(e.diskName for e in info.vmfs.extent or [])
        # vSphere 6.5+ flags local VMFS volumes; older hosts: every extent is a host-local disk.
        local = bool(info.vmfs.local) or (info.vmfs.local is None and bool(extents)
                                          and all(e in local_luns for e in extents))
        kind = DatastoreKind.LOCAL if local else DatastoreKind.VMFS
    elif isinstance(info, vim.host.NasDatastoreInfo) and info.nas is not None:
        kind = DatastoreKind.NFS
        remote_host, remote_path = info.nas.remoteHost or "", info.nas.remotePath or ""
    mounts = [m for m in p.get("host") or [] if m.mountInfo is None or m.mountInfo.mounted is not False]
    return Datastore(
        moref=ref._moId, name=p["name"], kind=kind, type=ds_type, url=summary.url if summary else "",
        capacity_bytes=int(summary.capacity or 0) if summary else 0,
        free_bytes=int(summary.freeSpace or 0) if summary else 0,
        extents=extents, nfs_remote_host=remote_host, nfs_remote_path=remote_path,
        hosts=tuple(sorted(hosts[m.key._moId] for m in mounts if m.key._moId in hosts)),
    )


def _disks(devices: Iterable[Any], datastores: dict[str, str]) -> tuple[tuple[Disk, ...], tuple[str, ...]]:
    devices = list(devices)
    by_key = {d.key: d for d in devices}
    disks, passthrough = [], []
    for d in devices:
        if isinstance(d, vim.vm.device.VirtualPCIPassthrough):
            pci = getattr(d.backing, "id", None)
            if pci:
                passthrough.append(pci)
        if not isinstance(d, vim.vm.device.VirtualDisk):
            continue
        ctrl = by_key.get(d.controllerKey)
        ctrl_name = next((name for cls, name in CONTROLLERS if isinstance(ctrl, cls)), "unknown")
        bus = getattr(ctrl, "busNumber", 0) or 0
        prefix = {"nvme": "nvme", "sata": "sata", "ide": "ide"}.get(ctrl_name, "scsi")
        backing = d.backing
        file = getattr(backing, "fileName", "") or ""
        ds_ref = getattr(backing, "datastore", None)
        ds_name = datastores.get(ds_ref._moId, "") if ds_ref is not None else ""
        if not ds_name and file.startswith("["):
            ds_name = file[1:file.index("]")]
        kind, lun = "flat", ""
        if isinstance(backing, vim.vm.device.VirtualDisk.RawDiskMappingVer1BackingInfo):
            kind = "rdm-physical" if backing.compatibilityMode == "physicalMode" else "rdm-virtual"
            lun = (backing.deviceName or "").rsplit("/", 1)[-1]
        elif not isinstance(backing, vim.vm.device.VirtualDisk.FlatVer2BackingInfo):
            kind = "other"
        capacity = int(getattr(d, "capacityInBytes", 0) or 0) or int(d.capacityInKB or 0) * 1024
        disks.append(Disk(
            key=d.key, label=d.deviceInfo.label if d.deviceInfo else f"disk {d.key}", file=file, datastore=ds_name,
            capacity_bytes=capacity, controller=ctrl_name, unit=f"{prefix}{bus}:{d.unitNumber}", backing=kind, lun=lun,
            mode=str(getattr(backing, "diskMode", "") or "persistent"),
        ))
    disks.sort(key=lambda d: d.key)  # vCenter's device order, stable when a device is edited (moved last)
    return tuple(disks), tuple(passthrough)


def _network(ref: Any, p: dict[str, Any], hosts: dict[str, str], switches: dict[str, str]) -> Network:
    kind, key, switch_uuid = "standard", "", ""
    if isinstance(ref, vim.dvs.DistributedVirtualPortgroup):
        kind, key = "distributed", p.get("key") or ""
        switch = p.get("config.distributedVirtualSwitch")
        switch_uuid = switches.get(switch._moId, "") if switch is not None else ""
    elif isinstance(ref, vim.OpaqueNetwork):
        kind = "opaque"
        key = getattr(p.get("summary"), "opaqueNetworkId", "") or ""
    return Network(
        moref=ref._moId, name=p.get("name") or "", kind=kind,
        hosts=tuple(sorted(hosts[h._moId] for h in p.get("host") or [] if h._moId in hosts)),
        key=key, switch_uuid=switch_uuid,
    )


def _nics(devices: Iterable[Any], networks: Iterable[Network]) -> tuple[Nic, ...]:
    """The VM's network adapters; the network by name: the backing's deviceName (standard), the port group's name
    (distributed, by key), the opaque network's name (by id)."""
    by_key = {(n.kind, n.key): n.name for n in networks if n.key}
    nics = []
    for d in devices:
        if not isinstance(d, vim.vm.device.VirtualEthernetCard):
            continue
        backing, network = d.backing, ""
        if isinstance(backing, vim.vm.device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
            key = backing.port.portgroupKey if backing.port is not None else ""
            network = by_key.get(("distributed", key or ""), key or "")
        elif isinstance(backing, vim.vm.device.VirtualEthernetCard.OpaqueNetworkBackingInfo):
            network = by_key.get(("opaque", backing.opaqueNetworkId or ""), backing.opaqueNetworkId or "")
        elif backing is not None:
            network = getattr(backing, "deviceName", "") or ""
        nics.append(Nic(
            key=d.key, label=d.deviceInfo.label if d.deviceInfo else f"ethernet {d.key}",
            type=next((name for cls, name in NIC_TYPES if isinstance(d, cls)), type(d).__name__),
            network=network, mac=d.macAddress or "",
        ))
    return tuple(nics)


def _custom_attributes(values: Iterable[Any], fields: dict[int, str]) -> tuple[tuple[str, str], ...]:
    """(field name, value) of each custom value whose field is defined, sorted by name."""
    return tuple(sorted((fields[v.key], str(getattr(v, "value", "") or "")) for v in values if v.key in fields))


def _folder_paths(folders: dict[str, tuple[str, Any]], roots: set[str]) -> dict[str, str]:
    """Path of every VM folder below its datacenter's VM folder ("" for the root itself)."""
    paths: dict[str, str] = {}

    def path(moid: str) -> str | None:
        if moid in roots:
            return ""
        if moid in paths:
            return paths[moid]
        if moid not in folders:
            return None
        name, parent = folders[moid]
        above = path(parent._moId) if parent is not None else None
        if above is None:
            return None
        paths[moid] = f"{above}/{name}" if above else name
        return paths[moid]

    for moid in folders:
        path(moid)
    return paths


def discover(session: Session, *, tags: Any | None = None) -> Inventory:
    """Read clusters, hosts (HBAs, LUNs, paths), datastores, networks and VMs (disks, NICs, tags, custom
    attributes, firmware, hardware version) into an `Inventory`.

    `tags` is an `adapters.tags.TagClient`; its batch call reads every VM's tags at once.
    """
    before = session.counter.total
    objects: dict[type, list[RawObject]] = {t: [] for t in PATHS}
    fields: dict[int, str] = {}  # custom field key -> name
    manager = session.content.customFieldsManager
    for obj in retrieve(session, singletons=[(manager, ["field"])] if manager is not None else []):
        if isinstance(obj.ref, vim.CustomFieldsManager):
            fields = {f.key: f.name for f in obj.props.get("field") or []}
            continue
        for t in PATHS:
            if isinstance(obj.ref, t):  # distributed port groups and opaque networks land with vim.Network
                objects[t].append(obj)
                break

    datacenters = objects[vim.Datacenter]
    if not datacenters:
        raise LookupError("vCenter has no datacenter")
    vm_roots = {o.props["vmFolder"]._moId for o in datacenters}
    clusters = {o.ref._moId: o.props["name"] for o in objects[vim.ComputeResource]
                if isinstance(o.ref, vim.ClusterComputeResource)}
    host_names = {o.ref._moId: o.props["name"] for o in objects[vim.HostSystem]}
    ds_names = {o.ref._moId: o.props["name"] for o in objects[vim.Datastore]}
    folders = {o.ref._moId: (o.props["name"], o.props.get("parent")) for o in objects[vim.Folder]}
    folder_path = _folder_paths(folders, vm_roots)

    hosts = tuple(sorted((_host(o.ref, o.props, clusters, ds_names) for o in objects[vim.HostSystem]),
                         key=lambda h: h.name))
    host_cluster = {h.moref: h.cluster for h in hosts}
    local_luns = {lun.name for h in hosts for lun in h.luns if lun.local}
    datastores = tuple(sorted((_datastore(o.ref, o.props, host_names, local_luns) for o in objects[vim.Datastore]),
                              key=lambda d: d.name))
    cluster_list = tuple(sorted(
        (Cluster(moref=o.ref._moId, name=o.props["name"],
                 hosts=tuple(sorted(host_names[h._moId] for h in o.props.get("host") or [] if h._moId in host_names)))
         for o in objects[vim.ComputeResource] if isinstance(o.ref, vim.ClusterComputeResource)),
        key=lambda c: c.name))

    switches = {o.ref._moId: o.props.get("uuid") or "" for o in objects[vim.DistributedVirtualSwitch]}
    networks = tuple(sorted((_network(o.ref, o.props, host_names, switches) for o in objects[vim.Network]),
                            key=lambda n: (n.name, n.moref)))

    vm_tags: dict[str, list[tuple[str, str]]] = {}
    if tags is not None and objects[vim.VirtualMachine]:
        vm_tags = tags.vm_tags([o.ref._moId for o in objects[vim.VirtualMachine]])

    vms = []
    for o in objects[vim.VirtualMachine]:
        p = o.props
        disks, passthrough = _disks(p.get("config.hardware.device") or [], ds_names)
        host_ref = p.get("runtime.host")
        parent = p.get("parent")
        vms.append(VM(
            moref=o.ref._moId, name=p["name"], uuid=p.get("config.uuid") or "",
            instance_uuid=p.get("config.instanceUuid") or "",
            host=host_names.get(host_ref._moId, "") if host_ref is not None else "",
            cluster=host_cluster.get(host_ref._moId) if host_ref is not None else None,
            folder=folder_path.get(parent._moId, "") if parent is not None else "",
            disks=disks, cbt=bool(p.get("config.changeTrackingEnabled")),
            power_state=str(p.get("runtime.powerState") or "poweredOff"), template=bool(p.get("config.template")),
            cpus=int(p.get("config.hardware.numCPU") or 0), memory_mb=int(p.get("config.hardware.memoryMB") or 0),
            passthrough=passthrough,
            tags=tuple(sorted(Tag(c, t) for c, t in vm_tags.get(o.ref._moId, []))),
            nics=_nics(p.get("config.hardware.device") or [], networks),
            custom_attributes=_custom_attributes(p.get("customValue") or [], fields),
            firmware=p.get("config.firmware") or "", hw_version=p.get("config.version") or "",
        ))
    return Inventory(
        datacenter=datacenters[0].props["name"], clusters=cluster_list, hosts=hosts, datastores=datastores,
        vms=tuple(sorted(vms, key=lambda v: v.name)), round_trips=session.counter.total - before,
        networks=networks,
    )
