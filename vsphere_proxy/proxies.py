"""Turn configured proxies into `Proxy` records, reading a VM proxy's facts from the inventory.

A VM proxy's CPUs, memory, ESXi host and the LUNs it sees (through RDM disks or HBAs passed through
to it) come from vCenter; a physical proxy's come from its configuration (its agent's report).
"""

from __future__ import annotations

from vsphere_proxy.config import ConfigError, ProxyConfig
from vsphere_proxy.model import Inventory, LunAccess, Proxy, ProxyKind


def _vm_proxy_luns(inventory: Inventory, vm_name: str) -> tuple[LunAccess, ...]:
    vm = inventory.vm_by_name[vm_name]
    host = inventory.host_by_name.get(vm.host)
    seen: dict[str, LunAccess] = {}
    for disk in vm.disks:
        if disk.backing.startswith("rdm") and disk.lun:
            seen.setdefault(disk.lun, LunAccess(disk.lun, f"RDM disk {disk.label!r} of {vm_name}"))
    if host is not None:
        for pci in vm.passthrough:
            hba = next((h for h in host.hbas if h.pci == pci), None)
            if hba is None:
                continue
            for lun in host.luns:
                if any(p.hba == hba.device for p in lun.paths):
                    seen.setdefault(lun.name, LunAccess(lun.name, f"{hba.device} passed through from {host.name}"))
    return tuple(sorted(seen.values(), key=lambda a: a.lun))


def resolve_proxies(configs: list[ProxyConfig], inventory: Inventory) -> list[Proxy]:
    """Build the fleet; a VM proxy missing from vCenter is a ConfigError naming it."""
    proxies = []
    for i, pc in enumerate(configs):
        exports = frozenset(pc.nfs_exports)
        if pc.kind == ProxyKind.PHYSICAL:
            proxies.append(Proxy(
                name=pc.name, kind=ProxyKind.PHYSICAL, cpus=pc.cpus or 0, ram_mb=pc.ram_mb or 0,
                vsda_active=pc.vsda_active, nbd=pc.nbd, nfs_exports=exports,
                luns=tuple(LunAccess(lun, f"reported by {pc.name}'s agent") for lun in pc.luns),
            ))
            continue
        vm = inventory.vm_by_name.get(pc.name)
        if vm is None:
            raise ConfigError(f"proxies[{i}].name: no VM named {pc.name!r} in vCenter (got {pc.name!r})")
        host = inventory.host_by_name.get(vm.host)
        down = ""
        if vm.power_state != "poweredOn":
            down = f"VM is {vm.power_state}"
        elif host is not None and host.connection_state != "connected":
            down = f"host {host.name} is {host.connection_state}"
        proxies.append(Proxy(
            name=pc.name, kind=ProxyKind.VM, cpus=pc.cpus or vm.cpus, ram_mb=pc.ram_mb or vm.memory_mb,
            alive=not down, down_reason=down, vsda_active=pc.vsda_active, host=vm.host, cluster=vm.cluster,
            luns=_vm_proxy_luns(inventory, pc.name), nfs_exports=exports, nbd=pc.nbd, vm_moref=vm.moref,
        ))
    return proxies
