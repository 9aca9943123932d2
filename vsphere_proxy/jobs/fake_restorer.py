"""`FakeRestorer`: the `Restorer` of the in-memory `FakeBackend`, for tests. It creates no VM anywhere.

A created VM is a record in `backend.restored` (name -> `CreatedVm`) with its disks as zeroed byte arrays in
`backend.written` ("[ds] name/name.vmdk" -> bytearray), filled by `FakeWriter`s whatever the write mode;
`complete` records the NVRAM it is given (`backend.nvram_put`) and the final name; `remove` deletes the record
and the disks. Faults: `backend.write_fails(vm, offset)` makes writes raise; `backend.create_fails` names VMs whose
creation raises `FakeVCenterError`; `backend.remove_fails` names VMs that cannot be removed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vsphere_proxy.jobs.backend import CreatedVm
from vsphere_proxy.jobs.restore_plan import DiskRestorePlan, RestorePlan
from vsphere_proxy.transports import DiskSource
from vsphere_proxy.transports.fake import FakeWriter

if TYPE_CHECKING:
    from vsphere_proxy.jobs.fake_backend import FakeBackend


class FakeRestorer:
    def __init__(self, backend: FakeBackend, job_id: str) -> None:
        self.backend = backend
        self.job_id = job_id

    def check(self, plans: Sequence[RestorePlan]) -> None:
        pass

    def config_spec(self, plan: RestorePlan) -> dict[str, Any]:
        disks = [plan.disk] if isinstance(plan, DiskRestorePlan) else list(plan.disks)
        return {"name": plan.create_as, "disks": [{"index": d.index, "datastore": d.datastore} for d in disks]}

    def create(self, plan: RestorePlan) -> CreatedVm:
        from vsphere_proxy.jobs.fake_backend import FakeVCenterError

        b = self.backend
        if plan.create_as in b.create_fails:
            raise FakeVCenterError(f"creating VM {plan.create_as}: injected failure")
        disks = [plan.disk] if isinstance(plan, DiskRestorePlan) else list(plan.disks)
        with b.lock:
            b.seq += 1
            moref = f"vm-{5000 + b.seq}"
            sources = {}
            for d in disks:
                file = f"[{d.datastore}] {plan.create_as}/{plan.create_as}_{d.index}.vmdk"
                b.written[file] = bytearray(d.capacity)
                sources[d.index] = DiskSource(plan.create_as, d.index, file, d.datastore, d.capacity)
            created = CreatedVm(moref, plan.create_as, sources)
            b.restored[plan.create_as] = created
        return created

    def writer(self, created: CreatedVm, mode: str, proxy: str) -> FakeWriter:
        return FakeWriter(mode, self.backend.written, fail=self.backend.write_fails)

    def complete(self, created: CreatedVm, plan: RestorePlan, nvram: bytes | None = None) -> tuple[str, ...]:
        with self.backend.lock:
            if nvram is not None:
                self.backend.nvram_put[created.name] = nvram
            self.backend.renamed[created.name] = plan.name
        return ()

    def remove(self, created: CreatedVm) -> tuple[str, ...]:
        b = self.backend
        if created.name in b.remove_fails:
            return (f"VM {created.name} ({created.moref}): injected removal failure",)
        with b.lock:
            b.restored.pop(created.name, None)
            for d in created.disks.values():
                b.written.pop(d.file, None)
        return ()
