"""Changed Block Tracking: the testbed's change journal, the launcher's QueryChangedDiskAreas, the CBT adapter.

The live tests run their own launcher (they turn VMs' change tracking off and on, and write disks) so the session's
shared simulator stays as other tests expect it. The simulator keeps at most one snapshot per VM in these tests
(removing nested snapshots deletes unrelated files), except in the one test that needs two, on a VM no other
test here uses. Its snapshots have no delta disks: the flat file is what a snapshot's disk reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import requests
import tenacity
from pyVmomi import vim, vmodl

from adapters.cbt import CbtUnavailable, cbt_enabled, changed_areas, merge_areas, reset_cbt, set_cbt
from adapters.discovery import discover
from adapters.errors import VSphereError
from adapters.properties import managed
from adapters.properties import vm as vm_ref
from adapters.retry import RetryPolicy
from adapters.session import Session, connect
from adapters.snapshots import Snapshot, create_snapshot, list_snapshots, remove_snapshot, snapshot_disks
from testbed import topology as topo
from testbed.images import image_layout, sha256_file, write_images
from testbed.launcher import Vcsim
from testbed.topology import DiskImage
from testbed.writes import journal, journal_path, rewrite

USERNAME = "administrator@vsphere.local"
SEED = "vsphere-proxy"
WINDOW = 8 << 20  # the launcher's default -cbt-window
MIB = 1 << 20
FAST = RetryPolicy(attempts=3, wait=tenacity.wait_none(), poll=0.01)
CHANGE_ID = re.compile(r"^(52(?: [0-9a-f]{2}){7}-[0-9a-f]{2}(?: [0-9a-f]{2}){7})/(\d+)$")

NO_SESSION = cast(Session, None)  # for the scripted tests, whose vCenter objects are stubbed

live = pytest.mark.integration


# --- the change journal and area merging, on local files -------------------------------------------------------


def _image(tmp_path: Path, capacity: int = 3 * MIB, vm: str = "vm-a", index: int = 0) -> DiskImage:
    path = tmp_path / vm / topo.flat_file_name(vm, index)
    disk = DiskImage(vm=vm, index=index, datastore="ds", path=path, capacity=capacity)
    write_images([disk], SEED)
    return disk


def test_journal_path_is_beside_the_flat_file() -> None:
    assert journal_path(Path("/ds/web-01/web-01-flat.vmdk")) == Path("/ds/web-01/web-01-ctk.log")
    assert journal_path(Path("/ds/db-01/db-01_2-flat.vmdk")) == Path("/ds/db-01/db-01_2-ctk.log")
    with pytest.raises(ValueError, match="not a flat disk file"):
        journal_path(Path("/ds/web-01/web-01.vmdk"))


def test_rewrite_writes_deterministic_bytes_and_journals_them(tmp_path: Path) -> None:
    disk = _image(tmp_path)
    before = disk.path.read_bytes()
    extents = [(MIB - 7, 100), (0, 1), (2 * MIB, 4096)]
    digest = rewrite(disk, extents, seed="s1")
    after = disk.path.read_bytes()
    assert digest == sha256_file(disk.path) != hashlib.sha256(before).hexdigest()
    assert len(after) == disk.capacity
    changed = _diff(before, after)
    assert set(changed) <= {i for off, n in extents for i in range(off, off + n)}
    assert journal_path(disk.path).read_text() == f"{MIB - 7} 100\n0 1\n{2 * MIB} 4096\n"
    assert journal(disk.path) == extents

    other = _image(tmp_path / "again")
    assert rewrite(other, extents, seed="s1") == digest  # same seed, vm, index and offsets: same bytes
    assert rewrite(other, extents[:1], seed="s2") != digest
    assert journal(other.path) == [*extents, extents[0]]


def test_rewrite_refuses_extents_outside_the_disk_and_journals_nothing(tmp_path: Path) -> None:
    disk = _image(tmp_path, capacity=MIB)
    digest = sha256_file(disk.path)
    for bad in [(-1, 10), (MIB - 1, 2), (5, 0)]:
        with pytest.raises(ValueError, match="not inside"):
            rewrite(disk, [(0, 10), bad])
    assert sha256_file(disk.path) == digest and not journal_path(disk.path).exists()
    assert journal(disk.path) == []


def test_merge_areas() -> None:
    assert merge_areas([]) == []
    assert merge_areas([(10, 5), (0, 4), (4, 2), (12, 10), (30, 0), (40, 1)]) == [(0, 6), (10, 12), (40, 1)]
    assert merge_areas([(90, 20), (-5, 10)], capacity=100) == [(0, 5), (90, 10)]


def _diff(a: bytes, b: bytes) -> list[int]:
    """Offsets where a and b differ, found a 64 KiB slice at a time."""
    out = []
    step = 1 << 16
    for base in range(0, len(a), step):
        if a[base:base + step] != b[base:base + step]:
            out += [base + i for i, (x, y) in enumerate(zip(a[base:base + step], b[base:base + step], strict=True))
                    if x != y]
    return out


# --- the adapter's query loop, on a scripted vCenter ---------------------------------------------------------


def _info(start: int, length: int, *areas: tuple[int, int]) -> SimpleNamespace:
    """A DiskChangeInfo as pyvmomi gives it."""
    return SimpleNamespace(startOffset=start, length=length,
                           changedArea=[SimpleNamespace(start=s, length=n) for s, n in areas])


class _ScriptedVm:
    def __init__(self, answers: list[Any]) -> None:
        self.answers = answers
        self.offsets: list[int] = []

    def QueryChangedDiskAreas(self, *, snapshot: Any, deviceKey: int, startOffset: int, changeId: str) -> Any:
        self.offsets.append(startOffset)
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _scripted(monkeypatch: pytest.MonkeyPatch, answers: list[Any]) -> _ScriptedVm:
    import adapters.cbt as cbt

    fake = _ScriptedVm(answers)
    monkeypatch.setattr(cbt, "vm_ref", lambda session, moref: fake)
    monkeypatch.setattr(cbt, "managed", lambda session, kind, moref: object())
    return fake


def test_changed_areas_walks_the_windows_and_retries_transient_faults(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _scripted(monkeypatch, [
        _info(0, 10, (2, 3), (8, 2)),
        vmodl.fault.SystemError(msg="busy"),
        _info(10, 10, (10, 1), (15, 5)),
        _info(20, 10, (20, 4)),
    ])
    areas = changed_areas(NO_SESSION, "vm-1", "snapshot-1", 2000, 25, "E/1", retry=FAST)
    assert areas == [(2, 3), (8, 3), (15, 9)]
    assert fake.offsets == [0, 10, 10, 20]


@pytest.mark.parametrize("answer, error, match", [
    (_info(0, 0), VSphereError, "does not advance"),
    (_info(5, 10), VSphereError, "does not advance"),
    (vmodl.fault.InvalidArgument(invalidProperty="changeId", msg="bad"), CbtUnavailable, "no longer valid"),
    (vim.fault.FileFault(file="x", msg="change tracking is off"), CbtUnavailable, "change tracking is off"),
    (vmodl.fault.InvalidArgument(invalidProperty="deviceKey", msg="no such disk"), VSphereError, "no such disk"),
])
def test_changed_areas_errors(monkeypatch: pytest.MonkeyPatch, answer: Any, error: type[Exception],
                              match: str) -> None:
    _scripted(monkeypatch, [answer])
    with pytest.raises(error, match=match) as raised:
        changed_areas(NO_SESSION, "vm-1", "snapshot-1", 2000, 25, "E/1", retry=FAST)
    if error is VSphereError:
        assert not isinstance(raised.value, CbtUnavailable)


def test_changed_areas_without_a_change_id_is_unavailable() -> None:
    with pytest.raises(CbtUnavailable, match="no changeId"):
        changed_areas(NO_SESSION, "vm-1", "snapshot-1", 2000, 25, "", retry=FAST)


# --- the live launcher --------------------------------------------------------------------------------------


@dataclass
class Bed:
    sim: Vcsim
    session: Session
    moref: dict[str, str]
    disks: dict[tuple[str, int], DiskImage]
    images: dict[tuple[str, int], str]


@pytest.fixture(scope="module")
def bed() -> Iterator[Bed]:
    """A launcher of this module's own on the default topology, with seeded images and a session."""
    password = secrets.token_urlsafe(24)
    topology = topo.load(topo.DEFAULT_TOPOLOGY)
    sim = Vcsim.start(topo.DEFAULT_TOPOLOGY, USERNAME, password)
    try:
        disks = topo.disks(topology, sim.datastores)
        images = write_images(disks, SEED)
        with connect(sim.url, USERNAME, password, insecure=True) as session:
            moref = {v.name: v.moref for v in discover(session).vms}
            yield Bed(sim, session, moref, {(d.vm, d.index): d for d in disks}, images)
    finally:
        sim.stop()


