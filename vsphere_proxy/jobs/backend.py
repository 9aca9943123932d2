"""What a job needs of vCenter, as one protocol (`VCenterBackend`): read the inventory, keep the session alive,
sweep what earlier jobs left behind, snapshot VMs for their attempts, and recreate VMs from restore points
(`Restorer`).

`adapters.backend.VSphereBackend` implements it with pyvmomi against a real vCenter (or the simulator);
`vsphere_proxy.jobs.fake_backend.FakeBackend` implements it in memory, for tests that need no vCenter or inject
faults a simulator cannot (a snapshot that fails, a disk that stops answering).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from vsphere_proxy.engine.attempt import Snapshotter
from vsphere_proxy.model import VM, Inventory, Proxy
from vsphere_proxy.transports import DiskSource

if TYPE_CHECKING:
    from vsphere_proxy.jobs.restore_plan import RestorePlan, VmRestorePlan
    from vsphere_proxy.transports.write import WriteTransport

__all__ = ["CreatedVm", "Restorer", "SnapshotPolicy", "Swept", "VCenterBackend"]


@dataclass(frozen=True)
class SnapshotPolicy:
    """How a job's snapshots are made and cleaned up: `policy.quiesce` (required | preferred | off),
    `quiesce_retries` and `consolidate` (auto | report).

    It is what a job passes as `snapshotter(..., policy=)`. A snapshot's notes (`VmSnapshot.notes`, read after
    `release()`) say what the policy did: a crash-consistent fall-back, disks consolidated or needing it.
    """

    quiesce: str = "off"
    quiesce_retries: int = 1
    consolidate: str = "auto"

    @property
    def quiesces(self) -> bool:
        """Whether powered-on VMs are snapshotted quiesced (at first: `preferred` may fall back)."""
        return self.quiesce != "off"

    @classmethod
    def of(cls, policy: Any) -> SnapshotPolicy:
        """From a job's `PolicyConfig` (its `quiesce`, `quiesce_retries` and `consolidate`)."""
        return cls(str(policy.quiesce), int(policy.quiesce_retries), str(policy.consolidate))


@dataclass(frozen=True)
class Swept:
    """What a sweep did: our snapshots removed and disks detached that earlier jobs left, and what it could not."""

    snapshots: tuple[str, ...] = ()  # "NAME (VM moref)", removed
    disks: tuple[str, ...] = ()  # "[datastore] path (proxy VM moref)", detached
    errors: tuple[str, ...] = ()  # what could not be removed or detached, with why

    def __add__(self, other: Swept) -> Swept:
        return Swept(self.snapshots + other.snapshots, self.disks + other.disks, self.errors + other.errors)


@dataclass(frozen=True)
class CreatedVm:
    """A VM a restore created, with its empty disks (by the restore point's disk index) and what else it made."""

    moref: str
    name: str
    disks: Mapping[int, DiskSource]  # point disk index -> the new VM's disk to write
    directories: tuple[str, ...] = ()  # "[datastore] dir" made for disks beside the VM's home
    attached: tuple[int, ...] = ()  # a disk restore: the device keys of the disks added to an existing VM


class Restorer(Protocol):
    """Recreates VMs from restore points (DESIGN §8), owned by one restore job."""

    def check(self, plans: Sequence[VmRestorePlan]) -> None:
        """What only vCenter can answer before anything is created (a folder or resource pool path): raises
        `BadJob` naming the option and the value."""

    def config_spec(self, plan: VmRestorePlan) -> dict[str, Any]:
        """The ConfigSpec the new VM is created with, as JSON (what `--dry-run` prints)."""

    def create(self, plan: RestorePlan) -> CreatedVm:
        """Create the VM with empty disks on their target datastores (a disk restore: add the empty disk to the
        existing VM on a free controller slot); on failure nothing is left."""

    def writer(self, created: CreatedVm, mode: str, proxy: str) -> WriteTransport:
        """The write transport of `mode` through which `proxy` writes the new VM's disks."""

    def complete(self, created: CreatedVm, plan: RestorePlan, nvram: bytes | None = None) -> tuple[str, ...]:
        """Once every disk is written: the NVRAM file (`nvram`, from the restore point), tags, custom
        attributes; the original replaced (with `--overwrite`) and the VM renamed to its final name; powered on
        when asked. Notes for the report; raises when the VM cannot be made whole (the caller then removes it)."""

    def remove(self, created: CreatedVm) -> tuple[str, ...]:
        """Delete the created VM and every file it made (a disk restore: the added disks and their files); what
        could not be removed (never raises)."""


class VCenterBackend(Protocol):
    datacenter: str

    def discover(self) -> Inventory:
        """The inventory as vCenter shows it now (tags included)."""

    def keep_alive(self) -> AbstractContextManager[object]:
        """While the block runs, the session is kept from expiring (vCenter ends idle sessions)."""

    def sweep(self, vms: Sequence[str], proxies: Sequence[str], *, spare: Callable[[str], bool] | None = None,
              job_id: str | None = None) -> Swept:
        """Remove our snapshots on the VMs and detach our disks from the proxy VMs (managed object ids). With
        `job_id`, only what that job made; with `spare(owner job)` true, what a live job made stays. Never
        raises for one item: what could not be removed is in `errors`."""

    def snapshotter(self, vms: Mapping[str, VM], proxies: Sequence[Proxy], job_id: str, *,
                    policy: SnapshotPolicy) -> Snapshotter:
        """Snapshots of the job's VMs, owned by `job_id`, read through the proxies' transports, made and cleaned up
        as the job's `policy` says (quiescing, consolidation)."""

    def restorer(self, inventory: Inventory, proxies: Sequence[Proxy], job_id: str) -> Restorer:
        """Restores of one job into the inventory's datacenter, written through the proxies' write transports."""
