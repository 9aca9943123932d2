"""What recreating a VM needs, read at its backup snapshot (DESIGN §8; docs/repository.md, "Manifest version 2").

`saved_vm` makes the `VmConfig` and reads the NVRAM file a version-2 restore point saves. Through the
PropertyCollector, four calls at most:

1. the snapshot's `config` (its `vim.vm.ConfigInfo`): kept whole as JSON, and read for the NICs and the disk layout;
2. the VM's `customValue`, `resourcePool` and `network`, with the custom fields' names
   (`customFieldsManager.field`), in one call;
3. the networks the NICs are on (names, distributed port groups' keys), in one call;
4. the resource pool and its ancestors up to the datacenter (its path), in one call, a traversal over `parent`;

then the NVRAM file, with a datastore HTTP GET carrying the session cookie. The folder and the tags are the `VM`
model's (discovery read them). Whatever fails leaves its part empty and adds a line to `notes`: the capture never
fails a backup.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

import requests
from pyVmomi import vim, vmodl
from pyVmomi.VmomiJSONEncoder import VmomiJSONEncoder

from adapters.discovery import CONTROLLERS
from adapters.errors import VSphereError
from adapters.nbd import session_cookie
from adapters.properties import PC, managed, read_one
from adapters.properties import vm as vm_ref
from adapters.retry import DEFAULT_RETRY, RetryPolicy
from adapters.session import Session
from adapters.tasks import describe_fault
from vsphere_proxy.engine.attempt import SavedVm
from vsphere_proxy.model import VM
from vsphere_proxy.repository import DiskLayout, NicRecord, NvramRecord, TagRecord, VmConfig

NVRAM_LIMIT = 16 * 1024 * 1024  # an NVRAM file is a few hundred KiB; anything far larger is not one

Device = vim.vm.device
NIC_TYPES: list[tuple[type, str]] = [  # most specific first
    (Device.VirtualVmxnet3, "vmxnet3"),
    (Device.VirtualE1000e, "e1000e"),
    (Device.VirtualE1000, "e1000"),
    (Device.VirtualVmxnet2, "vmxnet2"),
    (Device.VirtualPCNet32, "pcnet32"),
    (Device.VirtualSriovEthernetCard, "sriov"),
]
_NETWORK_PATHS: dict[type, list[str]] = {
    vim.Network: ["name"],
    vim.dvs.DistributedVirtualPortgroup: ["name", "key"],
    vim.OpaqueNetwork: ["name", "summary.opaqueNetworkId"],
}


def saved_vm(session: Session, vm_moref: str, snapshot_moref: str, vm: VM, datacenter: str, *,
             retry: RetryPolicy = DEFAULT_RETRY, http: Any = None, nvram_limit: int = NVRAM_LIMIT) -> SavedVm:
    """The configuration of `vm` at snapshot `snapshot_moref`, and its NVRAM file; never raises."""
    notes: list[str] = []

    def step(what: str, fn: Any) -> Any:
        if session.unresponsive:
            notes.append(f"{what} not saved: vCenter did not answer")
            return None
        try:
            return fn()
        except Exception as e:
            notes.append(f"{what} not saved: {_one_line(e)}")
            return None

    config = step("configuration", lambda: retry.call(
        lambda: read_one(session, managed(session, vim.vm.Snapshot, snapshot_moref), ["config"]).get("config"),
        f"read the configuration of snapshot {snapshot_moref}"))
    config_info: dict[str, Any] = {}
    if config is not None:
        config_info = step("configuration", lambda: encode(config)) or {}
    elif not notes:
        notes.append(f"configuration not saved: snapshot {snapshot_moref} has none")
    devices = list(getattr(getattr(config, "hardware", None), "device", None) or [])

    props = step("custom attributes and resource pool", lambda: retry.call(
        lambda: _vm_properties(session, vm_moref), f"read the custom attributes and resource pool of {vm.name}"))
    attributes, pool_ref, networks_of_vm = {}, None, []
    if props is not None:
        fields, values = props
        attributes = custom_attributes(values.get("customValue") or [], fields)
        pool_ref = values.get("resourcePool")
        networks_of_vm = list(values.get("network") or [])

    nic_devices = [d for d in devices if isinstance(d, Device.VirtualEthernetCard)]
    networks: dict[str, dict[str, Any]] = {}
    if nic_devices:
        refs = [*networks_of_vm, *(_backing_network(d) for d in nic_devices)]
        networks = step("network names", lambda: retry.call(
            lambda: _read_typed(session, refs, _NETWORK_PATHS), f"read the networks of {vm.name}")) or {}

    pool, pool_moref = "", ""
    if pool_ref is not None:
        pool_moref = str(pool_ref._moId)
        pool = step("resource pool path", lambda: retry.call(
            lambda: pool_path(session, pool_ref), f"read the resource pool path of {vm.name}")) or ""
        if not pool:
            pool = _name(session, pool_ref, retry, notes)

    home = str(getattr(getattr(config, "files", None), "vmPathName", "") or "")
    nvram_record, nvram = None, None
    if config is None:
        notes.append("nvram not saved: its location is in the configuration, which was not read")
    else:
        where = nvram_path(config)
        if where is None:
            notes.append(f"nvram not saved: its location is unknown (vmx {home!r})")
        else:
            nvram = step("nvram", lambda: fetch_file(session, datacenter, where, http=http, limit=nvram_limit))
            if nvram is not None:
                nvram_record = NvramRecord(chunk=hashlib.sha256(nvram).hexdigest(), size=len(nvram), file=where)

    nics = step("network adapters", lambda: nic_records(nic_devices, networks)) or ()
    disks = step("disk layout", lambda: disk_layout(devices, vm)) or ()
    hardware = getattr(config, "hardware", None)
    try:
        vm_config = VmConfig(
            config_info=config_info,
            hardware_version=str(getattr(config, "version", "") or ""),
            firmware=str(getattr(config, "firmware", "") or ""),
            guest_id=str(getattr(config, "guestId", "") or ""),
            cpus=int(getattr(hardware, "numCPU", 0) or 0) or vm.cpus,
            cores_per_socket=int(getattr(hardware, "numCoresPerSocket", 0) or 0),
            memory_mb=int(getattr(hardware, "memoryMB", 0) or 0) or vm.memory_mb,
            host=vm.host, cluster=vm.cluster, folder=vm.folder,
            resource_pool=pool, resource_pool_moref=pool_moref, datastore=_datastore_of(home),
            nics=nics, disks=disks,
            tags=tuple(TagRecord(category=t.category, name=t.name) for t in vm.tags),
            custom_attributes=attributes, nvram=nvram_record, notes=tuple(notes),
        )
    except Exception as e:  # a value vCenter reported that the record refuses: keep what identifies the VM
        vm_config = VmConfig(config_info=config_info, cpus=vm.cpus, memory_mb=vm.memory_mb, host=vm.host,
                             cluster=vm.cluster, folder=vm.folder,
                             notes=(*notes, f"configuration fields and nvram not saved: {_one_line(e)}"))
        nvram = None
    return SavedVm(vm_config, nvram)


def encode(config: Any) -> dict[str, Any]:
    """A vim.vm.ConfigInfo as plain JSON, as pyVmomi's VmomiJSONEncoder writes it (docs/repository.md)."""
    return json.loads(json.dumps(config, cls=VmomiJSONEncoder, strip_dynamic=True))