@contextlib.contextmanager
def _snapshot(bed: Bed, vm: str) -> Iterator[Snapshot]:
    snap = create_snapshot(bed.session, bed.moref[vm], "cbt-test", retry=FAST)
    try:
        yield snap
    finally:
        remove_snapshot(bed.session, snap, retry=FAST)
    assert list_snapshots(bed.session, bed.moref[vm]) == []


def _query(bed: Bed, vm: str, snap: Snapshot, index: int, change_id: str) -> list[tuple[int, int]]:
    disk = snap.disks[index]
    return changed_areas(bed.session, bed.moref[vm], snap.moref, disk.key, disk.capacity_bytes, change_id,
                         retry=FAST)


def _raw_query(bed: Bed, vm: str, snapshot: str, key: int, offset: int = 0, change_id: str = "*") -> Any:
    return vm_ref(bed.session, bed.moref[vm]).QueryChangedDiskAreas(
        snapshot=managed(bed.session, vim.vm.Snapshot, snapshot), deviceKey=key, startOffset=offset,
        changeId=change_id)


def _split(change_id: str) -> tuple[str, int]:
    m = CHANGE_ID.match(change_id)
    assert m, f"changeId {change_id!r} is not '<epoch>/<seq>'"
    return m.group(1), int(m.group(2))


