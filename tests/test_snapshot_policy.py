"""The VMs peers trip over, on the session's simulator: dev-07's quiesced snapshots fail with
ApplicationQuiesceFault (topology QuiesceFault), and each removal of a dev-02 snapshot leaves its disks needing
consolidation (ConsolidationNeeded). `policy.quiesce` required fails the VM after its retries, preferred falls back
to a crash-consistent snapshot and says so; `policy.consolidate` auto consolidates, report only says so. Each
backup writes into a repository of this module's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
import yaml
from pyVim.connect import Disconnect, SmartConnect
from pyVim.task import WaitForTask
from pyVmomi import vim

from adapters.snapshots import SNAPSHOT_PREFIX
from vsphere_proxy.config import PolicyConfig
from vsphere_proxy.jobs.backend import SnapshotPolicy

if TYPE_CHECKING:
    from tests.conftest import VcsimTestbed

pytestmark = pytest.mark.integration

QUIESCE_FAULTY = "dev-07"  # topology QuiesceFault: ApplicationQuiesceFault
NEEDS_CONSOLIDATION = "dev-02"  # topology ConsolidationNeeded
POWERED_OFF = "test-01"
PLAIN = "dev-06"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSPHERE_")} | {"COLUMNS": "1000"}
    return subprocess.run([sys.executable, "-m", "vsphere_proxy", *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


@pytest.fixture(scope="module")
def si(vcsim: VcsimTestbed) -> Iterator[Any]:
    parts = urlsplit(vcsim.url)
    conn = SmartConnect(host=parts.hostname, port=parts.port, user=vcsim.username, pwd=vcsim.password,
                        protocol=parts.scheme, disableSslCertValidation=True)
    try:
        yield conn
    finally:
        Disconnect(conn)


def vm_named(si: Any, name: str) -> Any:
    view = si.content.viewManager.CreateContainerView(si.content.rootFolder, [vim.VirtualMachine], True)
    try:
        return next(vm for vm in view.view if vm.name == name)
    finally:
        view.DestroyView()


def prop(si: Any, vm: Any, path: str) -> Any:
    """One property of the VM through the PropertyCollector (the simulator cannot fetch an unset one lazily)."""
    spec = vim.PropertyCollector.FilterSpec(
        objectSet=[vim.PropertyCollector.ObjectSpec(obj=vm)],
        propSet=[vim.PropertyCollector.PropertySpec(type=vim.VirtualMachine, pathSet=[path])])
    return next((p.val for o in si.content.propertyCollector.RetrieveContents([spec]) for p in o.propSet), None)


def ours(si: Any, vm: Any) -> list[str]:
    def walk(nodes: Any) -> Iterator[str]:
        for node in nodes or []:
            yield node.name
            yield from walk(node.childSnapshotList)

    info = prop(si, vm, "snapshot")
    return [n for n in walk(info.rootSnapshotList if info is not None else []) if n.startswith(SNAPSHOT_PREFIX)]


def failed_quiesced_tasks(si: Any, vm: Any) -> set[str]:
    """The keys of the VM's createSnapshot tasks that ended in ApplicationQuiesceFault, among the recent tasks."""
    out = set()
    for task in si.content.taskManager.recentTask:
        try:
            info = task.info
        except Exception:  # a task whose entity is gone (a removed snapshot's)
            continue
        if (info.descriptionId == "VirtualMachine.createSnapshot" and info.entity is not None
                and info.entity._moId == vm._moId and isinstance(info.error, vim.fault.ApplicationQuiesceFault)):
            out.add(info.key)
    return out


def backup(vcsim: VcsimTestbed, work: Path, names: list[str], **policy: Any) -> tuple[int, dict[str, Any], str]:
    data = yaml.safe_load(vcsim.config_path.read_text())
    data["repository"] = {"path": str(work / "repository")}
    data["job"]["select"] = {"names": names}
    data["job"].setdefault("policy", {}).update(policy)
    config = work / "c.yaml"
    config.write_text(yaml.safe_dump(data))
    r = run("backup", "--config", str(config), "--json")
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else {}
    return r.returncode, report, r.stderr


def lines(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["vm"]: v for v in report["vms"]}


def test_policy_values_and_the_old_booleans() -> None:
    assert PolicyConfig().quiesce == "off" and PolicyConfig().consolidate == "auto"
    assert PolicyConfig().quiesce_retries == 1
    assert PolicyConfig(quiesce=True).quiesce == "required" and PolicyConfig(quiesce=False).quiesce == "off"
    assert not SnapshotPolicy.of(PolicyConfig()).quiesces
    assert SnapshotPolicy.of(PolicyConfig(quiesce="preferred")).quiesces
    assert SnapshotPolicy.of(PolicyConfig(quiesce=True)) == SnapshotPolicy("required")