def disk_layout(devices: Sequence[Any], vm: VM) -> tuple[DiskLayout, ...]:
    """Every virtual disk of the configuration, with the index the backup gives it (None when not backed up)."""
    by_key = {d.key: d for d in devices}
    index = {d.key: i for i, d in enumerate(vm.backup_disks)}
    names = {d.key: d.datastore for d in vm.disks}
    out = []
    for d in devices:
        if not isinstance(d, Device.VirtualDisk):
            continue
        controller = by_key.get(d.controllerKey)
        backing = d.backing
        file = str(getattr(backing, "fileName", "") or "")
        if getattr(backing, "thinProvisioned", False):
            provisioning = "thin"
        elif getattr(backing, "eagerlyScrub", False):
            provisioning = "thick-eager"
        else:
            provisioning = "thick-lazy"
        out.append(DiskLayout(
            index=index.get(d.key), key=d.key, label=_label(d), controller_key=int(d.controllerKey or 0),
            controller=next((name for cls, name in CONTROLLERS if isinstance(controller, cls)), "unknown"),
            bus=int(getattr(controller, "busNumber", 0) or 0), unit=int(d.unitNumber or 0),
            capacity=int(getattr(d, "capacityInBytes", 0) or 0) or int(d.capacityInKB or 0) * 1024,
            file=file, datastore=names.get(d.key) or _datastore_of(file), provisioning=provisioning,
            disk_mode=str(getattr(backing, "diskMode", "") or "persistent"),
            sharing=str(getattr(backing, "sharing", "") or ""),
        ))
    return tuple(out)