def _allocated_from_layout(disk: DiskImage) -> list[tuple[int, int]]:
    """The image's non-zero regions, widened to the filesystem's blocks: what the file has allocated."""
    block = os.statvfs(disk.path).f_bsize
    areas = []
    for offset, length, kind in image_layout(disk, SEED):
        if kind != "zero":
            start = offset // block * block
            end = min(disk.capacity, -(-(offset + length) // block) * block)
            areas.append((start, end - start))
    return merge_areas(areas)


def _allocated_by_seek(path: Path) -> list[tuple[int, int]]:
    out = []
    with open(path, "rb") as f:
        fd, end, offset = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while offset < end:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:
                break
            offset = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, offset - start))
    return out


@live
def test_all_areas_of_a_first_snapshot_are_the_allocated_extents(bed: Bed) -> None:
    disk = bed.disks[("web-03", 0)]
    assert disk.capacity > WINDOW
    with _snapshot(bed, "web-03") as snap:
        epoch, seq = _split(snap.disks[0].change_id)
        assert seq == 0  # the initial image is not a tracked write
        before = bed.session.counter.calls["QueryChangedDiskAreas"]
        areas = _query(bed, "web-03", snap, 0, "*")
        assert bed.session.counter.calls["QueryChangedDiskAreas"] - before == math.ceil(disk.capacity / WINDOW)
    expected = _allocated_from_layout(disk)
    assert areas == expected == _allocated_by_seek(disk.path)
    assert 0 < sum(n for _, n in areas) < disk.capacity  # the image has holes
    with _snapshot(bed, "web-03") as again:
        assert again.disks[0].change_id == f"{epoch}/0"  # no write since: the same changeId


