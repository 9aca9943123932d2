"""What a job needs of vCenter, as one protocol (`VCenterBackend`): read the inventory, keep the session alive,
sweep what earlier jobs left behind, and snapshot VMs for their attempts.

`adapters.backend.VSphereBackend` implements it with pyvmomi against a real vCenter (or the simulator);
`vsphere_proxy.jobs.fake_backend.FakeBackend` implements it in memory, for tests that need no vCenter or inject
faults a simulator cannot (a snapshot that fails, a disk that stops answering).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from vsphere_proxy.engine.attempt import Snapshotter
from vsphere_proxy.model import VM, Inventory, Proxy

__all__ = ["Swept", "VCenterBackend"]


@dataclass(frozen=True)
class Swept:
    """What a sweep did: our snapshots removed and disks detached that earlier jobs left, and what it could not."""

    snapshots: tuple[str, ...] = ()  # "NAME (VM moref)", removed
    disks: tuple[str, ...] = ()  # "[datastore] path (proxy VM moref)", detached
    errors: tuple[str, ...] = ()  # what could not be removed or detached, with why

    def __add__(self, other: Swept) -> Swept:
        return Swept(self.snapshots + other.snapshots, self.disks + other.disks, self.errors + other.errors)


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
                    quiesce: bool) -> Snapshotter:
        """Snapshots of the job's VMs, owned by `job_id`, read through the proxies' transports."""