def nic_records(devices: Iterable[Any], networks: Mapping[str, Mapping[str, Any]]) -> tuple[NicRecord, ...]:
    """The network adapters, each with its network's name, moref and kind (from `networks`: moref -> properties
    of the networks read)."""
    portgroups = {str(p["key"]): moref for moref, p in networks.items() if "key" in p}
    opaque = {str(p["summary.opaqueNetworkId"]): moref for moref, p in networks.items()
              if "summary.opaqueNetworkId" in p}
    out = []
    for d in devices:
        backing = d.backing
        name, moref, kind, pg_key, switch = "", "", "", "", ""
        if isinstance(backing, Device.VirtualEthernetCard.DistributedVirtualPortBackingInfo):
            kind = "distributed"
            pg_key = str(getattr(backing.port, "portgroupKey", "") or "")
            switch = str(getattr(backing.port, "switchUuid", "") or "")
            moref = portgroups.get(pg_key, "")
        elif isinstance(backing, Device.VirtualEthernetCard.OpaqueNetworkBackingInfo):
            kind = "opaque"
            moref = opaque.get(str(backing.opaqueNetworkId or ""), "")
            name = str(backing.opaqueNetworkId or "")
        elif isinstance(backing, Device.VirtualEthernetCard.NetworkBackingInfo):
            kind = "standard"
            name = str(backing.deviceName or "")
            moref = str(backing.network._moId) if backing.network is not None else ""
        name = str(networks.get(moref, {}).get("name", "") or name or pg_key)
        connectable = getattr(d, "connectable", None)
        out.append(NicRecord(
            key=d.key, label=_label(d),
            device_type=next((t for cls, t in NIC_TYPES if isinstance(d, cls)), type(d).__name__.rsplit(".", 1)[-1]),
            network=name, network_moref=moref, network_kind=kind, portgroup_key=pg_key, switch_uuid=switch,
            mac=str(getattr(d, "macAddress", "") or ""), mac_type=str(getattr(d, "addressType", "") or "").lower(),
            start_connected=bool(getattr(connectable, "startConnected", True)) if connectable is not None else True,
        ))
    return tuple(out)


def custom_attributes(values: Iterable[Any], fields: Mapping[int, str]) -> dict[str, str]:
    """`customValue` entries as name -> value; values of unknown fields keep their key as name, empty ones are
    left out."""
    out = {}
    for v in values:
        value = str(getattr(v, "value", "") or "")
        if value:
            out[fields.get(v.key, f"field {v.key}")] = value
    return out


def nvram_path(config: Any) -> str | None:
    """Where the VM's NVRAM file is, "[datastore] dir/vm.nvram": the file the `nvram` advanced setting names
    (relative to the VM's directory, or a datastore path), else `<vmx directory>/<vmx name>.nvram`. None when the
    VM's directory is unknown."""
    vmx = str(getattr(getattr(config, "files", None), "vmPathName", "") or "")
    if not vmx.startswith("[") or "]" not in vmx:
        return None
    datastore = vmx[1:vmx.index("]")]
    relative = vmx[vmx.index("]") + 1:].strip()
    directory, _, vmx_name = relative.rpartition("/")
    setting = next((str(o.value) for o in getattr(config, "extraConfig", None) or []
                    if o.key == "nvram" and o.value), "")
    if setting.startswith("["):
        return setting
    if setting.startswith("/"):  # a host path (/vmfs/volumes/...): not reachable through the datastore endpoint
        return None
    name = setting or (vmx_name.rsplit(".", 1)[0] if "." in vmx_name else vmx_name) + ".nvram"
    return f"[{datastore}] {directory}/{name}" if directory else f"[{datastore}] {name}"


def fetch_file(session: Session, datacenter: str, file: str, *, http: Any = None, limit: int = NVRAM_LIMIT) -> bytes:
    """A small datastore file ("[datastore] path"), whole, through the datastore HTTP endpoint with the session's
    cookie (renewed once when refused), certificate check and timeout; a broken connection is retried, the
    session's attempts in all. Raises VSphereError."""
    datastore, path = _datastore_of(file), file[file.index("]") + 1:].strip() if "]" in file else file
    url = f"{session.base_url}/folder/{quote(path)}?dcPath={quote(datacenter)}&dsName={quote(datastore)}"
    http = http if http is not None else requests
    cookie, renewed, last = session.cookie, False, ""
    attempt = 0
    while attempt < max(1, session.attempts):
        attempt += 1
        try:
            with http.get(url, headers={"Cookie": session_cookie(cookie)}, stream=True, verify=session.verify,
                          timeout=(session.timeout, session.timeout)) as r:
                if r.status_code in (401, 403) and not renewed:
                    cookie, renewed = session.renew_cookie(cookie), True
                    attempt -= 1
                    continue
                if r.status_code >= 500:
                    last = f"HTTP {r.status_code}"
                    continue
                if r.status_code != 200:
                    raise VSphereError(f"{file}: HTTP {r.status_code}")
                data = bytearray()
                for piece in r.iter_content(chunk_size=1 << 16):
                    data += piece
                    if len(data) > limit:
                        raise VSphereError(f"{file}: larger than {limit} bytes")
                return bytes(data)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            last = _one_line(e)
    raise VSphereError(f"{file}: datastore HTTP GET failed after {attempt} attempts: {last}")


