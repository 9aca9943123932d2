"""What a version-2 restore point saves to recreate the VM (adapters.vm_config): a real backup of one VM of the
session's simulator into a repository of this module's own, checked against what vCenter reports; a capture that
cannot read everything saves what it can; the pure parts (NVRAM location, NICs, disk layout) on pyVmomi objects."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from contextlib import redirect_stdout
from typing import Any

import pytest
import yaml
from pyVmomi import vim

from adapters.discovery import discover
from adapters.properties import read_one
from adapters.properties import vm as vm_ref
from adapters.session import Session, connect
from adapters.snapshots import create_snapshot, remove_snapshot
from adapters.vm_config import disk_layout, encode, nic_records, nvram_path, saved_vm
from vsphere_proxy.cli import main
from vsphere_proxy.model import VM, Disk
from vsphere_proxy.repository import Manifest, Repository, TagRecord

VM_NAME = "db-01"
Device = vim.vm.device


@pytest.fixture(scope="module")
def session(vcsim: Any) -> Iterator[Session]:
    with connect(vcsim.url, vcsim.username, vcsim.password, insecure=True) as s:
        yield s


@pytest.fixture(scope="module")
def backed(vcsim: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Repository, Manifest]:
    work = tmp_path_factory.mktemp("vm-config")
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["repository"] = {"path": str(work / "repository")}
    data["job"]["select"] = {"names": [VM_NAME]}
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["backup", "--config", str(config), "--json"])
    assert code == 0, out.getvalue()
    assert json.loads(out.getvalue())["counts"] == {"done": 1}
    repo = Repository.open(work / "repository")
    point = repo.latest(VM_NAME)
    assert point is not None
    return repo, point


def _machine(vcsim: Any) -> dict[str, Any]:
    return next(m for m in vcsim.topology["Machine"] if m["Name"] == VM_NAME)


@pytest.mark.integration
def test_a_backup_saves_what_recreating_the_vm_needs(vcsim: Any, session: Session,
                                                     backed: tuple[Repository, Manifest]) -> None:
    repo, point = backed
    cfg = point.vm_config
    assert point.version == 2 and cfg is not None, point
    machine = _machine(vcsim)
    moref = next(v.moref for v in discover(session).vms if v.name == VM_NAME)
    live = read_one(session, vm_ref(session, moref), ["config", "customValue", "resourcePool"])
    config = live["config"]

    # the ConfigInfo, whole: what vCenter reports of the VM (the snapshot is gone; its config was the VM's)
    info = cfg.config_info
    assert info["_vimtype"] == "vim.vm.ConfigInfo" and info["name"] == VM_NAME
    assert info["hardware"]["numCPU"] == cfg.cpus == machine["Cpu"] == config.hardware.numCPU
    assert info["hardware"]["memoryMB"] == cfg.memory_mb == machine["MemoryMB"] == config.hardware.memoryMB
    saved = {d["key"]: d for d in info["hardware"]["device"]}
    now = {d["key"]: d for d in encode(config)["hardware"]["device"]}
    assert {k: d["_vimtype"] for k, d in saved.items()} == {k: d["_vimtype"] for k, d in now.items()}
    for key, device in now.items():
        for field in ("controllerKey", "unitNumber", "capacityInBytes", "busNumber"):
            assert saved[key].get(field) == device.get(field), (key, field)
    assert cfg.hardware_version == config.version and cfg.guest_id == config.guestId
    assert cfg.firmware == (config.firmware or "")

    # the disk layout: every disk, with its index in the point, controller and provisioning
    disks = [d for d in config.hardware.device if isinstance(d, Device.VirtualDisk)]
    assert [d.key for d in cfg.disks] == [d.key for d in disks]
    assert [d.index for d in cfg.disks] == [d.index for d in point.disks] == list(range(len(machine["Disk"])))
    for layout, disk, spec in zip(cfg.disks, disks, machine["Disk"], strict=True):
        b = disk.backing
        expected = "thin" if b.thinProvisioned else "thick-eager" if b.eagerlyScrub else "thick-lazy"
        assert layout.provisioning == expected and layout.controller == spec["Controller"]
        assert layout.datastore == spec["Datastore"] and layout.file == b.fileName
        assert layout.capacity == point.disk(layout.index).capacity and layout.unit == disk.unitNumber

    # where it lives: folder, host, cluster, resource pool (a path the restore finds again), home datastore
    assert cfg.folder == machine["Folder"] and cfg.host == machine["Host"]
    cluster = next(h.get("Cluster") for h in vcsim.topology["Host"] if h["Name"] == machine["Host"])
    assert cfg.cluster == cluster and cfg.resource_pool == f"{cluster}/Resources"
    assert cfg.resource_pool_moref == live["resourcePool"]._moId
    found = session.content.searchIndex.FindByInventoryPath(f"{vcsim.topology['Datacenter']}/host/{cfg.resource_pool}")
    assert found is not None and found._moId == cfg.resource_pool_moref
    assert f"[{cfg.datastore}] " in config.files.vmPathName
    assert set(cfg.tags) == {TagRecord(category=c, name=n) for c, n in (t.split(":") for t in machine["Tag"])}

    # the NVRAM file, when the simulator keeps one
    nvram = vcsim.datastores[cfg.datastore] / VM_NAME / f"{VM_NAME}.nvram"
    if nvram.exists():
        assert cfg.nvram is not None and cfg.nvram.file == f"[{cfg.datastore}] {VM_NAME}/{VM_NAME}.nvram"
        assert cfg.nvram.size == nvram.stat().st_size and repo.nvram(point.id) == nvram.read_bytes()
        assert cfg.nvram.chunk in point.chunks()
    else:
        assert cfg.nvram is None and any(n.startswith("nvram not saved: ") for n in cfg.notes), cfg.notes

    # NICs and custom attributes, when the testbed gives the VM some
    nics = [d for d in config.hardware.device if isinstance(d, Device.VirtualEthernetCard)]
    assert [n.key for n in cfg.nics] == [n.key for n in nics]
    for record, nic in zip(cfg.nics, nics, strict=True):
        assert record.network and record.network_kind and record.mac == nic.macAddress
    if live.get("customValue"):
        names = {f.key: f.name for f in read_one(session, session.content.customFieldsManager, ["field"])["field"]}
        assert cfg.custom_attributes == {names[v.key]: v.value for v in live["customValue"] if v.value}
    assert cfg.notes == () or all(n.startswith("nvram not saved: ") for n in cfg.notes), cfg.notes
    assert repo.verify().ok


@pytest.mark.integration
def test_a_capture_that_cannot_read_everything_saves_what_it_can(vcsim: Any, session: Session) -> None:
    vm = next(v for v in discover(session).vms if v.name == VM_NAME)
    snap = create_snapshot(session, vm.moref, "vm-config-test")
    try:
        before = session.counter.total
        saved = saved_vm(session, vm.moref, snap.moref, vm, "NoSuchDatacenter")
        assert session.counter.total - before <= 4  # config; VM and field names; networks; pool path
        cfg = saved.config
        assert saved.nvram is None and cfg.nvram is None and cfg.disks and cfg.resource_pool
        assert [n for n in cfg.notes if n.startswith("nvram not saved: ")] == [
            f"nvram not saved: [{cfg.datastore}] {VM_NAME}/{VM_NAME}.nvram: HTTP 404"], cfg.notes

        gone = saved_vm(session, vm.moref, "snapshot-999999", vm, vcsim.topology["Datacenter"])
        assert gone.config.config_info == {} and gone.nvram is None
        assert gone.config.notes[0].startswith("configuration not saved: read the configuration of snapshot "
                                               "snapshot-999999: vmodl.fault.ManagedObjectNotFound")
        assert gone.config.folder == vm.folder and gone.config.cpus == vm.cpus
        assert "nvram not saved: its location is in the configuration, which was not read" in gone.config.notes
    finally:
        remove_snapshot(session, snap.moref)


def test_the_nvram_file_is_where_the_vmx_or_its_nvram_setting_says() -> None:
    def config(vmx: str, setting: str | None = None) -> Any:
        extra = [vim.option.OptionValue(key="nvram", value=setting)] if setting is not None else []
        return vim.vm.ConfigInfo(files=vim.vm.FileInfo(vmPathName=vmx), extraConfig=extra)

    assert nvram_path(config("[ds-1] db-01/db-01.vmx")) == "[ds-1] db-01/db-01.nvram"
    assert nvram_path(config("[ds-1] old-name/old-name.vmx")) == "[ds-1] old-name/old-name.nvram"
    assert nvram_path(config("[ds-1] db-01/db-01.vmx", "efi.nvram")) == "[ds-1] db-01/efi.nvram"
    assert nvram_path(config("[ds-1] db-01/db-01.vmx", "[ds-2] x/y.nvram")) == "[ds-2] x/y.nvram"
    assert nvram_path(config("[ds-1] db-01/db-01.vmx", "/vmfs/volumes/ds-1/db-01/z.nvram")) is None
    assert nvram_path(config("")) is None


def test_nics_and_the_disk_layout_from_the_device_list() -> None:
    E = Device.VirtualEthernetCard
    standard = Device.VirtualVmxnet3(key=4000, deviceInfo=vim.Description(label="Network adapter 1"),
                                     macAddress="00:50:56:a1:00:01", addressType="assigned",
                                     backing=E.NetworkBackingInfo(deviceName="Prod-Net",
                                                                  network=vim.Network("network-17")),
                                     connectable=Device.VirtualDevice.ConnectInfo(startConnected=False))
    distributed = Device.VirtualE1000e(
        key=4001, deviceInfo=vim.Description(label="Network adapter 2"), macAddress="00:50:56:a1:00:02",
        addressType="Manual", backing=E.DistributedVirtualPortBackingInfo(
            port=vim.dvs.PortConnection(portgroupKey="dvportgroup-31", switchUuid="50 2a 6b")))
    nics = nic_records([standard, distributed], {
        "network-17": {"name": "Prod-Net"}, "dvportgroup-31": {"name": "DR-Net", "key": "dvportgroup-31"}})
    assert [(n.device_type, n.network, n.network_moref, n.network_kind, n.mac_type, n.start_connected)
            for n in nics] == [("vmxnet3", "Prod-Net", "network-17", "standard", "assigned", False),
                               ("e1000e", "DR-Net", "dvportgroup-31", "distributed", "manual", True)]
    assert (nics[1].portgroup_key, nics[1].switch_uuid) == ("dvportgroup-31", "50 2a 6b")

    ctrl = Device.VirtualLsiLogicSASController(key=1000, busNumber=1)
    flat = Device.VirtualDisk.FlatVer2BackingInfo
    devices = [ctrl] + [
        Device.VirtualDisk(key=2000 + i, controllerKey=1000, unitNumber=i, capacityInBytes=1 << 30,
                           deviceInfo=vim.Description(label=f"Hard disk {i + 1}"), backing=b)
        for i, b in enumerate([
            flat(fileName="[ds] v/v.vmdk", diskMode="persistent", thinProvisioned=True),
            flat(fileName="[ds] v/v_1.vmdk", diskMode="independent_persistent", eagerlyScrub=True,
                 sharing="sharingMultiWriter"),
            Device.VirtualDisk.RawDiskMappingVer1BackingInfo(fileName="[ds] v/v_2.vmdk", diskMode="persistent",
                                                             compatibilityMode="physicalMode"),
            flat(fileName="[ds] v/v_3.vmdk", diskMode="persistent"),
        ])]
    vm = VM("vm-1", "v", disks=tuple(Disk(2000 + i, f"Hard disk {i + 1}", f"[ds] v/v_{i}.vmdk", "ds", 1 << 30,
                                           "lsilogic-sas", f"scsi1:{i}", "rdm-physical" if i == 2 else "flat")
                                      for i in range(4)))
    layout = disk_layout(devices, vm)
    assert [(d.index, d.provisioning, d.controller, d.bus, d.disk_mode, d.sharing) for d in layout] == [
        (0, "thin", "lsilogic-sas", 1, "persistent", ""),
        (1, "thick-eager", "lsilogic-sas", 1, "independent_persistent", "sharingMultiWriter"),
        (None, "thick-lazy", "lsilogic-sas", 1, "persistent", ""),
        (2, "thick-lazy", "lsilogic-sas", 1, "persistent", ""),
    ]


def test_the_saved_configinfo_is_plain_json() -> None:
    info = vim.vm.ConfigInfo(name="v", hardware=vim.vm.VirtualHardware(numCPU=2, memoryMB=512, device=[
        Device.VirtualDisk(key=2000, backing=Device.VirtualDisk.FlatVer2BackingInfo(
            fileName="[ds] v/v.vmdk", datastore=vim.Datastore("datastore-12")))]))
    data = encode(info)
    assert json.loads(json.dumps(data)) == data
    disk = data["hardware"]["device"][0]
    assert disk["_vimtype"] == "vim.vm.device.VirtualDisk"
    assert disk["backing"]["datastore"] == "vim.Datastore:datastore-12"
