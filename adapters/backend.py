"""`VSphereBackend`: the `vsphere_proxy.jobs.backend.VCenterBackend` of a real vCenter (or the simulator),
over one logged-in pyvmomi `Session`: discovery through the PropertyCollector, sweeps of our snapshots and
hot-added disks, and snapshotters whose transports read disks as each proxy reaches them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager

from adapters.backup import ProxyAccess, VSphereSnapshotter
from adapters.discovery import discover
from adapters.hotadd import sweep_attached
from adapters.hotadd_transport import DiskUuidDevices, GuestDevices, SimulatedGuestDevices
from adapters.restore_vm import VSphereRestorer
from adapters.session import Session
from adapters.snapshots import sweep_snapshots
from vsphere_proxy.config import ProxyConfig
from vsphere_proxy.jobs.backend import SnapshotPolicy, Swept
from vsphere_proxy.model import VM, Inventory, Proxy


def proxy_access(configs: Iterable[ProxyConfig], proxies: Iterable[Proxy]) -> dict[str, ProxyAccess]:
    """How each proxy reaches disks: its VM, its mounted datastores, how its guest names a hot-added disk."""
    by_name = {pc.name: pc for pc in configs}
    access = {}
    for proxy in proxies:
        pc = by_name[proxy.name]
        devices: GuestDevices | None = None
        if proxy.vm_moref:
            devices = SimulatedGuestDevices(pc.paths) if pc.hotadd_devices == "simulated" else DiskUuidDevices()
        access[proxy.name] = ProxyAccess(proxy.name, proxy.vm_moref, dict(pc.paths), devices)
    return access


class VSphereBackend:
    def __init__(self, session: Session, proxies: Sequence[ProxyConfig], datacenter: str = "") -> None:
        self.session = session
        self.proxy_configs = tuple(proxies)
        self.datacenter = datacenter

    def discover(self, *, tags: bool = True) -> Inventory:
        if not tags:
            inventory = discover(self.session)
        else:
            with self.session.tag_client() as client:
                inventory = discover(self.session, tags=client)
        self.datacenter = inventory.datacenter
        return inventory

    def keep_alive(self) -> AbstractContextManager[object]:
        return self.session.keep_alive()

    def sweep(self, vms: Sequence[str], proxies: Sequence[str], *, spare: Callable[[str], bool] | None = None,
              job_id: str | None = None) -> Swept:
        snaps = sweep_snapshots(self.session, vms, spare=spare, job_id=job_id) if vms else []
        disks = sweep_attached(self.session, proxies, spare=spare, job_id=job_id) if proxies else []
        return Swept(
            snapshots=tuple(f"{s.name} ({s.vm_moref})" for s in snaps if s.removed),
            disks=tuple(f"{d.disk.file} ({d.disk.proxy_moref})" for d in disks if d.detached),
            errors=tuple([f"snapshot {s.name} on {s.vm_moref}: {s.error}" for s in snaps if s.error]
                         + [f"disk {d.disk.file} on {d.disk.proxy_moref}: {d.error}" for d in disks if d.error]))

    def snapshotter(self, vms: Mapping[str, VM], proxies: Sequence[Proxy], job_id: str, *,
                    policy: SnapshotPolicy) -> VSphereSnapshotter:
        return VSphereSnapshotter(self.session, self.datacenter, vms, proxy_access(self.proxy_configs, proxies),
                                  job_id, policy=policy)

    def restorer(self, inventory: Inventory, proxies: Sequence[Proxy], job_id: str) -> VSphereRestorer:
        return VSphereRestorer(self.session, inventory, proxy_access(self.proxy_configs, proxies), job_id)
