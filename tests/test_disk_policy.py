"""The disks a backup leaves out (`policy.independent_disks`, `policy.exclude_disks`): pure choices on VMs, then
real backups of the session's simulator where one of db-01's disks is made independent through ReconfigVM_Task
(snapshots do not capture such a disk) and where disks are excluded by label and index. The report says what
happened to each disk; the restore point holds exactly the disks read."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from pyVmomi import vim

from adapters.properties import managed, read
from adapters.session import Session, connect
from adapters.tasks import wait_for_task
from testbed.bed import USER, own_testbed
from vsphere_proxy.disk_policy import choose_disks
from vsphere_proxy.model import VM, Disk
from vsphere_proxy.repository import Repository

VM_NAME = "db-01"


def disk(label: str, mode: str = "persistent", backing: str = "flat") -> Disk:
    return Disk(key=2000, label=label, file=f"[ds] x/{label}.vmdk", datastore="ds", capacity_bytes=1 << 30,
                controller="pvscsi", unit="scsi0:0", backing=backing, mode=mode)


def test_independent_disks_are_left_out_or_refuse_the_vm_and_exclusions_match_by_label_or_index() -> None:
    vm = VM(moref="vm-1", name="db-01", disks=(disk("Hard disk 1"), disk("Hard disk 2", "independent_persistent"),
                                               disk("Hard disk 3"), disk("RDM", backing="rdm-physical")))
    skip = choose_disks(vm, "skip", {})
    assert [d.label for d in skip.vm.backup_disks] == ["Hard disk 1", "Hard disk 3"] and not skip.refused
    assert skip.notes == ("disk 1 (Hard disk 2) not backed up: independent_persistent disks are not captured by "
                          "snapshots (policy.independent_disks: skip)",)
    fail = choose_disks(vm, "fail", {})
    assert fail.refused.startswith("disk 1 (Hard disk 2) is an independent_persistent disk")
    excluded = choose_disks(vm, "skip", {"db-*": ["Hard disk 3", 0], "web-*": [1]})
    assert excluded.vm.backup_disks == () and excluded.empty.startswith("no disk left to back up: ")
    assert len(excluded.notes) == 3
    other = choose_disks(vm, "skip", {"web-*": [0]})
    assert [d.label for d in other.vm.backup_disks] == ["Hard disk 1", "Hard disk 3"]




@dataclass
class Bed:
    """A launcher of this module's own: its tests reconfigure disks (vCenter then lists the edited device last),
    which the session's shared simulator must not see."""

    config_path: Path
    url: str
    username: str
    password: str


@pytest.fixture(scope="module")
def bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    with own_testbed(tmp_path_factory.mktemp("disk-policy")) as own:
        yield Bed(own.config, own.sim.url, USER, own.password)


@pytest.fixture
def session(bed: Bed) -> Iterator[Session]:
    with connect(bed.url, bed.username, bed.password, insecure=True) as s:
        yield s


def vm_disks(session: Session, moref: str) -> list[Any]:
    ref = managed(session, vim.VirtualMachine, moref)
    config = read(session, [ref], ["config"])[moref]["config"]
    return [d for d in config.hardware.device if isinstance(d, vim.vm.device.VirtualDisk)]


def set_mode(session: Session, moref: str, label: str, mode: str) -> None:
    ref = managed(session, vim.VirtualMachine, moref)
    device = next(d for d in vm_disks(session, moref) if d.deviceInfo.label == label)
    device.backing.diskMode = mode
    change = vim.vm.device.VirtualDeviceSpec(operation=vim.vm.device.VirtualDeviceSpec.Operation.edit, device=device)
    wait_for_task(session, ref.ReconfigVM_Task(spec=vim.vm.ConfigSpec(deviceChange=[change])))