@live
def test_changes_since_a_change_id_are_exactly_the_rewritten_extents(bed: Bed) -> None:
    vm = "db-02"
    disk, other = bed.disks[(vm, 0)], bed.disks[(vm, 1)]
    capacity = disk.capacity
    assert capacity == 20 * MIB > 2 * WINDOW
    with _snapshot(bed, vm) as first:
        first_ids = [d.change_id for d in first.disks]
    epochs = [_split(c)[0] for c in first_ids]
    assert epochs[0] != epochs[1]

    original = disk.path.read_bytes()
    batches = [
        [(4 * MIB, 64 << 10),  # aligned on a 4 MiB boundary
         (8 * MIB - 1000, 5000),  # straddles a 4 MiB block and the query window
         (0, 1), (1, 4095)],  # adjacent: merge into one
        [(4 * MIB + (32 << 10), 64 << 10),  # overlaps the first
         (12 * MIB - 3, 4 * MIB + 7),  # straddles two 4 MiB boundaries (12 and 16 MiB)
         (capacity - 10, 10)],  # the disk's last bytes
    ]
    digest = ""
    for i, batch in enumerate(batches):
        digest = rewrite(disk, batch, seed=f"batch-{i}")
    assert digest == sha256_file(disk.path) != bed.images[(vm, 0)]
    assert journal(disk.path) == [e for batch in batches for e in batch]
    changed = _diff(original, disk.path.read_bytes())
    expected = [(0, 4096), (4 * MIB, 96 << 10), (8 * MIB - 1000, 5000), (12 * MIB - 3, 4 * MIB + 7),
                (capacity - 10, 10)]
    assert set(changed) <= {i for off, n in expected for i in range(off, off + n)}
    assert len(changed) > 0.99 * sum(n for _, n in expected)  # random bytes rarely equal the old ones

    with _snapshot(bed, vm) as second:
        ids = [d.change_id for d in second.disks]
        assert ids == [f"{epochs[0]}/7", first_ids[1]]  # seven writes on disk 0, none on disk 1
        before = bed.session.counter.calls["QueryChangedDiskAreas"]
        assert _query(bed, vm, second, 0, first_ids[0]) == expected
        assert bed.session.counter.calls["QueryChangedDiskAreas"] - before == 3  # 20 MiB in 8 MiB windows
        assert _query(bed, vm, second, 0, f"{epochs[0]}/4") == merge_areas(batches[1])
        assert _query(bed, vm, second, 0, ids[0]) == []  # nothing since this snapshot
        assert _query(bed, vm, second, 1, first_ids[1]) == []
        assert _query(bed, vm, second, 0, "*") == _allocated_by_seek(disk.path)
        assert other.path.stat().st_size == other.capacity

        # A changeId later than the snapshot's, or not of this disk's tracking, is refused.
        for bad in (f"{epochs[0]}/8", f"{epochs[1]}/0", "garbage", "/3"):
            with pytest.raises(CbtUnavailable, match="no longer valid"):
                _query(bed, vm, second, 0, bad)


@live
def test_reset_invalidates_earlier_change_ids(bed: Bed) -> None:
    vm = "web-01"
    disk = bed.disks[(vm, 0)]
    with _snapshot(bed, vm) as snap:
        old = snap.disks[0].change_id
    rewrite(disk, [(MIB, 100)], seed="before-reset")
    assert cbt_enabled(bed.session, bed.moref[vm]) is True

    reset_cbt(bed.session, bed.moref[vm], retry=FAST)
    assert cbt_enabled(bed.session, bed.moref[vm]) is True
    assert list_snapshots(bed.session, bed.moref[vm]) == []

    with _snapshot(bed, vm) as snap:
        new = snap.disks[0].change_id
        assert _split(new)[0] != _split(old)[0] and _split(new)[1] == len(journal(disk.path))
        with pytest.raises(CbtUnavailable, match=re.escape(f"changeId {old} is no longer valid")):
            _query(bed, vm, snap, 0, old)
        assert _query(bed, vm, snap, 0, new) == []
        assert _query(bed, vm, snap, 0, "*") == _allocated_by_seek(disk.path)


@live
def test_cbt_off_makes_changes_unavailable(bed: Bed) -> None:
    vm = "app-04"  # change tracking off in the topology
    ref = bed.moref[vm]
    assert cbt_enabled(bed.session, ref) is False
    with _snapshot(bed, vm) as snap:
        assert snap.disks[0].change_id == ""
        with pytest.raises(vim.fault.FileFault, match="change tracking is off"):
            _raw_query(bed, vm, snap.moref, snap.disks[0].key)
        with pytest.raises(CbtUnavailable, match="change tracking is off"):
            _query(bed, vm, snap, 0, "*")

    assert set_cbt(bed.session, ref, True, retry=FAST) is False
    before = bed.session.counter.calls["ReconfigVM_Task"]
    assert set_cbt(bed.session, ref, True, retry=FAST) is True  # already on: nothing to do
    assert bed.session.counter.calls["ReconfigVM_Task"] == before
    with _snapshot(bed, vm) as snap:
        change_id = snap.disks[0].change_id
        assert _split(change_id)[1] == 0
        assert _query(bed, vm, snap, 0, change_id) == []
        assert set_cbt(bed.session, ref, False, retry=FAST) is True
        with pytest.raises(CbtUnavailable, match="change tracking is off"):
            _query(bed, vm, snap, 0, change_id)
    assert cbt_enabled(bed.session, ref) is False

    # On again: a new tracking period, the changeId from before is refused.
    set_cbt(bed.session, ref, True, retry=FAST)
    with _snapshot(bed, vm) as snap:
        assert _split(snap.disks[0].change_id)[0] != _split(change_id)[0]
        with pytest.raises(CbtUnavailable, match="no longer valid"):
            _query(bed, vm, snap, 0, change_id)
    set_cbt(bed.session, ref, False, retry=FAST)


