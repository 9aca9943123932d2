"""One VM attempt into the repository, whatever vCenter is behind it (DESIGN §5).

`RepositoryPreparer.prepare(assignment)` snapshots the VM (through a `Snapshotter`, the vCenter side), starts a
restore point and returns a `RepositorySession`, the engine's `VmSession`: one `DiskSource` and one sink per
disk, a fresh transport per stream for the assigned mode, and a `finish` that commits (or drops) the point and
always releases the snapshot. The point saves what recreating the VM needs (`VmSnapshot.saved`: its configuration
and NVRAM file, read at the snapshot), so it is a version-2 restore point (docs/repository.md).

Incremental: with an earlier restore point of the same VM whose disk recorded a CBT changeId, and a changeId on
the new snapshot's disk, only the blocks inside the areas changed since then are read; every other block keeps
the earlier point's chunk. When that is not possible (no earlier point, change tracking off, a changeId that is
no longer valid) every block is read — the repository still stores only new chunks — and the reason is kept.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Protocol

from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.engine.session import Finished
from vsphere_proxy.faults import VmFault
from vsphere_proxy.model import VM
from vsphere_proxy.repository import (
    BaseDamaged,
    DiskWriter,
    Manifest,
    PointWriter,
    Repository,
    VmConfig,
    VmIdentity,
)
from vsphere_proxy.transports import BLOCK, DiskSource, Transport

FULL = "full"
INCREMENTAL = "incremental (CBT)"


class ChangesUnavailable(Exception):
    """Changed areas cannot be had for a disk; the message says why in one line."""


@dataclass(frozen=True, slots=True)
class SnapshotDiskInfo:
    """One disk of a snapshot, as a backup reads it."""

    index: int
    key: int  # device key
    label: str
    capacity: int
    file: str  # "[datastore] vm/vm.vmdk"
    datastore: str
    change_id: str = ""  # the CBT changeId at the snapshot, "" when change tracking is off


@dataclass(frozen=True)
class SavedVm:
    """What a restore point saves to recreate the VM: its configuration and its NVRAM file (None when none was
    read; `config.notes` says why)."""

    config: VmConfig
    nvram: bytes | None = None


class VmSnapshot(Protocol):
    """A snapshot taken for one attempt: its disks, their changes, what recreating the VM needs, a transport per
    stream, and its release."""

    name: str
    disks: tuple[SnapshotDiskInfo, ...]

    def saved(self) -> SavedVm:
        """What recreating the VM needs, read at the snapshot; never raises: what could not be read is in
        config.notes."""

    def changed_areas(self, disk: SnapshotDiskInfo, since: str) -> list[tuple[int, int]]:
        """(offset, length) areas of `disk` changed since changeId `since`; raises ChangesUnavailable."""

    def transport(self, mode: str) -> Transport: ...

    def release(self) -> None:
        """Remove the snapshot. Idempotent."""


class Snapshotter(Protocol):
    def snapshot(self, assignment: Assignment) -> VmSnapshot: ...


def config_summary(vm: VM) -> dict[str, Any]:
    """What a restore point records of the VM's configuration (enough to recreate it by hand)."""
    return {
        "cpus": vm.cpus, "memory_mb": vm.memory_mb, "power_state": vm.power_state, "host": vm.host,
        "cluster": vm.cluster, "folder": vm.folder, "cbt": vm.cbt, "tags": [str(t) for t in vm.tags],
        "disks": [{"key": d.key, "label": d.label, "file": d.file, "datastore": d.datastore,
                   "capacity_bytes": d.capacity_bytes, "controller": d.controller, "unit": d.unit,
                   "backing": d.backing} for d in vm.disks],
    }


def changed_blocks(areas: Iterable[tuple[int, int]], capacity: int, block: int = BLOCK) -> list[int]:
    """The offsets of the blocks that any (offset, length) area touches, ascending, inside the capacity."""
    touched: set[int] = set()
    for offset, length in areas:
        if length <= 0:
            continue
        first, last = max(offset, 0) // block, (min(offset + length, capacity) - 1) // block
        touched.update(range(first, last + 1))
    return [b * block for b in sorted(touched) if b * block < capacity]