def backup(vcsim: Bed, work: Path, policy: dict[str, Any], vms: list[str]) -> tuple[int, dict[str, Any], str]:
    work.mkdir(exist_ok=True)
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["repository"] = {"path": str(work / "repository")}
    data["job"]["select"] = {"names": vms}
    data["job"]["policy"] = {**data["job"].get("policy", {}), **policy}
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")}
    r = subprocess.run([sys.executable, "-m", "vsphere_proxy", "backup", "--config", str(config), "--json"],
                       capture_output=True, text=True, env=env, timeout=600, check=False)
    return r.returncode, json.loads(r.stdout) if r.stdout.startswith("{") else {}, r.stderr


@pytest.mark.integration
def test_an_independent_disk_is_reported_and_left_out_or_fails_the_vm(bed: Bed, session: Session,
                                                                     tmp_path: Path) -> None:
    vcsim = bed
    moref = next(m for m, d in _vms(session).items() if d == VM_NAME)
    labels = [d.deviceInfo.label for d in vm_disks(session, moref)]
    set_mode(session, moref, labels[1], "independent_persistent")
    try:
        code, report, err = backup(vcsim, tmp_path / "skip", {}, [VM_NAME])
        assert code == 0, err
        (line,) = report["vms"]
        assert line["status"] == "done" and len(line["notes"]) >= 1
        assert line["notes"][0].endswith(f"({labels[1]}) not backed up: independent_persistent disks are not "
                                         "captured by snapshots (policy.independent_disks: skip)")
        point = Repository.open(tmp_path / "skip" / "repository").latest(VM_NAME)
        assert point is not None and sorted(d.label for d in point.disks) == sorted({*labels} - {labels[1]})
        layout = {d.label: d.index for d in point.vm_config.disks}  # type: ignore[union-attr]
        assert layout[labels[1]] is None and sorted(i for i in layout.values() if i is not None) == [0, 1]

        code, report, err = backup(vcsim, tmp_path / "fail", {"independent_disks": "fail"}, [VM_NAME, "web-01"])
        assert code == 3, err
        failed = next(v for v in report["vms"] if v["vm"] == VM_NAME)
        assert failed["status"] == "failed" and failed["attempts"] == 1
        assert "is an independent_persistent disk, which snapshots do not capture" in failed["error"]
        assert Repository.open(tmp_path / "fail" / "repository").latest(VM_NAME) is None
    finally:
        set_mode(session, moref, labels[1], "persistent")


@pytest.mark.integration
def test_excluded_disks_by_label_and_index(bed: Bed, session: Session, tmp_path: Path) -> None:
    vcsim = bed
    moref = next(m for m, d in _vms(session).items() if d == VM_NAME)
    labels = [d.deviceInfo.label for d in vm_disks(session, moref)]
    code, report, err = backup(vcsim, tmp_path / "one", {"exclude_disks": {"db-*": [labels[2], 0]}}, [VM_NAME])
    assert code == 0, err
    (line,) = report["vms"]
    excluded = [n for n in line["notes"] if n.endswith("not backed up: excluded by policy.exclude_disks")]
    assert len(excluded) == 2 and any(n.startswith("disk 0 (") for n in excluded)  # by index
    assert any(f"({labels[2]})" in n for n in excluded)  # by label
    point = Repository.open(tmp_path / "one" / "repository").latest(VM_NAME)
    assert point is not None and len(point.disks) == 1 and point.disks[0].label not in (labels[2],)
    code, report, err = backup(vcsim, tmp_path / "none", {"exclude_disks": {VM_NAME: [0, 1, 2]}},
                               [VM_NAME, "web-01"])
    assert code == 0, err
    skipped = next(v for v in report["vms"] if v["vm"] == VM_NAME)
    assert skipped["status"] == "skipped" and skipped["error"].startswith("no disk left to back up: ")


def _vms(session: Session) -> dict[str, str]:
    view = session.content.viewManager.CreateContainerView(session.content.rootFolder, [vim.VirtualMachine], True)
    try:
        return {vm._moId: vm.name for vm in view.view}
    finally:
        view.Destroy()