@live
def test_query_faults(bed: Bed) -> None:
    vm = "web-02"
    with _snapshot(bed, vm) as snap:
        disk = snap.disks[1]
        with pytest.raises(vmodl.fault.InvalidArgument) as raised:
            _raw_query(bed, vm, snap.moref, 9999)
        assert raised.value.invalidProperty == "deviceKey"
        with pytest.raises(VSphereError, match="no virtual disk with device key 9999") as wrapped:
            changed_areas(bed.session, bed.moref[vm], snap.moref, 9999, disk.capacity_bytes, "*", retry=FAST)
        assert not isinstance(wrapped.value, CbtUnavailable)

        for offset in (-1, disk.capacity_bytes):
            with pytest.raises(vmodl.fault.InvalidArgument) as raised:
                _raw_query(bed, vm, snap.moref, disk.key, offset)
            assert raised.value.invalidProperty == "startOffset"
        last = _raw_query(bed, vm, snap.moref, disk.key, disk.capacity_bytes - 1)
        assert (last.startOffset, last.length) == (disk.capacity_bytes - 1, 1)

        with pytest.raises(vmodl.fault.InvalidArgument) as raised:  # a snapshot of another VM
            _raw_query(bed, "web-01", snap.moref, disk.key)
        assert raised.value.invalidProperty == "snapshot"

        # Without a session, the simulator's own refusal.
        envelope = (
            '<?xml version="1.0" encoding="UTF-8"?><soapenv:Envelope xmlns:soapenv='
            '"http://schemas.xmlsoap.org/soap/envelope/"><soapenv:Body><QueryChangedDiskAreas xmlns="urn:vim25">'
            f'<_this type="VirtualMachine">{bed.moref[vm]}</_this><snapshot type="VirtualMachineSnapshot">'
            f'{snap.moref}</snapshot><deviceKey>{disk.key}</deviceKey><startOffset>0</startOffset>'
            '<changeId>*</changeId></QueryChangedDiskAreas></soapenv:Body></soapenv:Envelope>'
        )
        answer = requests.post(bed.sim.url, data=envelope, headers={"Content-Type": "text/xml"}, timeout=10)
        assert answer.status_code == 500 and "NotAuthenticatedFault" in answer.text
        assert "changedArea" not in answer.text
    with pytest.raises(vmodl.fault.ManagedObjectNotFound):  # the snapshot is gone
        _raw_query(bed, vm, snap.moref, disk.key)


@live
def test_a_snapshot_keeps_the_change_id_it_was_taken_with(bed: Bed) -> None:
    """Two snapshots at once: each keeps its own changeId (the simulator shares device lists between a VM and
    its snapshots; the launcher gives the VM a new list when it stamps changeIds)."""
    vm = "test-02"  # no other test here uses it: removing nested snapshots deletes unrelated files of the VM
    disk = bed.disks[(vm, 0)]
    first = create_snapshot(bed.session, bed.moref[vm], "cbt-first", retry=FAST)
    try:
        rewrite(disk, [(MIB, MIB)], seed="between")
        second = create_snapshot(bed.session, bed.moref[vm], "cbt-second", retry=FAST)
        try:
            (epoch, seq1), (_, seq2) = _split(first.disks[0].change_id), _split(second.disks[0].change_id)
            assert seq2 == seq1 + 1
            assert snapshot_disks(bed.session, first.moref)[0].change_id == first.disks[0].change_id
            assert _query(bed, vm, first, 0, f"{epoch}/{seq1}") == []
            assert _query(bed, vm, second, 0, first.disks[0].change_id) == [(MIB, MIB)]
            with pytest.raises(CbtUnavailable):  # the first snapshot predates that changeId
                _query(bed, vm, first, 0, second.disks[0].change_id)
        finally:
            remove_snapshot(bed.session, second, retry=FAST)
    finally:
        remove_snapshot(bed.session, first, retry=FAST)
