"""Discovery against the live launcher: what it reads equals what the topology file declares."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from adapters.discovery import discover
from adapters.session import Session, connect
from adapters.tags import TagClient
from vsphere_proxy.config import Selection
from vsphere_proxy.model import DatastoreKind, Inventory, Tag
from vsphere_proxy.selection import select_vms

pytestmark = pytest.mark.integration

KIND = {"VMFS": DatastoreKind.VMFS, "NFS": DatastoreKind.NFS, "NFS41": DatastoreKind.NFS, "local": DatastoreKind.LOCAL}


@pytest.fixture(scope="module")
def session(vcsim: Any) -> Iterator[Session]:
    with connect(vcsim.url, vcsim.username, vcsim.password, insecure=True) as s:
        yield s


@pytest.fixture(scope="module")
def tags(vcsim: Any, session: Session) -> Iterator[TagClient]:
    with TagClient(session.base_url, vcsim.username, vcsim.password, verify=False) as client:
        yield client


@pytest.fixture(scope="module")
def inventory(session: Session, tags: TagClient) -> Inventory:
    return discover(session, tags=tags)


def test_counts_equal_the_topology(vcsim: Any, inventory: Inventory) -> None:
    topo = vcsim.topology
    assert inventory.datacenter == topo["Datacenter"]
    assert sorted(c.name for c in inventory.clusters) == sorted(topo["Cluster"])
    assert sorted(h.name for h in inventory.hosts) == sorted(h["Name"] for h in topo["Host"])
    assert sorted(d.name for d in inventory.datastores) == sorted(d["Name"] for d in topo["Datastore"])
    assert sorted(v.name for v in inventory.vms) == sorted(m["Name"] for m in topo["Machine"])
    assert len(inventory.hosts) >= 6 and len(inventory.clusters) >= 2 and len(inventory.vms) >= 20
    for c in topo["Cluster"]:
        declared = sorted(h["Name"] for h in topo["Host"] if h["Cluster"] == c)
        assert next(x for x in inventory.clusters if x.name == c).hosts == tuple(declared)


def test_a_fixed_number_of_round_trips(inventory: Inventory) -> None:
    # CreateContainerView + RetrievePropertiesEx + DestroyView, whatever the number of VMs.
    assert 0 < inventory.round_trips <= 5


def test_hbas_luns_and_paths_equal_the_topology(vcsim: Any, inventory: Inventory) -> None:
    for spec in vcsim.topology["Host"]:
        host = inventory.host_by_name[spec["Name"]]
        assert host.cluster == spec["Cluster"]
        san_hbas = [h for h in host.hbas if h.type != "Block"]
        assert [(h.device, h.type) for h in san_hbas] == [(h["Device"], h["Type"]) for h in spec["Hba"]]
        for h, declared in zip(san_hbas, spec["Hba"], strict=True):
            if h.type == "FibreChannel":
                assert (h.wwnn, h.wwpn) == (declared["Wwnn"], declared["Wwpn"])
            else:
                assert h.iqn == declared["Iqn"]
        visible = {lun.name: lun for lun in host.luns if not lun.local}
        assert sorted(visible) == sorted(lun["Name"] for lun in spec["Lun"])
        for lun in spec["Lun"]:
            declared = [(p["Hba"], p["State"]) for p in lun["Path"]]
            assert [(p.hba, p.state) for p in visible[lun["Name"]].paths] == declared


def test_datastore_types_extents_and_mounts(vcsim: Any, inventory: Inventory) -> None:
    for spec in vcsim.topology["Datastore"]:
        ds = inventory.datastore_by_name[spec["Name"]]
        assert ds.kind is KIND[spec["Type"]], spec["Name"]
        assert ds.hosts == tuple(sorted(spec["Host"]))
        if spec["Type"] == "VMFS":
            assert ds.extents == (spec["Lun"],)
        if spec["Type"].startswith("NFS"):
            assert ds.nfs_export == f"{spec['RemoteHost']}:{spec['RemotePath']}"
            assert ds.type == spec["Type"]
        for host in spec["Host"]:
            assert spec["Name"] in inventory.host_by_name[host].datastores


def test_vms_disks_folders_and_tags(vcsim: Any, inventory: Inventory) -> None:
    for spec in vcsim.topology["Machine"]:
        vm = inventory.vm_by_name[spec["Name"]]
        assert vm.host == spec["Host"] and vm.folder == spec["Folder"]
        assert vm.cbt is spec["Cbt"]
        assert vm.power_state == spec["PowerState"]
        assert vm.cpus == spec["Cpu"] and vm.memory_mb == spec["MemoryMB"]
        assert [(d.datastore, d.capacity_bytes, d.controller) for d in vm.disks] == [
            (d["Datastore"], d["CapacityMB"] << 20, d["Controller"]) for d in spec["Disk"]]
        assert all(d.file.startswith(f"[{d.datastore}] {vm.name}/") for d in vm.disks)
        assert sorted(str(t) for t in vm.tags) == sorted(spec.get("Tag", []))
        assert vm.uuid and vm.moref.startswith("vm-")
    proxy = inventory.vm_by_name["proxy-prod"]
    host = inventory.host_by_name[proxy.host]
    assert [h.device for h in host.hbas if h.pci in proxy.passthrough] == ["vmhba3"]


def test_networks_nics_attributes_firmware(vcsim: Any, inventory: Inventory) -> None:
    hosts = tuple(sorted(h["Name"] for h in vcsim.topology["Host"]))
    declared = [n["Name"] for n in vcsim.topology["Network"]]
    assert sorted(n.name for n in inventory.networks) == sorted([*declared, "VM Network"])
    assert all(n.kind == "standard" and n.hosts == hosts and n.moref.startswith("network-") and not n.key
               for n in inventory.networks)
    for spec in vcsim.topology["Machine"]:
        vm = inventory.vm_by_name[spec["Name"]]
        assert [(n.label, n.type, n.network) for n in vm.nics] == [
            (f"Network adapter {i + 1}", n.get("Type", "vmxnet3"), n["Network"])
            for i, n in enumerate(spec.get("Nic", []))]
        assert vm.custom_attributes == tuple(sorted(spec.get("Attribute", {}).items()))
        assert (vm.firmware, vm.hw_version) == (spec.get("Firmware", "bios"), spec.get("Version", "vmx-13"))
    macs = [n.mac for v in inventory.vms for n in v.nics]
    assert len(macs) == len(set(macs)) >= 20
    db = inventory.vm_by_name["db-01"]
    assert [(n.key, n.network) for n in db.nics] == [(4000, "Prod-Net"), (4001, "DR-Net")]
    assert dict(db.custom_attributes) == {"CostCenter": "4800", "Owner": "team-b", "Role": "database"}
    assert (db.firmware, db.hw_version) == ("efi", "vmx-19")
    assert inventory.network_by_name["DR-Net"].hosts == hosts


def test_selecting_by_tag_goes_through_the_sdk(vcsim: Any, inventory: Inventory, tags: TagClient) -> None:
    declared = sorted(m["Name"] for m in vcsim.topology["Machine"] if "BackupPolicy:gold" in m.get("Tag", []))
    assert declared, "the topology tags some VMs gold"
    by_sdk = sorted(inventory.vms[[v.moref for v in inventory.vms].index(m)].name
                    for m in tags.vms_with_tag("BackupPolicy", "gold"))
    assert by_sdk == declared
    chosen = select_vms(inventory, Selection(tags=["BackupPolicy:gold"]))
    assert [s.vm.name for s in chosen] == declared
    assert all(s.because == "tag BackupPolicy:gold" for s in chosen)
    assert ("BackupPolicy", "gold") in tags.tags() and "Owner" in tags.categories()


def test_selection_by_folder_cluster_datastore_and_name(inventory: Inventory) -> None:
    def names(**kw: Any) -> list[str]:
        return [s.vm.name for s in select_vms(inventory, Selection(**kw)) if not s.skip]

    assert names(folders=["Production/DB"]) == ["db-01", "db-02", "db-03"]
    assert set(names(folders=["Production"])) >= {"db-01", "web-01", "app-01"}
    assert all(inventory.vm_by_name[n].cluster == "Dev" for n in names(clusters=["Dev"]))
    assert names(datastores=["vmfs-fc-03"]) == ["dev-05"]
    assert names(names=["web-*"], exclude=["web-04"]) == ["web-01", "web-02", "web-03"]
    skipped = {s.vm.name: s.skip for s in select_vms(inventory, Selection(folders=["/"]), {"proxy-prod"})}
    assert skipped["proxy-prod"] == "a proxy of this job"
    assert Tag("Owner", "team-b") in inventory.vm_by_name["db-01"].tags
