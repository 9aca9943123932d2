"""What the embedded backup and a proxy worker share about running attempts: how each proxy reaches disks, how
an attempt's end is recorded, and the proxies' stream throttles."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from vsphere_proxy.catalog import Catalog, VmResult
from vsphere_proxy.config import Config
from vsphere_proxy.engine.embedded import AttemptEnd
from vsphere_proxy.model import VM, Proxy


def proxy_access(config: Config, proxies: Iterable[Proxy]) -> dict[str, Any]:
    """How each proxy reaches disks (adapters.backup.ProxyAccess): its VM, its mounts, its hot-add devices."""
    from adapters.backup import ProxyAccess
    from adapters.hotadd_transport import DiskUuidDevices, GuestDevices, SimulatedGuestDevices

    access = {}
    configs = {pc.name: pc for pc in config.proxies}
    for proxy in proxies:
        pc = configs[proxy.name]
        devices: GuestDevices | None = None
        if proxy.vm_moref:
            devices = SimulatedGuestDevices(pc.paths) if pc.hotadd_devices == "simulated" else DiskUuidDevices()
        access[proxy.name] = ProxyAccess(proxy.name, proxy.vm_moref, dict(pc.paths), devices)
    return access


def attempt_result(end: AttemptEnd) -> VmResult:
    """An attempt as the catalog keeps it."""
    return VmResult(vm=end.vm, round=end.round, attempt=end.attempt, proxy=end.proxy, mode=end.mode,
                    status="done" if end.ok else "stranded", bytes_read=end.bytes_read,
                    bytes_written=end.bytes_written, seconds=end.seconds, error=end.error, point_id=end.point_id)


def record_attempt(catalog: Catalog, job_id: str, end: AttemptEnd, vm: VM | None) -> None:
    catalog.record(job_id, attempt_result(end))
    if end.point_id and vm is not None:
        catalog.add_point(job_id, end.point_id, end.vm, len(vm.backup_disks), vm.total_bytes)


def throttles(config: Config) -> dict[str, float]:
    """proxy -> the most bytes per second one of its streams may read (proxies[].stream_mb_s)."""
    return {pc.name: pc.stream_mb_s * 1_000_000 for pc in config.proxies if pc.stream_mb_s}