def pool_path(session: Session, pool: Any) -> str:
    """A resource pool's path below its datacenter's host folder ("Prod/Resources", "esx-07/Resources/Gold"), in
    one call: the pool and its ancestors, through `parent`. "" when the chain does not reach a datacenter."""
    up = PC.TraversalSpec(name="up", type=vim.ManagedEntity, path="parent", skip=False,
                          selectSet=[PC.SelectionSpec(name="up")])
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=pool, skip=False, selectSet=[up])],
                         propSet=[PC.PropertySpec(type=vim.ManagedEntity, pathSet=["name", "parent"], all=False)])
    found = {o.obj._moId: (o.obj, {p.name: p.val for p in o.propSet or []}) for o in _collect(session, spec)}
    names: list[str] = []
    moref = pool._moId
    while moref in found:
        obj, props = found[moref]
        parent = props.get("parent")
        if isinstance(obj, vim.Datacenter):
            return ""  # passed the host folder without seeing it: not below one
        if isinstance(parent, vim.Datacenter):  # obj is the datacenter's host folder
            return "/".join(reversed(names))
        names.append(str(props.get("name", "")))
        if parent is None:
            break
        moref = parent._moId
    return ""


def _vm_properties(session: Session, vm_moref: str) -> tuple[dict[int, str], dict[str, Any]]:
    """(custom field key -> name, the VM's customValue/resourcePool/network), in one call."""
    ref = vm_ref(session, vm_moref)
    manager = session.content.customFieldsManager
    objects: list[Any] = [ref] + ([manager] if manager is not None else [])
    got = _read_typed(session, objects, {vim.VirtualMachine: ["customValue", "resourcePool", "network"],
                                         vim.CustomFieldsManager: ["field"]})
    fields = {f.key: str(f.name) for f in (got.get(manager._moId, {}).get("field") or [])} if manager else {}
    return fields, got.get(ref._moId, {})


def _read_typed(session: Session, objects: Iterable[Any], paths: Mapping[type, Sequence[str]]
                ) -> dict[str, dict[str, Any]]:
    """Properties of objects of different types, each type its own paths, keyed by moref; one call (paged)."""
    unique = {o._moId: o for o in objects if o is not None}
    if not unique:
        return {}
    present = {t for o in unique.values() for t in paths if isinstance(o, t)}
    spec = PC.FilterSpec(objectSet=[PC.ObjectSpec(obj=o, skip=False) for o in unique.values()],
                         propSet=[PC.PropertySpec(type=t, pathSet=list(paths[t]), all=False) for t in paths
                                  if t in present])
    out: dict[str, dict[str, Any]] = {moref: {} for moref in unique}
    for o in _collect(session, spec):
        out[o.obj._moId].update({p.name: p.val for p in o.propSet or []})
    return out


def _collect(session: Session, spec: Any) -> list[Any]:
    collector = session.content.propertyCollector
    objects = []
    result = collector.RetrievePropertiesEx([spec], PC.RetrieveOptions())
    while result is not None:
        objects += list(result.objects or [])
        if not result.token:
            break
        result = collector.ContinueRetrievePropertiesEx(result.token)
    return objects


def _name(session: Session, ref: Any, retry: RetryPolicy, notes: list[str]) -> str:
    """The object's name, when its path could not be read."""
    if session.unresponsive:
        return ""
    try:
        return str(retry.call(lambda: read_one(session, ref, ["name"]).get("name", ""), f"read the name of {ref}"))
    except Exception as e:
        notes.append(f"resource pool not saved: {_one_line(e)}")
        return ""


def _backing_network(device: Any) -> Any:
    return getattr(device.backing, "network", None)


def _label(device: Any) -> str:
    info = getattr(device, "deviceInfo", None)
    return str(getattr(info, "label", "") or f"device {device.key}")


def _datastore_of(file: str) -> str:
    """"[ds] vm/vm.vmx" -> "ds"."""
    return file[1:file.index("]")] if file.startswith("[") and "]" in file else ""


def _one_line(e: BaseException) -> str:
    text = describe_fault(e) if isinstance(e, vmodl.MethodFault) else str(e)
    return " ".join(text.split()) or type(e).__name__
