"""Injected faults for tests, through the job's `VCenterBackend` seam (nothing is patched): `FailingReads` is the
real backend, except that its snapshots' transports fail where a rule says, on the real transport (hot-add really
attaches, NBD really reads); `FailingWrites` the same for a restore's write transports (the VM is really created,
the disk really attached, the bytes before the failure really written). `backup_with` and `restore_with` run a
job on such a backend."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from vsphere_proxy.cli.common import open_catalog, open_repository, read_config, vcenter
from vsphere_proxy.coordinator import Assignment
from vsphere_proxy.engine.attempt import SavedVm, SnapshotDiskInfo, Snapshotter, VmSnapshot
from vsphere_proxy.jobs.backend import CreatedVm, Restorer, SnapshotPolicy, Swept, VCenterBackend
from vsphere_proxy.jobs.backup import BackupRun
from vsphere_proxy.jobs.restore import RestoreRun
from vsphere_proxy.jobs.restore_plan import RestoreOptions, RestorePlan
from vsphere_proxy.model import VM, Inventory, Proxy
from vsphere_proxy.repository import Manifest
from vsphere_proxy.transports import BLOCK, DiskSource, Transport, TransportError
from vsphere_proxy.transports.fake import Rule  # (vm, block offset) -> whether this read fails


class FailingTransport:
    """Delegates to the real transport; a read the rule picks raises, and is noted in `failed` (vm -> mode)."""

    def __init__(self, inner: Transport, vm: str, rule: Rule, failed: dict[str, str]) -> None:
        self.inner, self.vm, self.mode, self.rule, self.failed = inner, vm, inner.mode, rule, failed

    def open(self, disk: DiskSource) -> None:
        self.inner.open(disk)

    def read_block(self, offset: int, length: int) -> bytes:
        if self.rule(self.vm, offset):
            self.failed.setdefault(self.vm, self.mode)
            raise TransportError(f"{self.mode}: injected failure of {self.vm} at offset {offset}")
        return bytes(self.inner.read_block(offset, length))

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> FailingTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Snapshot:
    def __init__(self, inner: VmSnapshot, vm: str, owner: _Faulty) -> None:
        self.inner, self.vm, self.owner = inner, vm, owner
        self.name: str = inner.name
        self.disks: tuple[SnapshotDiskInfo, ...] = inner.disks

    def changed_areas(self, disk: SnapshotDiskInfo, since: str) -> list[tuple[int, int]]:
        return self.inner.changed_areas(disk, since)

    def saved(self) -> SavedVm:
        return self.inner.saved()

    def transport(self, mode: str) -> Transport:
        return FailingTransport(self.inner.transport(mode), self.vm, self.owner.rule, self.owner.failed)

    def release(self) -> None:
        self.inner.release()


class _Snapshotter:
    def __init__(self, inner: Snapshotter, owner: _Faulty) -> None:
        self.inner, self.owner = inner, owner

    def snapshot(self, assignment: Assignment) -> _Snapshot:
        return _Snapshot(self.inner.snapshot(assignment), assignment.vm, self.owner)


class FailingWriter:
    """Delegates to the real write transport; a write the rule picks raises, and is noted in `failed`."""

    def __init__(self, inner: Any, vm: str, rule: Rule, failed: dict[str, str]) -> None:
        self.inner, self.vm, self.mode, self.rule, self.failed = inner, vm, inner.mode, rule, failed

    def open(self, disk: DiskSource) -> None:
        self.inner.open(disk)

    def write_block(self, offset: int, data: bytes) -> None:
        if self.rule(self.vm, offset):
            self.failed.setdefault(self.vm, self.mode)
            raise TransportError(f"{self.mode}: injected write failure of {self.vm} at offset {offset}")
        self.inner.write_block(offset, data)

    def close(self, complete: bool = True) -> None:
        self.inner.close(complete)

    def __enter__(self) -> FailingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(False)


class _Restorer:
    def __init__(self, inner: Restorer, owner: _Faulty) -> None:
        self.inner, self.owner = inner, owner

    def check(self, plans: Sequence[RestorePlan]) -> None:
        self.inner.check(plans)

    def config_spec(self, plan: RestorePlan) -> dict[str, Any]:
        return self.inner.config_spec(plan)

    def create(self, plan: RestorePlan) -> CreatedVm:
        created = self.inner.create(plan)
        self.owner.created.append(created)
        return created

    def writer(self, created: CreatedVm, mode: str, proxy: str) -> FailingWriter:
        return FailingWriter(self.inner.writer(created, mode, proxy), created.name, self.owner.rule,
                             self.owner.failed)

    def complete(self, created: CreatedVm, plan: RestorePlan, nvram: bytes | None = None) -> tuple[str, ...]:
        return self.inner.complete(created, plan, nvram)

    def remove(self, created: CreatedVm) -> tuple[str, ...]:
        return self.inner.remove(created)


class _Faulty:
    """A `VCenterBackend`: `inner` in everything, except what `rule` makes fail."""

    def __init__(self, inner: VCenterBackend, rule: Rule) -> None:
        self.inner = inner
        self.rule = rule
        self.failed: dict[str, str] = {}  # vm -> access mode of its first failure, filled as it happens
        self.created: list[CreatedVm] = []  # every VM a restore created

    @property
    def datacenter(self) -> str:
        return self.inner.datacenter

    def discover(self) -> Inventory:
        return self.inner.discover()

    def keep_alive(self) -> AbstractContextManager[object]:
        return self.inner.keep_alive()

    def sweep(self, vms: Sequence[str], proxies: Sequence[str], *, spare: Callable[[str], bool] | None = None,
              job_id: str | None = None) -> Swept:
        return self.inner.sweep(vms, proxies, spare=spare, job_id=job_id)

    def snapshotter(self, vms: Mapping[str, VM], proxies: Sequence[Proxy], job_id: str, *,
                    policy: SnapshotPolicy) -> Snapshotter:
        return self.inner.snapshotter(vms, proxies, job_id, policy=policy)

    def restorer(self, inventory: Inventory, proxies: Sequence[Proxy], job_id: str) -> Restorer:
        return self.inner.restorer(inventory, proxies, job_id)


class FailingReads(_Faulty):
    """The reads `rule` picks (vm, block offset) fail."""

    def snapshotter(self, vms: Mapping[str, VM], proxies: Sequence[Proxy], job_id: str, *,
                    policy: SnapshotPolicy) -> _Snapshotter:
        return _Snapshotter(self.inner.snapshotter(vms, proxies, job_id, policy=policy), self)


class FailingWrites(_Faulty):
    """The restore writes `rule` picks (new VM name, block offset) fail."""

    def restorer(self, inventory: Inventory, proxies: Sequence[Proxy], job_id: str) -> _Restorer:
        return _Restorer(self.inner.restorer(inventory, proxies, job_id), self)


def each_vm_once(backend: VCenterBackend) -> FailingReads:
    """Every VM's first attempt fails at its disk's second block: each VM is stranded once, recovered later."""
    failing = FailingReads(backend, lambda vm, offset: offset == BLOCK and vm not in failing.failed)
    return failing


def every_read_of(vm: str) -> Callable[[VCenterBackend], FailingReads]:
    """Every read of `vm` fails, in every round."""
    return lambda backend: FailingReads(backend, lambda name, _: name == vm)


def backup_with(config_path: Path, wrap: Callable[[VCenterBackend], FailingReads]) -> tuple[int, dict[str, Any],
                                                                                            FailingReads]:
    """Run the configuration's backup job (embedded engine) on the wrapped real backend: the exit code the
    `backup` command gives, the report as `backup --json` prints it, and the faulty backend."""
    config = read_config(str(config_path))
    repo = open_repository(config, create=True)
    with vcenter(config) as found:
        backend = wrap(found.backend)
        catalog = open_catalog(config)
        try:
            report = BackupRun(config, backend, repo, catalog, inventory=found.inventory).run()
        finally:
            catalog.close()
    return report.exit_code, report.to_json(), backend


def restore_with(config_path: Path, points: Sequence[Manifest], options: RestoreOptions,
                 wrap: Callable[[VCenterBackend], _Faulty]) -> tuple[int, dict[str, Any], _Faulty]:
    """Run a restore job of `points` (embedded engine) on the wrapped real backend: the exit code `restore vm`
    gives, the report as `restore vm --json` prints it, and the faulty backend."""
    config = read_config(str(config_path))
    repo = open_repository(config)
    with vcenter(config) as found:
        backend = wrap(found.backend)
        catalog = open_catalog(config)
        try:
            report = RestoreRun.vms(config, backend, repo, catalog, points, options, inventory=found.inventory).run()
        finally:
            catalog.close()
    return report.exit_code, report.to_json(), backend