class RepositorySink:
    """One disk's writer, and which of its blocks must be read."""

    def __init__(self, writer: DiskWriter, offsets: Sequence[int] | None) -> None:
        self.writer = writer
        self._offsets = offsets

    def offsets(self) -> Sequence[int] | None:
        return self._offsets

    def write(self, offset: int, data: bytes) -> None:
        self.writer.write(offset, data)

    def close(self, ok: bool) -> None:
        """Nothing to do: the restore point is committed (or dropped) when the attempt finishes."""


def _keep_unread(writer: DiskWriter, read: Sequence[int], capacity: int, *, holes: bool = False) -> None:
    """Keep the base point's entry for every block not in `read` (with `holes`: record it as a hole, an area
    never allocated), in runs."""
    wanted = {o // BLOCK for o in read}
    blocks = -(-capacity // BLOCK)
    run_start = None
    for b in range(blocks + 1):
        unread = b < blocks and b not in wanted
        if unread and run_start is None:
            run_start = b
        elif not unread and run_start is not None:
            (writer.holes if holes else writer.keep)(run_start, b - run_start)
            run_start = None


class RepositorySession:
    """One prepared attempt: the snapshot is taken and the restore point open."""

    def __init__(self, assignment: Assignment, snapshot: VmSnapshot, point: PointWriter, base: Manifest | None,
                 keys: Sequence[int], incremental: bool = True, require_incremental: bool = False) -> None:
        """`keys`: the device key of each disk the job backs up, by the index the scheduler uses."""
        self.assignment = assignment
        self.snapshot = snapshot
        self.point = point
        self.base = base
        self.incremental = incremental
        self.require_incremental = require_incremental  # a disk that would be read in full fails the VM instead
        by_key = {d.key: d for d in snapshot.disks}
        self._disks = {i: replace(by_key[k], index=i) for i, k in enumerate(keys) if k in by_key}
        self._writers: dict[int, DiskWriter] = {}
        self._reads: dict[int, str] = {}
        self._lock = threading.Lock()
        self._result: Finished | None = None

    def _disk(self, index: int) -> SnapshotDiskInfo:
        try:
            return self._disks[index]
        except KeyError:
            raise ValueError(f"{self.assignment.vm}: disk {index} is not in the snapshot (reconfigured since "
                           "discovery?)") from None

    def source(self, disk: int) -> DiskSource:
        d = self._disk(disk)
        return DiskSource(self.assignment.vm, d.index, d.file, d.datastore, d.capacity)

    def transport(self) -> Transport:
        return self.snapshot.transport(self.assignment.mode)

    def sink(self, disk: int) -> RepositorySink:
        d = self._disk(disk)
        base_disk = next((b for b in self.base.disks if b.index == d.index), None) if self.base else None
        offsets, how = None, FULL
        if not self.incremental:
            how = f"{FULL}: incremental reads are off"
        elif base_disk is None:
            how = FULL if self.base is None else f"{FULL}: disk {d.index} is new since the last restore point"
        elif base_disk.capacity != d.capacity:
            how = f"{FULL}: disk {d.index} was resized ({base_disk.capacity} -> {d.capacity} bytes)"
        elif not d.change_id:
            how = f"{FULL}: change tracking is off"
        elif not base_disk.change_id:
            how = f"{FULL}: the last restore point has no changeId for disk {d.index}"
        else:
            try:
                offsets = changed_blocks(self.snapshot.changed_areas(d, base_disk.change_id), d.capacity)
                how = INCREMENTAL
            except ChangesUnavailable as e:
                how = f"{FULL}: {e}"
        if offsets is None and base_disk is not None and self.require_incremental and self.incremental \
                and base_disk.capacity == d.capacity:
            raise VmFault(f"disk {d.index} would be read in full ({how.removeprefix(FULL + ': ')}) and "
                          "policy.require_incremental is set")
        allocated = None
        if offsets is None and d.change_id:  # a full read: only what the disk allocated ("*"), where CBT tells
            try:
                allocated = changed_blocks(self.snapshot.changed_areas(d, "*"), d.capacity)
            except ChangesUnavailable:
                allocated = None
            if allocated is not None and len(allocated) >= -(-d.capacity // BLOCK):
                allocated = None  # every block allocated: a plain full read
            if allocated is not None:
                how = f"{FULL}: allocated areas only" if how == FULL else f"{how}; allocated areas only"
        with self._lock:
            writer = self._writers.get(d.index)
            if writer is None:
                try:
                    writer = self.point.disk(d.index, d.label, d.capacity,
                                             base=self.base if offsets is not None else None,
                                             change_id=d.change_id or None)
                except BaseDamaged as e:  # its unchanged blocks would keep lost chunks: read it all, and heal them
                    offsets, how = None, f"{FULL}: {e}"
                    writer = self.point.disk(d.index, d.label, d.capacity, base=None, change_id=d.change_id or None)
                if offsets is not None:
                    _keep_unread(writer, offsets, d.capacity)
                elif allocated is not None:
                    _keep_unread(writer, allocated, d.capacity, holes=True)
                self._writers[d.index] = writer
            self._reads[d.index] = how
        return RepositorySink(writer, offsets if offsets is not None else allocated)

    def read(self) -> str:
        """How the disks were read, in a few words: "incremental (CBT)", "full", or "full: why" per disk."""
        with self._lock:
            hows = dict(sorted(self._reads.items()))
        kinds = set(hows.values())
        if len(kinds) <= 1:
            return next(iter(kinds), FULL)
        return "; ".join(f"disk {i}: {h}" for i, h in hows.items())

    def stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        with self._lock:
            writers = list(self._writers.values())
        for w in writers:
            for key, n in w.stats.model_dump().items():
                total[key] = total.get(key, 0) + n
        return total

    def finish(self, ok: bool) -> Finished:
        with self._lock:
            if self._result is not None:
                return self._result
        notes: list[str] = []
        left: list[str] = []
        point_id, written = None, 0
        try:
            if ok:
                manifest = self.point.commit()
                point_id = manifest.id
                written = sum(d.stats.new_bytes_stored for d in manifest.disks)
            else:
                self.point.abort()
        finally:
            try:
                self.snapshot.release()
            except Exception as e:  # the point stands; the next job's sweep removes the snapshot
                notes.append(f"snapshot {self.snapshot.name} not removed: {e}")
                left.append(f"snapshot {self.snapshot.name} of {self.assignment.vm}: {e}")
            notes[:0] = getattr(self.snapshot, "notes", ())  # how it was made, and what its removal left to do
        result = Finished(point_id, written, tuple(notes), self.stats(), self.read(), tuple(left))
        with self._lock:
            self._result = result
        return result


class RepositoryPreparer:
    """Prepares attempts of one job: snapshot, then a restore point based on the VM's latest one."""

    def __init__(self, snapshotter: Snapshotter, repository: Repository, job_id: str, vms: Mapping[str, VM], *,
                 incremental: bool = True, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 before: Callable[[Assignment, VM], None] | None = None,
                 refused: Mapping[str, str] | None = None, require_incremental: bool = False) -> None:
        """`before`: called before each VM is snapshotted (the job's `before_vm` hooks); what it raises fails the
        attempt (a `VmFault` fails the VM for the job, a `JobFault` ends the job). `refused`: VM -> why the job's
        policy does not back it up (an independent disk under `independent_disks: fail`): it fails at once."""
        self.snapshotter = snapshotter
        self.before = before
        self.refused = dict(refused or {})
        self.require_incremental = require_incremental
        self.repository = repository
        self.job_id = job_id
        self.vms = dict(vms)
        self.incremental = incremental
        self.clock = clock
        self._latest: dict[str, Manifest] = {}  # each VM's latest restore point, read once per job
        for manifest in repository.points():
            if manifest.vm.name in self.vms:
                self._latest[manifest.vm.name] = manifest  # oldest first: the last one wins

    def prepare(self, assignment: Assignment) -> RepositorySession:
        vm = self.vms[assignment.vm]
        identity = VmIdentity.of(vm)
        base = self._latest.get(vm.name)
        if base is not None and not base.vm.same_vm(identity):
            base = None  # a different VM under the same name: nothing to build on
        if vm.name in self.refused:
            raise VmFault(self.refused[vm.name])
        if self.before is not None:
            self.before(assignment, vm)
        snapshot = self.snapshotter.snapshot(assignment)
        try:
            saved = snapshot.saved()
            point = self.repository.begin(self.job_id, identity, config_summary(vm), self.clock(),
                                          vm_config=saved.config, nvram=saved.nvram)
        except BaseException:
            snapshot.release()
            raise
        keys = [d.key for d in vm.backup_disks]  # indexed as WorkVM.from_vm indexes them
        return RepositorySession(assignment, snapshot, point, base, keys, self.incremental, self.require_incremental)
