"""Backup snapshots and hot-add against the live launcher, plus the retry and slot logic they rely on.

The simulator is shared by the whole test session: every test removes what it made, and a module fixture checks
that no snapshot of ours, no attached disk and no datastore file was left changed.

What the simulator does with these calls (measured): snapshots copy the configuration only (no delta disk) and
record `quiesced`; `memory` and `consolidate` change nothing. A second snapshot on the same VM makes the later
removal of either one delete an unrelated file of the VM, so ours on top of a user's snapshot is checked on the
snapshot tree, not live. Hot-add stores `diskMode` as given and enforces nothing about it (no redo log); a
disk from a datastore the proxy's host does not mount makes ReconfigVM_Task crash the request, hence the
adapter's own check. Detach without `fileOperation` keeps the file, but the simulator neither gives the disk's
capacity back to the datastore's free space nor drops that datastore from the proxy VM's `datastore` list.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import tenacity
from pyVmomi import vim, vmodl

from adapters.discovery import discover
from adapters.errors import VSphereError
from adapters.hotadd import (
    HOTADD_DISK_MODE,
    AttachedDisk,
    attach_disk,
    detach_disk,
    free_slot,
    left_behind,
    left_behind_disks,
    new_controller,
    sweep_attached,
)
from adapters.properties import read_one
from adapters.properties import vm as vm_ref
from adapters.retry import RetryPolicy
from adapters.session import Session, connect
from adapters.snapshots import (
    SNAPSHOT_PREFIX,
    SnapshotEntry,
    create_snapshot,
    list_snapshots,
    ours_children_first,
    remove_snapshot,
    snapshot_name,
    sweep_snapshots,
    walk,
)
from adapters.tasks import TaskError, TaskTimeout, wait_for_task
from testbed.topology import disk_capacity
from vsphere_proxy.transports import flat_path

pytestmark = pytest.mark.integration

PROXIES = ("proxy-prod", "proxy-dev")
FAST = RetryPolicy(attempts=3, wait=tenacity.wait_none(), poll=0.01)


def _files(datastores: dict[str, Path]) -> dict[str, tuple[int, int]]:
    """Every file under the datastore directories: (size, mtime) by path."""
    out = {}
    for root in datastores.values():
        for folder, _, names in os.walk(root):
            for name in names:
                st = os.stat(os.path.join(folder, name))
                out[os.path.join(folder, name)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def session(vcsim: Any) -> Iterator[Session]:
    with connect(vcsim.url, vcsim.username, vcsim.password, insecure=True) as s:
        yield s


@pytest.fixture(scope="module")
def moref(session: Session) -> dict[str, str]:
    return {v.name: v.moref for v in discover(session).vms}


@pytest.fixture(scope="module", autouse=True)
def leaves_the_simulator_as_found(vcsim: Any, session: Session, moref: dict[str, str]) -> Iterator[None]:
    files = _files(vcsim.datastores)
    yield
    proxies = [moref[p] for p in PROXIES]
    assert sweep_attached(session, proxies, retry=FAST) == [], "a test left a disk attached"
    assert sweep_snapshots(session, moref.values(), retry=FAST) == [], "a test left a snapshot of ours"
    assert all(list_snapshots(session, m) == [] for m in moref.values())
    assert _files(vcsim.datastores) == files


def _disk_files(session: Session, vm_moref: str) -> dict[str, Any]:
    devices = read_one(session, vm_ref(session, vm_moref), ["config.hardware.device"])["config.hardware.device"]
    return {d.backing.fileName: d for d in devices if isinstance(d, vim.vm.device.VirtualDisk)}


def _user_snapshot(session: Session, vm_moref: str, name: str) -> str:
    """A snapshot somebody else made (a name without our prefix)."""
    task = vm_ref(session, vm_moref).CreateSnapshot_Task(name=name, description="before patching", memory=False,
                                                         quiesce=False)
    return str(wait_for_task(session, task)._moId)


# --- snapshots on the live simulator ------------------------------------------------------------------------


def test_create_list_and_remove_leaves_none_of_ours(session: Session, moref: dict[str, str]) -> None:
    vm = moref["web-03"]
    before = session.counter.total
    snap = create_snapshot(session, vm, "job-17", retry=FAST)
    assert session.counter.total - before <= 4  # create, task state, devices, datastore names
    assert snap.name.startswith(f"{SNAPSHOT_PREFIX}job-17-") and snap.vm_moref == vm and not snap.quiesced
    listed = list_snapshots(session, vm)
    assert [(e.moref, e.name, e.ours, e.parent) for e in listed] == [(snap.moref, snap.name, True, None)]
    assert "vsphere-proxy" in listed[0].description and listed[0].created is not None
    assert remove_snapshot(session, snap, retry=FAST) is True
    assert list_snapshots(session, vm) == []
    assert remove_snapshot(session, snap.moref, retry=FAST) is False  # idempotent


@pytest.mark.parametrize("vm", ["db-01", "db-03"])
def test_the_snapshot_disks_are_the_topology_disks(vcsim: Any, session: Session, moref: dict[str, str],
                                                   vm: str) -> None:
    snap = create_snapshot(session, moref[vm], "job-disks", quiesce=True, retry=FAST)
    try:
        images = [d for d in vcsim.disks() if d.vm == vm]
        declared = next(m for m in vcsim.topology["Machine"] if m["Name"] == vm)["Disk"]
        assert len(snap.disks) == len(images) == len(declared)
        for disk, image, spec in zip(snap.disks, images, declared, strict=True):
            assert disk.capacity_bytes == image.capacity == disk_capacity(spec["CapacityMB"])
            assert disk.datastore == image.datastore == spec["Datastore"]
            assert disk.file.startswith(f"[{disk.datastore}] {vm}/")
            assert flat_path(disk.file.split("] ", 1)[1]) == f"{vm}/{image.path.name}"
        assert [d.index for d in snap.disks] == list(range(len(images)))
        assert snap.quiesced and list_snapshots(session, moref[vm])[0].quiesced
    finally:
        remove_snapshot(session, snap, retry=FAST)


def test_sweep_removes_ours_on_several_vms_and_keeps_a_user_snapshot(session: Session,
                                                                     moref: dict[str, str]) -> None:
    ours = {name: create_snapshot(session, moref[name], "job-crashed", retry=FAST)
            for name in ("app-01", "dev-01", "test-02")}
    user = _user_snapshot(session, moref["app-02"], "nightly before patch")
    try:
        swept = sweep_snapshots(session, [moref[n] for n in ("app-01", "dev-01", "test-02", "app-02")], retry=FAST)
        assert sorted((s.vm_moref, s.moref, s.name) for s in swept) == sorted(
            (s.vm_moref, s.moref, s.name) for s in ours.values())
        assert all(s.removed for s in swept)
        assert all(list_snapshots(session, moref[n]) == [] for n in ours)
        kept = list_snapshots(session, moref["app-02"])
        assert [(e.moref, e.name, e.ours) for e in kept] == [(user, "nightly before patch", False)]
        assert sweep_snapshots(session, [moref["app-01"], moref["app-02"]], retry=FAST) == []
    finally:
        remove_snapshot(session, user, retry=FAST)
    assert list_snapshots(session, moref["app-02"]) == []


# --- hot-add on the live simulator --------------------------------------------------------------------------


def test_attach_a_snapshot_disk_to_the_proxy_then_detach_it(vcsim: Any, session: Session,
                                                            moref: dict[str, str]) -> None:
    proxy = moref["proxy-prod"]
    own = set(_disk_files(session, proxy))
    snap = create_snapshot(session, moref["web-01"], "job-hotadd", retry=FAST)
    disk = snap.disks[0]
    try:
        attached = attach_disk(session, proxy, disk.file, disk.capacity_bytes, retry=FAST)
        assert (attached.proxy_moref, attached.file, attached.disk_mode) == (proxy, disk.file, HOTADD_DISK_MODE)
        device = _disk_files(session, proxy)[disk.file]
        assert (device.key, device.controllerKey, device.unitNumber) == (
            attached.key, attached.controller_key, attached.unit)
        assert device.backing.diskMode == HOTADD_DISK_MODE and attached.unit != 7
        assert left_behind_disks(session, [proxy]) == {proxy: [attached]}
        with pytest.raises(VSphereError, match="already attached"):
            attach_disk(session, proxy, disk.file, disk.capacity_bytes, retry=FAST)

        assert detach_disk(session, proxy, attached, retry=FAST) is True
        assert set(_disk_files(session, proxy)) == own
        assert left_behind_disks(session, [proxy]) == {proxy: []}
        assert detach_disk(session, proxy, attached, retry=FAST) is False  # idempotent
        flat = Path(vcsim.datastores[disk.datastore]) / flat_path(disk.file.split("] ", 1)[1])
        assert flat.stat().st_size == disk.capacity_bytes  # the file outlives the device
    finally:
        remove_snapshot(session, snap, retry=FAST)


def test_sweep_attached_detaches_a_disk_left_behind(session: Session, moref: dict[str, str]) -> None:
    proxies = [moref[p] for p in PROXIES]
    own = {p: set(_disk_files(session, p)) for p in proxies}
    snap = create_snapshot(session, moref["test-02"], "job-left", retry=FAST)  # disk 1 on vmfs-isc-02 (esx-05)
    try:
        left = attach_disk(session, moref["proxy-dev"], snap.disks[1].file, snap.disks[1].capacity_bytes, retry=FAST)
        swept = sweep_attached(session, proxies, retry=FAST)
        assert [(s.disk, s.detached) for s in swept] == [(left, True)]
        assert {p: set(_disk_files(session, p)) for p in proxies} == own
        assert sweep_attached(session, proxies, retry=FAST) == []
    finally:
        remove_snapshot(session, snap, retry=FAST)


def test_attaching_a_missing_file_names_the_fault_and_changes_nothing(session: Session,
                                                                      moref: dict[str, str]) -> None:
    proxy = moref["proxy-prod"]
    own = set(_disk_files(session, proxy))
    with pytest.raises(TaskError, match=r"attach \[vmfs-fc-01\] web-01/missing\.vmdk .*FileNotFound") as err:
        attach_disk(session, proxy, "[vmfs-fc-01] web-01/missing.vmdk", 1 << 20, retry=FAST)
    assert isinstance(err.value.fault, vim.fault.FileNotFound)
    assert set(_disk_files(session, proxy)) == own


def test_attaching_from_a_datastore_the_proxy_host_does_not_mount_is_refused(session: Session,
                                                                            moref: dict[str, str]) -> None:
    proxy = moref["proxy-dev"]  # on esx-05, which does not mount vmfs-fc-02
    own = set(_disk_files(session, proxy))
    with pytest.raises(VSphereError, match=r"host esx-05 does not mount datastore 'vmfs-fc-02'"):
        attach_disk(session, proxy, "[vmfs-fc-02] db-02/db-02_1.vmdk", 20 << 20, retry=FAST)
    assert set(_disk_files(session, proxy)) == own


# --- retries, task waits (injected callables, clock and sleep) ----------------------------------------------


def _flaky(fault: BaseException, failures: int) -> tuple[Callable[[], str], list[int]]:
    calls: list[int] = []

    def fn() -> str:
        calls.append(1)
        if len(calls) <= failures:
            raise fault
        return "done"

    return fn, calls


@pytest.mark.parametrize("fault", [
    vim.fault.TaskInProgress(msg="another task is running"),
    vmodl.fault.HostCommunication(),
    vmodl.fault.SystemError(reason="busy"),
    TaskError("create snapshot: busy", fault=vim.fault.TaskInProgress()),
    ConnectionResetError("reset by peer"),
], ids=["task-in-progress", "host-communication", "system-error", "task-reported", "connection-reset"])
def test_a_transient_fault_is_retried(fault: BaseException) -> None:
    sleeps: list[float] = []
    fn, calls = _flaky(fault, failures=2)
    policy = RetryPolicy(attempts=4, wait=tenacity.wait_fixed(1.5), sleep=sleeps.append)
    assert policy.call(fn, "create snapshot") == "done"
    assert len(calls) == 3 and sleeps == [1.5, 1.5]


@pytest.mark.parametrize("fault", [
    vim.fault.FileNotFound(file="[ds] vm/vm.vmdk"),
    vim.fault.InvalidDeviceSpec(deviceIndex=0),
    TaskError("attach: bad spec", fault=vim.fault.InvalidDeviceSpec()),
    TaskTimeout("create snapshot: still running after 60 s"),
], ids=["file-not-found", "invalid-device-spec", "task-reported", "task-timeout"])
def test_a_permanent_fault_is_not_retried(fault: BaseException) -> None:
    sleeps: list[float] = []
    fn, calls = _flaky(fault, failures=99)
    with pytest.raises(VSphereError) as err:
        RetryPolicy(attempts=4, wait=tenacity.wait_fixed(1), sleep=sleeps.append).call(fn, "attach disk")
    assert len(calls) == 1 and sleeps == []
    assert "attempts" not in str(err.value)


def test_retries_are_bounded_and_the_error_says_so() -> None:
    fn, calls = _flaky(vim.fault.TaskInProgress(msg="busy"), failures=99)
    with pytest.raises(VSphereError, match=r"remove snapshot snapshot-9: vim.fault.TaskInProgress: busy "
                                           r"\(after 3 attempts\)"):
        RetryPolicy(attempts=3, wait=tenacity.wait_none(), sleep=lambda _: None).call(fn, "remove snapshot snapshot-9")
    assert len(calls) == 3


class _Tasks:
    """A PropertyCollector that reports fixed task info, for waits without a server."""

    def __init__(self, **info: Any) -> None:
        self.info = info
        self.reads = 0

    def RetrievePropertiesEx(self, specs: list[Any], options: Any) -> Any:
        self.reads += 1
        task = specs[0].objectSet[0].obj
        props = [SimpleNamespace(name=f"info.{k}", val=v) for k, v in self.info.items()]
        return SimpleNamespace(objects=[SimpleNamespace(obj=task, propSet=props)], token=None)


def _fake_session(collector: _Tasks) -> Session:
    return cast(Session, SimpleNamespace(content=SimpleNamespace(propertyCollector=collector)))


def test_wait_for_task_times_out_on_the_injected_clock() -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        now[0] += seconds

    collector = _Tasks(state="running")
    with pytest.raises(TaskTimeout, match=r"remove snapshot-3: still running after 10 s"):
        wait_for_task(_fake_session(collector), vim.Task("task-1", None), what="remove snapshot-3", timeout=10,
                      poll=2, clock=lambda: now[0], sleep=sleep)
    assert sleeps == [2, 2, 2, 2, 2] and collector.reads == 6


def test_wait_for_task_raises_the_task_fault_and_returns_the_result() -> None:
    fault = vim.fault.TaskInProgress(msg="busy")
    with pytest.raises(TaskError, match=r"task-2: vim.fault.TaskInProgress: busy") as err:
        wait_for_task(_fake_session(_Tasks(state="error", error=fault)), vim.Task("task-2", None))
    assert err.value.fault is fault and err.value.task == "task-2"
    assert wait_for_task(_fake_session(_Tasks(state="success", result=42)), vim.Task("task-3", None)) == 42


# --- pure helpers -------------------------------------------------------------------------------------------


def _tree(name: str, moref: str, *children: Any) -> Any:
    return vim.vm.SnapshotTree(name=name, snapshot=vim.vm.Snapshot(moref, None), description="", id=0,
                               createTime=datetime(2026, 1, 1, tzinfo=UTC), state="poweredOn", quiesced=False,
                               childSnapshotList=list(children))


def test_ours_are_removed_children_first_and_theirs_never() -> None:
    trees = [_tree("user base", "snapshot-1",
                   _tree(f"{SNAPSHOT_PREFIX}job-a", "snapshot-2", _tree(f"{SNAPSHOT_PREFIX}job-b", "snapshot-3")),
                   _tree("user later", "snapshot-4"))]
    entries = walk(trees, "vm-1")
    assert [(e.moref, e.parent) for e in entries] == [
        ("snapshot-1", None), ("snapshot-2", "snapshot-1"), ("snapshot-3", "snapshot-2"), ("snapshot-4", "snapshot-1")]
    assert [e.moref for e in ours_children_first(entries)] == ["snapshot-3", "snapshot-2"]
    assert ours_children_first([SnapshotEntry("snapshot-9", "vsphere-proxy", "vm-1")]) == []


def test_snapshot_names_carry_prefix_job_and_time_within_80_characters() -> None:
    when = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)
    name = snapshot_name("nightly", when)
    assert name.startswith("vsphere-proxy-nightly-20260304T050607Z-") and len(name) == len(name.strip())
    assert len(snapshot_name("j" * 200, when)) == 80
    with pytest.raises(ValueError):
        snapshot_name("", when)


def _scsi(key: int, bus: int) -> Any:
    return vim.vm.device.ParaVirtualSCSIController(key=key, busNumber=bus, scsiCtlrUnitNumber=7)


def _disk(key: int, controller: int, unit: int, file: str, mode: str = "persistent") -> Any:
    return vim.vm.device.VirtualDisk(key=key, controllerKey=controller, unitNumber=unit,
                                     backing=vim.vm.device.VirtualDisk.FlatVer2BackingInfo(fileName=file,
                                                                                           diskMode=mode))


def test_free_slot_skips_the_controller_unit_and_a_full_bus_gets_a_new_controller() -> None:
    full = [_scsi(1000, 0)] + [_disk(2000 + u, 1000, u, f"[ds] p/p_{u}.vmdk") for u in range(16) if u != 7]
    assert free_slot(full) is None
    ctrl = new_controller(full)
    assert ctrl is not None and ctrl.busNumber == 1 and ctrl.key < 0
    assert free_slot([d for d in full if d.key != 2003]) == (1000, 3)
    assert free_slot([_scsi(1001, 1), _scsi(1000, 0), _disk(2000, 1000, 0, "[ds] p/p.vmdk")]) == (1000, 1)
    assert new_controller([_scsi(1000 + b, b) for b in range(4)]) is None


def test_left_behind_lists_only_foreign_hot_added_disks() -> None:
    devices = [
        _scsi(1000, 0),
        _disk(2000, 1000, 0, "[ds1] proxy/proxy.vmdk"),
        _disk(2001, 1000, 1, "[ds2] proxy/proxy_1.vmdk"),  # the proxy's own disk on another datastore
        _disk(2002, 1000, 2, "[ds1] db/db.vmdk", HOTADD_DISK_MODE),  # left behind by a backup
        _disk(2003, 1000, 3, "[ds3] shared/data.vmdk"),  # somebody else's persistent disk: not ours to remove
    ]
    assert [d.key for d in left_behind(devices, "[ds1] proxy/proxy.vmx")] == [2002]


def test_detach_checks_the_proxy(session: Session) -> None:
    disk = AttachedDisk(proxy_moref="vm-1", key=2001, controller_key=1000, unit=1, file="[ds] db/db.vmdk")
    with pytest.raises(ValueError, match="attached to vm-1, not vm-2"):
        detach_disk(session, "vm-2", disk)
