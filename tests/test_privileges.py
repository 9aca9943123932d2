"""`vsphere-proxy privileges`: what the configuration needs (pure), and `--check` against vCenter's
HasPrivilegeOnEntities: the simulator's administrator holds everything; users given roles and permissions through
the AuthorizationManager miss exactly what their roles leave out (a launcher of this module's own, with those
users in VCSIM_ACCOUNTS)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyVmomi import VmomiSupport, vim

from testbed import topology as topo
from testbed.config import write_config, write_credentials
from testbed.launcher import Vcsim
from vsphere_proxy.cli import main
from vsphere_proxy.config import parse_config
from vsphere_proxy.model import VM, Datastore, DatastoreKind, Disk, Inventory, Network, Nic, Tag
from vsphere_proxy.privileges import (
    FEATURES,
    ON,
    REQUIREMENTS,
    Check,
    Entity,
    counts,
    evaluate,
    features_for,
    representatives,
    requirements,
    wanted,
)

live = pytest.mark.integration

ADMIN = "administrator@vsphere.local"
BACKUP = "backup@vsphere.local"  # a role at the root folder without three privileges the job needs
OPERATOR = "operator@vsphere.local"  # every privilege at the root, but none to snapshot one VM
LEFT_OUT = {"VirtualMachine.State.RemoveSnapshot", "Datastore.FileManagement", "VirtualMachine.Config.AddExistingDisk"}
JOB_VMS = ["dev-06", "test-01"]  # neither carries a tag; test-01 carries a custom attribute and a NIC
LIVE_FEATURES = ["backup", "cbt", "hotadd", "restore", "custom-attributes"]


def config(**job: Any) -> Any:
    data: dict[str, Any] = {
        "vcenter": {"url": "http://127.0.0.1:9/sdk", "insecure": True},
        "proxies": [{"name": "proxy-prod", "kind": "vm"},
                    {"name": "phys-01", "kind": "physical", "cpus": 4, "ram_mb": 4096}],
        "job": {"select": {"folders": ["/"]}} | job,
    }
    return parse_config(data)


def privileges_of(reqs: Any, on: str | None = None) -> set[str]:
    return {r.privilege for r in reqs if on is None or r.on == on}


# -- what a configuration needs ----------------------------------------------------------------------------------


def test_a_vm_proxy_needs_the_hot_add_privileges_a_physical_one_does_not() -> None:
    hotadd = {"VirtualMachine.Config.AddExistingDisk", "VirtualMachine.Config.RemoveDisk",
              "VirtualMachine.Config.AddRemoveDevice", "VirtualMachine.Config.AdvancedConfig"}
    with_vm = requirements(features_for(config()))
    assert "hotadd" in features_for(config())
    assert privileges_of(with_vm, "proxy-vm") == hotadd
    physical_only = config(proxies=["phys-01"])
    assert "hotadd" not in features_for(physical_only)
    assert privileges_of(requirements(features_for(physical_only)), "proxy-vm") == set()


def test_incremental_off_drops_change_tracking() -> None:
    on = requirements(features_for(config()))
    off = requirements(features_for(config(policy={"incremental": False})))
    cbt = {"VirtualMachine.Config.ChangeTracking", "VirtualMachine.Provisioning.DiskRandomRead"}
    assert cbt <= privileges_of(on) and not cbt & privileges_of(off)
    assert "cbt" not in features_for(config(policy={"incremental": False}))


def test_backup_and_restore_are_always_listed_quiesce_needs_nothing_more() -> None:
    plain, quiesced = config(), config(policy={"quiesce": True})
    assert features_for(plain)[:1] == ["backup"] and "restore" in features_for(plain)
    assert requirements(features_for(plain)) == requirements(features_for(quiesced))
    assert {"VirtualMachine.State.CreateSnapshot", "VirtualMachine.State.RemoveSnapshot",
            "VirtualMachine.Inventory.Create", "Resource.AssignVMToPool", "Network.Assign",
            "Datastore.AllocateSpace"} <= privileges_of(requirements(features_for(plain)))
    assert "VirtualMachine.State.RevertToSnapshot" not in privileges_of(REQUIREMENTS)


def vm(name: str, *, tags: tuple[Tag, ...] = (), attributes: tuple[tuple[str, str], ...] = (),
       datastores: tuple[str, ...] = ("ds1",), networks: tuple[str, ...] = ("net1",)) -> VM:
    disks = tuple(Disk(2000 + i, f"Hard disk {i + 1}", f"[{d}] {name}/{name}.vmdk", d, 1 << 30, "pvscsi", f"scsi0:{i}")
                  for i, d in enumerate(datastores))
    nics = tuple(Nic(4000 + i, f"Network adapter {i + 1}", "vmxnet3", n, "00:50:56:00:00:01")
                 for i, n in enumerate(networks))
    return VM(f"vm-{name}", name, disks=disks, tags=tags, custom_attributes=attributes, nics=nics)


def test_tags_and_custom_attributes_follow_the_selection_and_the_vms() -> None:
    plain = config()
    assert {"tags", "custom-attributes"} <= set(features_for(plain)), "unknown VMs may carry both"
    assert not {"tags", "custom-attributes"} & set(features_for(plain, [vm("a")]))
    assert "tags" in features_for(config(select={"tags": ["BackupPolicy:gold"]}), [vm("a")])
    assert "tags" in features_for(plain, [vm("a"), vm("b", tags=(Tag("Owner", "x"),))])
    assert features_for(plain, [vm("a", attributes=(("Owner", "x"),))])[-1] == "custom-attributes"


def test_no_duplicates_every_requirement_has_a_short_why_and_a_known_kind() -> None:
    everything = requirements(FEATURES)
    pairs = [(r.privilege, r.on) for r in everything]
    assert len(pairs) == len(set(pairs)) == len({(r.privilege, r.on) for r in REQUIREMENTS})
    for r in REQUIREMENTS:
        assert r.why.strip() and "\n" not in r.why and len(r.why) <= 90, r
        assert r.on in ON and r.feature in FEATURES, r
        assert r.privilege.count(".") >= 1 and " " not in r.privilege, r
    assert [r.feature for r in everything] == sorted((r.feature for r in everything), key=FEATURES.index)
    with pytest.raises(ValueError, match="unknown feature 'snapshots'"):
        requirements(["backup", "snapshots"])


def _declared(type_name: str, method: str) -> set[str]:
    """The privileges pyVmomi declares for a method (the method's own, and those of its parameters)."""
    info = VmomiSupport.GetVmodlType(type_name)._GetMethodInfo(method)
    return {p for p in [info.privId, *(getattr(a, "privId", None) for a in info.params)]
            if p and not p.startswith("System.")}


def test_the_privileges_vsphere_declares_for_the_calls_the_product_makes_are_listed() -> None:
    calls = {
        ("vim.VirtualMachine", "CreateSnapshot"): "vm",  # snapshots: CreateSnapshot_Task
        ("vim.vm.Snapshot", "Remove"): "vm",  # RemoveSnapshot_Task
        ("vim.VirtualMachine", "QueryChangedDiskAreas"): "vm",
        ("vim.Folder", "CreateVm"): None,  # CreateVM_Task on the folder, its pool parameter on the pool
        ("vim.VirtualMachine", "PowerOn"): "folder",  # the restored VM
        ("vim.VirtualMachine", "PowerOff"): "vm",  # the VM a restore replaces
        ("vim.CustomFieldsManager", "AddFieldDefinition"): "vcenter",
        ("vim.CustomFieldsManager", "SetField"): "folder",
    }
    listed = requirements(FEATURES)
    for (type_name, method), on in calls.items():
        declared = _declared(type_name, method)
        assert declared, (type_name, method)
        assert declared <= privileges_of(listed, on), (type_name, method, declared)
    assert ("Resource.AssignVMToPool", "resource-pool") in {(r.privilege, r.on) for r in listed}


# -- which objects a check asks about, and the verdict -------------------------------------------------------------


def inventory(vms: list[VM]) -> Inventory:
    names = sorted({d for v in vms for d in v.datastores})
    nets = sorted({n.network for v in vms for n in v.nics})
    return Inventory("DC", datastores=tuple(Datastore(f"ds-{n}", n, DatastoreKind.VMFS, "VMFS") for n in names),
                     vms=(*vms, VM("vm-proxy", "proxy")),
                     networks=tuple(Network(f"dvpg-{n}", n, "distributed") if n.startswith("dv") else
                                    Network(f"net-{n}", n, "standard") for n in nets))


def test_representatives_spread_the_sample_over_the_datastores_and_name_every_proxy_vm() -> None:
    vms = [vm("a", datastores=("ds1",)), vm("b", datastores=("ds1",)), vm("c", datastores=("ds2",), networks=("dv2",)),
           vm("d", datastores=("ds3",)), vm("e", datastores=("ds4",))]
    targets = representatives(inventory(vms), vms, ["proxy", "not-in-vcenter"], limit=3)
    assert [e.name for e in targets["vm"]] == ["a", "c", "d"], "b brings no datastore a does not"
    assert [e.name for e in targets["datastore"]] == ["ds1", "ds2", "ds3"]
    assert targets["network"] == [Entity("Network", "net-net1", "net1"),
                                  Entity("DistributedVirtualPortgroup", "dvpg-dv2", "dv2")]
    assert targets["proxy-vm"] == [Entity("VirtualMachine", "vm-proxy", "proxy")]
    one = representatives(inventory(vms[:1]), vms[:1], [], limit=3)
    assert [e.name for e in one["vm"]] == ["a"] and one["proxy-vm"] == []


def test_evaluate_names_each_object_and_what_it_could_not_check() -> None:
    reqs = requirements(["backup"])
    root, a, b = Entity("Folder", "group-d1", "Datacenters"), Entity("VirtualMachine", "vm-1", "a"), \
        Entity("VirtualMachine", "vm-2", "b")
    targets = {"vcenter": [root], "vm": [a, b], "datastore": []}
    asked = wanted(reqs, targets)
    assert asked[a] == ["VirtualMachine.State.CreateSnapshot", "VirtualMachine.State.RemoveSnapshot"]
    assert asked[root] == ["System.Read"]
    answers = {(root, "System.Read"): True, (a, "VirtualMachine.State.CreateSnapshot"): True,
               (a, "VirtualMachine.State.RemoveSnapshot"): False, (b, "VirtualMachine.State.CreateSnapshot"): None,
               (b, "VirtualMachine.State.RemoveSnapshot"): True}
    checks = evaluate(reqs, targets, answers)
    assert counts(checks) == {"ok": 3, "missing": 1, "not checked": 2}
    assert [c.describe() for c in checks if c.status == "missing"] == ["VirtualMachine.State.RemoveSnapshot on a"]
    browse = [c for c in checks if c.requirement.privilege == "Datastore.Browse"]
    assert browse == [Check(browse[0].requirement, None, None, browse[0].note)] and "no object" in browse[0].note
    assert browse[0].describe() == f"Datastore.Browse on {ON['datastore']}"


def test_without_check_it_prints_the_table_without_logging_in(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"  # a vCenter nobody listens on, and no credentials: nothing is asked of it
    path.write_text(yaml.safe_dump({"vcenter": {"url": "http://127.0.0.1:9/sdk", "insecure": True},
                                    "proxies": [{"name": "p [vm]", "kind": "physical", "cpus": 1, "ram_mb": 1024}],
                                    "job": {"select": {"names": ["[bold]x"]}, "policy": {"incremental": False}}}))
    assert main(["privileges", "--config", str(path), "--json"]) == 2, "a bad proxy name is bad input"
    capsys.readouterr()
    data = yaml.safe_load(path.read_text())
    data["proxies"][0]["name"] = "phys-01"
    path.write_text(yaml.safe_dump(data))
    assert main(["privileges", "--config", str(path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["features"] == ["backup", "restore", "tags", "custom-attributes"]
    assert [r["privilege"] for r in out["requirements"]] == [r.privilege for r in requirements(out["features"])]
    assert set(out["requirements"][0]) == {"privilege", "on", "feature", "why"}
    assert main(["privileges", "--config", str(path)]) == 0
    text = capsys.readouterr().out
    assert "VirtualMachine.State.CreateSnapshot" in text and "ChangeTracking" not in text
    assert main(["privileges", "--config", str(tmp_path / "missing.yaml")]) == 2


# -- against the simulator -----------------------------------------------------------------------------------------


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | {"COLUMNS": "1000"}
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)


@live
def test_the_administrator_holds_every_privilege_the_testbed_job_needs(vcsim: Any) -> None:
    r = run("privileges", "--config", str(vcsim.config_path), "--check", "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert data["user"] == vcsim.username and data["faults"] == [] and data["missing"] == []
    assert data["counts"]["missing"] == data["counts"]["not checked"] == 0 and data["counts"]["ok"] > 0
    assert {c["status"] for c in data["checks"]} == {"ok"}
    assert {c["on"] for c in data["checks"]} == set(ON), "an object of every kind was asked about"
    assert {c["entity"] for c in data["checks"] if c["on"] == "proxy-vm"} == {"proxy-prod", "proxy-dev"}
    assert data["features"] == list(FEATURES)
    text = run("privileges", "--config", str(vcsim.config_path), "--check")
    assert text.returncode == 0, text.stderr
    assert text.stdout.rstrip().splitlines()[-1].startswith(f"ok: {data['counts']['ok']} ok, 0 missing, 0 not")


@dataclass
class Restricted:
    sim: Vcsim
    admin: Any  # adapters.session.Session of the administrator
    passwords: dict[str, str]
    work: Path

    def config(self, user: str, password: str | None = None) -> Path:
        """The testbed config of this launcher for `user`, its job the VMs JOB_VMS."""
        credentials = write_credentials(user, password or self.passwords[user], self.work / f"{user}.cred.yaml")
        path = write_config(topo.load(topo.DEFAULT_TOPOLOGY), self.sim.url, credentials, self.work / f"{user}.yaml",
                            self.sim.datastores)
        data = yaml.safe_load(path.read_text())
        data["job"]["select"] = {"names": JOB_VMS}
        path.write_text(yaml.safe_dump(data))
        return path

    def role(self, name: str, privileges: set[str]) -> int:
        """A new role holding `privileges` (AddAuthorizationRole); its id."""
        from adapters.properties import read_one

        manager = self.admin.content.authorizationManager
        manager.AddAuthorizationRole(name=name, privIds=sorted(privileges))
        roles = read_one(self.admin, manager, ["roleList"])["roleList"]
        return int(next(r.roleId for r in roles if r.name == name))

    def grant(self, entity: Any, user: str, role: int, *, propagate: bool = True) -> None:
        """A permission for `user` with `role` on `entity`, beside those it has (SetEntityPermissions)."""
        manager = self.admin.content.authorizationManager
        kept = [p for p in manager.RetrieveEntityPermissions(entity=entity, inherited=False) or []
                if p.principal != user]
        permission = vim.AuthorizationManager.Permission(entity=entity, principal=user, group=False, roleId=role,
                                                         propagate=propagate)
        manager.SetEntityPermissions(entity=entity, permission=[*kept, permission])


@pytest.fixture(scope="module")
def restricted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Restricted]:
    """A launcher of this module's own whose directory also holds BACKUP and OPERATOR."""
    from adapters.session import connect

    passwords = {u: secrets.token_urlsafe(18) for u in (ADMIN, BACKUP, OPERATOR)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VCSIM_ACCOUNTS", json.dumps({BACKUP: passwords[BACKUP], OPERATOR: passwords[OPERATOR]}))
        sim = Vcsim.start(topo.DEFAULT_TOPOLOGY, ADMIN, passwords[ADMIN])
    try:
        with connect(sim.url, ADMIN, passwords[ADMIN], insecure=True) as admin:
            yield Restricted(sim, admin, passwords, tmp_path_factory.mktemp("privileges"))
    finally:
        sim.stop()


def needed() -> set[str]:
    return privileges_of(requirements(LIVE_FEATURES))


@live
def test_a_role_without_three_privileges_misses_exactly_those(restricted: Restricted) -> None:
    role = restricted.role("vsphere-proxy-partial", needed() - LEFT_OUT)
    restricted.grant(restricted.admin.content.rootFolder, BACKUP, role)
    path = restricted.config(BACKUP)
    r = run("privileges", "--config", str(path), "--check", "--json")
    assert r.returncode == 4, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert data["user"] == BACKUP and data["features"] == LIVE_FEATURES and data["faults"] == []
    assert sorted(data["missing"]) == sorted([
        "VirtualMachine.State.RemoveSnapshot on dev-06", "VirtualMachine.State.RemoveSnapshot on test-01",
        "Datastore.FileManagement on local-esx-06", "Datastore.FileManagement on nfs-02",
        "VirtualMachine.Config.AddExistingDisk on proxy-prod", "VirtualMachine.Config.AddExistingDisk on proxy-dev"])
    assert data["counts"]["not checked"] == 0
    assert {c["privilege"] for c in data["checks"] if c["status"] == "missing"} == LEFT_OUT
    text = run("privileges", "--config", str(path), "--check")
    assert text.returncode == 4, text.stderr
    last = text.stdout.rstrip().splitlines()[-1]
    assert last.startswith(f"MISSING: {data['counts']['ok']} ok, 6 missing, 0 not checked: ")
    assert "VirtualMachine.Config.AddExistingDisk on proxy-dev" in last
    assert any(row.split("│")[1].strip() == "MISSING" for row in text.stdout.splitlines() if "RemoveSnapshot" in row)


@live
def test_a_permission_on_one_vm_overrides_the_one_above_it(restricted: Restricted) -> None:
    from adapters.discovery import discover

    everything = restricted.role("vsphere-proxy-all", needed())
    no_snapshots = restricted.role("vsphere-proxy-no-snapshots", needed() - {"VirtualMachine.State.CreateSnapshot"})
    restricted.grant(restricted.admin.content.rootFolder, OPERATOR, everything)
    test_01 = vim.VirtualMachine(discover(restricted.admin).vm_by_name["test-01"].moref, restricted.admin.si._stub)
    restricted.grant(test_01, OPERATOR, no_snapshots, propagate=False)  # applies to the VM itself all the same
    r = run("privileges", "--config", str(restricted.config(OPERATOR)), "--check", "--json")
    assert r.returncode == 4, r.stdout + r.stderr
    data = json.loads(r.stdout)
    assert data["missing"] == ["VirtualMachine.State.CreateSnapshot on test-01"]
    assert data["counts"]["not checked"] == 0


@live
def test_the_directory_refuses_a_wrong_password_and_an_unknown_user(restricted: Restricted) -> None:
    for user, password in ((BACKUP, "not-" + restricted.passwords[BACKUP]), ("nobody@vsphere.local", "x" * 12)):
        r = run("privileges", "--config", str(restricted.config(user, password)), "--check")
        assert r.returncode == 2, r.stdout + r.stderr
        assert "login refused" in r.stderr and user in r.stderr


@live
def test_what_vcenter_does_not_answer_is_not_checked(restricted: Restricted) -> None:
    from adapters.privileges import effective

    gone = Entity("VirtualMachine", "vm-does-not-exist", "gone")
    root = Entity("Folder", restricted.admin.content.rootFolder._moId, "Datacenters")
    answers = effective(restricted.admin, {gone: ["System.Read"], root: ["System.Read", "Global.Licenses"]})
    assert answers.granted == {(gone, "System.Read"): None, (root, "System.Read"): True,
                               (root, "Global.Licenses"): True}
    assert len(answers.faults) == 1 and "ManagedObjectNotFound" in answers.faults[0]