def test_quiesce_preferred_falls_back_to_a_crash_consistent_snapshot(vcsim: VcsimTestbed, si: Any,
                                                                      tmp_path: Path) -> None:
    vm = vm_named(si, QUIESCE_FAULTY)
    before = failed_quiesced_tasks(si, vm)
    code, report, err = backup(vcsim, tmp_path, [QUIESCE_FAULTY], quiesce="preferred", quiesce_retries=1)
    assert code == 0, (report, err)
    line = lines(report)[QUIESCE_FAULTY]
    assert line["status"] == "done" and line["point"], line
    fell_back = [n for n in line["notes"] if n.startswith("quiesce failed (ApplicationQuiesceFault: ")]
    assert len(fell_back) == 1, line["notes"]
    assert "backed up from a crash-consistent snapshot" in fell_back[0], fell_back
    assert len(failed_quiesced_tasks(si, vm) - before) == 2  # quiesce_retries + 1
    assert ours(si, vm) == []


def test_quiesce_required_fails_the_vm_after_its_retries_and_the_others_are_done(vcsim: VcsimTestbed, si: Any,
                                                                                 tmp_path: Path) -> None:
    vm = vm_named(si, QUIESCE_FAULTY)
    before = failed_quiesced_tasks(si, vm)
    code, report, err = backup(vcsim, tmp_path, [QUIESCE_FAULTY, PLAIN, POWERED_OFF], quiesce="required",
                               quiesce_retries=2)
    assert code == 3 and report["status"] == "partial", (report, err)
    by_vm = lines(report)
    faulty = by_vm[QUIESCE_FAULTY]
    assert faulty["status"] == "failed" and faulty["point"] is None, faulty
    assert "ApplicationQuiesceFault" in faulty["error"] and "tried 3 times" in faulty["error"], faulty["error"]
    assert faulty["attempts"] == 1  # the policy's retries are spent: no later round repeats them
    assert len(failed_quiesced_tasks(si, vm) - before) == 3  # quiesce_retries + 1
    assert by_vm[PLAIN]["status"] == "done" and by_vm[POWERED_OFF]["status"] == "done", by_vm
    assert not any(n.startswith("quiesce failed") for n in by_vm[PLAIN]["notes"] + by_vm[POWERED_OFF]["notes"])
    assert ours(si, vm) == []


def consolidate(vm: Any) -> None:
    WaitForTask(vm.ConsolidateVMDisks_Task())


def test_consolidate_auto_consolidates_after_the_snapshot_is_removed(vcsim: VcsimTestbed, si: Any,
                                                                     tmp_path: Path) -> None:
    vm = vm_named(si, NEEDS_CONSOLIDATION)
    code, report, err = backup(vcsim, tmp_path, [NEEDS_CONSOLIDATION])
    assert code == 0, (report, err)
    line = lines(report)[NEEDS_CONSOLIDATION]
    assert line["status"] == "done" and "disks consolidated after the snapshot was removed" in line["notes"], line
    assert prop(si, vm, "runtime.consolidationNeeded") is False
    assert ours(si, vm) == []


@pytest.fixture
def consolidated_afterwards(si: Any) -> Iterator[Any]:
    vm = vm_named(si, NEEDS_CONSOLIDATION)
    try:
        yield vm
    finally:
        if prop(si, vm, "runtime.consolidationNeeded"):
            consolidate(vm)


def test_consolidate_report_only_says_so(vcsim: VcsimTestbed, si: Any, consolidated_afterwards: Any,
                                        tmp_path: Path) -> None:
    vm = consolidated_afterwards
    code, report, err = backup(vcsim, tmp_path, [NEEDS_CONSOLIDATION], consolidate="report")
    assert code == 0, (report, err)
    line = lines(report)[NEEDS_CONSOLIDATION]
    assert line["status"] == "done", line
    assert "disks need consolidation (policy.consolidate: report)" in line["notes"], line["notes"]
    assert prop(si, vm, "runtime.consolidationNeeded") is True
    assert ours(si, vm) == []


def test_a_vm_without_either_trouble_has_no_such_notes(vcsim: VcsimTestbed, tmp_path: Path) -> None:
    code, report, err = backup(vcsim, tmp_path, [PLAIN], quiesce="preferred")
    assert code == 0, (report, err)
    notes = lines(report)[PLAIN]["notes"]
    assert not any(n.startswith(("quiesce failed", "disks ")) for n in notes), notes


def test_an_unknown_quiesce_value_is_exit_2_in_one_line(vcsim: VcsimTestbed, tmp_path: Path) -> None:
    code, report, err = backup(vcsim, tmp_path, [PLAIN], quiesce="sometimes")
    assert code == 2 and report == {}, (code, report, err)
    assert len(err.strip().splitlines()) == 1 and "quiesce" in err and "sometimes" in err, err
