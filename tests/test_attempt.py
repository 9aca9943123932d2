"""A VM attempt into the repository without vCenter: incremental reads from changed areas, the reasons for a full
read, restore points that restore bit for bit and save what recreating the VM needs, and a snapshot released
whatever happens."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.engine.attempt import (
    FULL,
    INCREMENTAL,
    ChangesUnavailable,
    RepositoryPreparer,
    RepositorySession,
    SavedVm,
    SnapshotDiskInfo,
    changed_blocks,
)
from vsphere_proxy.faults import VmFault
from vsphere_proxy.model import VM, Disk
from vsphere_proxy.repository import NvramRecord, Repository, VmConfig
from vsphere_proxy.tiers import Tier
from vsphere_proxy.transports import BLOCK, read_blocks
from vsphere_proxy.transports.file import FileTransport


def test_changed_blocks_are_every_block_an_area_touches() -> None:
    assert changed_blocks([], 10 * BLOCK) == []
    assert changed_blocks([(0, 1)], 10 * BLOCK) == [0]
    assert changed_blocks([(BLOCK - 1, 2)], 10 * BLOCK) == [0, BLOCK]
    assert changed_blocks([(2 * BLOCK, BLOCK)], 10 * BLOCK) == [2 * BLOCK]
    assert changed_blocks([(5 * BLOCK, 0), (3 * BLOCK, BLOCK + 1), (3 * BLOCK, 5)], 10 * BLOCK) == [
        3 * BLOCK, 4 * BLOCK]
    assert changed_blocks([(BLOCK, 100 * BLOCK)], 3 * BLOCK + 7) == [BLOCK, 2 * BLOCK, 3 * BLOCK]


class LocalSnapshot:
    """A snapshot of flat files on local disk, with changed areas given by the test (no vCenter here)."""

    def __init__(self, root: Path, disks: tuple[SnapshotDiskInfo, ...], areas: Any,
                 saved: SavedVm | Exception | None = None) -> None:
        self.name = "local"
        self.root, self.disks, self.areas = root, disks, areas
        self._saved = saved or SavedVm(VmConfig(config_info={"_vimtype": "vim.vm.ConfigInfo"}, cpus=2))
        self.released = 0
        self.asked: list[tuple[int, str]] = []

    def saved(self) -> SavedVm:
        if isinstance(self._saved, Exception):
            raise self._saved
        return self._saved

    def changed_areas(self, disk: SnapshotDiskInfo, since: str) -> list[tuple[int, int]]:
        if since == "*":  # the allocated areas: these flat files allocate every block
            return [(0, disk.capacity)]
        self.asked.append((disk.index, since))
        if isinstance(self.areas, Exception):
            raise self.areas
        return list(self.areas)

    def transport(self, mode: str) -> FileTransport:
        return FileTransport("san", {"ds": self.root})

    def release(self) -> None:
        self.released += 1


class LocalSnapshotter:
    def __init__(self, root: Path, sizes: list[int], change_ids: list[str], areas: Any = (),
                 saved: SavedVm | Exception | None = None) -> None:
        self.root, self.sizes, self.change_ids, self.areas = root, sizes, change_ids, areas
        self.saved = saved
        self.made: list[LocalSnapshot] = []

    def snapshot(self, a: Assignment) -> LocalSnapshot:
        disks = tuple(SnapshotDiskInfo(i, 2000 + i, f"Hard disk {i + 1}", size, f"[ds] vm/vm_{i}.vmdk", "ds", cid)
                      for i, (size, cid) in enumerate(zip(self.sizes, self.change_ids, strict=True)))
        snap = LocalSnapshot(self.root, disks, self.areas, self.saved)
        self.made.append(snap)
        return snap


def _vm(sizes: list[int]) -> VM:
    return VM("vm-1", "vm", uuid="u", instance_uuid="iu", cpus=2, memory_mb=1024, cbt=True,
              disks=tuple(Disk(2000 + i, f"Hard disk {i + 1}", f"[ds] vm/vm_{i}.vmdk", "ds", s, "pvscsi", f"scsi0:{i}")
                          for i, s in enumerate(sizes)))


def _write(root: Path, sizes: list[int]) -> list[bytes]:
    data = []
    for i, size in enumerate(sizes):
        path = root / "vm" / f"vm_{i}-flat.vmdk"
        path.parent.mkdir(parents=True, exist_ok=True)
        content = os.urandom(size)
        path.write_bytes(content)
        data.append(content)
    return data


def _run(session: RepositorySession, disks: int) -> Any:
    for i in range(disks):
        sink, source = session.sink(i), session.source(i)
        with session.transport() as t:
            t.open(source)
            for offset, block in read_blocks(t, source.capacity, offsets=sink.offsets()):
                sink.write(offset, block)
    return session.finish(True)


def _assignment() -> Assignment:
    return Assignment("job", "vm", "p1", "san", Tier.SAN, 1, 1, "s1", 0, 1, True, False, None, None, "test")


def test_a_second_point_reads_only_the_changed_blocks_and_restores_bit_for_bit(tmp_path: Path) -> None:
    sizes = [3 * BLOCK + 11, BLOCK]
    _write(tmp_path, sizes)
    repo = Repository.init(tmp_path / "repo")
    vm = _vm(sizes)
    first = RepositoryPreparer(LocalSnapshotter(tmp_path, sizes, ["e/0", "f/0"]), repo, "j1", {"vm": vm})
    done = _run(first.prepare(_assignment()), 2)
    assert done.read == FULL and done.point_id

    path = tmp_path / "vm" / "vm_0-flat.vmdk"
    content = bytearray(path.read_bytes())
    content[BLOCK + 5] ^= 0xFF  # block 1 changes
    path.write_bytes(bytes(content))
    snapshotter = LocalSnapshotter(tmp_path, sizes, ["e/1", "f/0"], areas=[(BLOCK + 5, 1)])
    second = RepositoryPreparer(snapshotter, repo, "j2", {"vm": vm}).prepare(_assignment())
    result = _run(second, 2)
    assert result.read == INCREMENTAL and snapshotter.made[0].asked == [(0, "e/0"), (1, "f/0")]
    assert result.stats["bytes_in"] == BLOCK and result.stats["kept_blocks"] == 3 + 1
    assert repo.restore(result.point_id, 0, tmp_path / "r0").sha256 == hashlib.sha256(content).hexdigest()
    assert snapshotter.made[0].released == 1


@pytest.mark.parametrize(("change_ids", "areas", "why"), [
    (["", ""], (), "full: change tracking is off"),
    (["e/1", "f/1"], ChangesUnavailable("changeId e/0 is no longer valid"), "full: changeId e/0 is no longer valid"),
])
def test_a_full_read_says_why(tmp_path: Path, change_ids: list[str], areas: Any, why: str) -> None:
    sizes = [BLOCK, 2 * BLOCK]
    _write(tmp_path, sizes)
    repo = Repository.init(tmp_path / "repo")
    vm = _vm(sizes)
    _run(RepositoryPreparer(LocalSnapshotter(tmp_path, sizes, ["e/0", "f/0"]), repo, "j1", {"vm": vm})
         .prepare(_assignment()), 2)
    result = _run(RepositoryPreparer(LocalSnapshotter(tmp_path, sizes, change_ids, areas), repo, "j2", {"vm": vm})
                  .prepare(_assignment()), 2)
    assert result.read == why
    assert result.stats["bytes_in"] == 3 * BLOCK and result.bytes_written == 0  # all read, nothing new stored


@pytest.mark.parametrize(("change_ids", "areas", "why"), [
    (["", ""], (), "change tracking is off"),
    (["e/1", "f/1"], ChangesUnavailable("changeId e/0 is no longer valid"), "changeId e/0 is no longer valid"),
])
def test_require_incremental_fails_the_vm_for_good_instead_of_a_full_read(tmp_path: Path, change_ids: list[str],
                                                                         areas: Any, why: str) -> None:
    sizes = [BLOCK, 2 * BLOCK]
    _write(tmp_path, sizes)
    repo = Repository.init(tmp_path / "repo")
    vm = _vm(sizes)
    _run(RepositoryPreparer(LocalSnapshotter(tmp_path, sizes, ["e/0", "f/0"]), repo, "j1", {"vm": vm},
                            require_incremental=True).prepare(_assignment()), 2)  # a first full is allowed
    session = RepositoryPreparer(LocalSnapshotter(tmp_path, sizes, change_ids, areas), repo, "j2", {"vm": vm},
                                 require_incremental=True).prepare(_assignment())
    with pytest.raises(VmFault, match=f"disk 0 would be read in full \\({why}\\) and policy.require_incremental "
                                      "is set"):
        session.sink(0)
    session.finish(False)
    assert len(repo.points()) == 1


def test_a_failed_attempt_drops_the_point_and_releases_the_snapshot_once(tmp_path: Path) -> None:
    sizes = [BLOCK]
    _write(tmp_path, sizes)
    repo = Repository.init(tmp_path / "repo")
    snapshotter = LocalSnapshotter(tmp_path, sizes, ["e/0"])
    session = RepositoryPreparer(snapshotter, repo, "j1", {"vm": _vm(sizes)}).prepare(_assignment())
    session.sink(0)
    assert session.finish(False).point_id is None
    assert session.finish(True).point_id is None  # idempotent: the first outcome stands
    assert snapshotter.made[0].released == 1 and repo.points() == []


def test_an_incremental_over_a_quarantined_chunk_reads_the_disk_in_full_and_heals_it(tmp_path: Path) -> None:
    sizes = [3 * BLOCK]
    data = _write(tmp_path, sizes)
    repo = Repository.init(tmp_path / "repo")
    vm = _vm(sizes)
    first = _run(RepositoryPreparer(LocalSnapshotter(tmp_path, sizes, ["e/0"]), repo, "j1", {"vm": vm})
                 .prepare(_assignment()), 1)
    chunk = repo.manifest(first.point_id).disks[0].blocks[1]
    assert chunk is not None
    stored = repo.chunks.path(chunk)
    stored.write_bytes(stored.read_bytes()[:-1] + bytes([stored.read_bytes()[-1] ^ 0xFF]))  # one byte flipped
    assert not repo.verify().ok  # found, and quarantined
    snapshotter = LocalSnapshotter(tmp_path, sizes, ["e/1"], areas=[])  # CBT: nothing changed
    second = _run(RepositoryPreparer(snapshotter, repo, "j2", {"vm": vm}).prepare(_assignment()), 1)
    assert second.read.startswith(FULL) and second.stats["new_chunks"] == 1, second
    report = repo.verify()
    assert report.ok, report
    assert repo.restore(first.point_id, 0, tmp_path / "r1").sha256 == hashlib.sha256(data[0]).hexdigest()
    assert repo.restore(second.point_id, 0, tmp_path / "r2").sha256 == hashlib.sha256(data[0]).hexdigest()


def test_the_point_saves_what_the_snapshot_read_to_recreate_the_vm(tmp_path: Path) -> None:
    sizes = [BLOCK]
    _write(tmp_path, sizes)
    repo = Repository.init(tmp_path / "repo")
    config = VmConfig(config_info={"_vimtype": "vim.vm.ConfigInfo", "name": "vm"}, cpus=2, memory_mb=1024,
                      nvram=NvramRecord(chunk=hashlib.sha256(b"efi vars").hexdigest(), size=8,
                                        file="[ds] vm/vm.nvram"))
    snapshotter = LocalSnapshotter(tmp_path, sizes, [""], saved=SavedVm(config, b"efi vars"))
    result = _run(RepositoryPreparer(snapshotter, repo, "j1", {"vm": _vm(sizes)}).prepare(_assignment()), 1)
    point = repo.manifest(result.point_id)
    assert point.version == 2 and point.vm_config == config and repo.nvram(point.id) == b"efi vars"
    assert point.config["cpus"] == 2  # the summary stays

    unread = SavedVm(VmConfig(config_info={}, notes=("nvram not saved: [ds] vm/vm.nvram: HTTP 404",)))
    result = _run(RepositoryPreparer(LocalSnapshotter(tmp_path, sizes, [""], saved=unread), repo, "j2",
                                     {"vm": _vm(sizes)}).prepare(_assignment()), 1)
    point = repo.manifest(result.point_id)
    assert point.vm_config == unread.config and point.nvram is None and repo.nvram(point.id) is None


def test_a_snapshot_that_cannot_say_what_it_saved_is_released(tmp_path: Path) -> None:
    repo = Repository.init(tmp_path / "repo")
    snapshotter = LocalSnapshotter(tmp_path, [BLOCK], [""], saved=RuntimeError("bug"))
    with pytest.raises(RuntimeError, match="bug"):
        RepositoryPreparer(snapshotter, repo, "j1", {"vm": _vm([BLOCK])}).prepare(_assignment())
    assert snapshotter.made[0].released == 1 and repo.points() == []
    repo.lock("exclusive", "check").release()
