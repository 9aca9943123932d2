"""Access modes and their tiers of preference (US 9563514, FIG. 6, blocks 602-606; DESIGN §3).

Every (VM, proxy) pair is classified by the mode the proxy would use to read the VM's disks:

    tier 1  san / direct-nfs  the proxy reads the datastore's LUN (or NFS export) itself
    tier 2  hotadd            the proxy is a VM whose ESXi host mounts every datastore of the VM
    tier 3  nbd               the proxy reads through the VM's ESXi host over the network

A VM with several datastores takes the worst tier over them. A proxy that is down or whose VSDA is not
active is never eligible. Falling back to a lower tier is a recorded decision: the reason says why the
better tiers were not available.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property
from operator import attrgetter

from vsphere_proxy.model import VM, Datastore, DatastoreKind, Inventory, Proxy, ProxyKind


class Tier(IntEnum):
    SAN = 1
    HOTADD = 2
    NBD = 3

    @property
    def label(self) -> str:
        return self.name.lower()


LAST_TIER = max(Tier)


@dataclass(frozen=True, slots=True)
class Classification:
    """The verdict for one (VM, proxy) pair: tier and mode, or None with the reason it has no access."""

    vm: str
    proxy: str
    tier: Tier | None
    mode: str | None  # san | direct-nfs | hotadd | nbd
    reason: str
    affinity: int = 2  # hotadd tie-break: 0 same host, 1 same cluster, 2 elsewhere

    @property
    def eligible(self) -> bool:
        return self.tier is not None


@dataclass(frozen=True, slots=True)
class _Access:
    tier: Tier | None
    mode: str | None
    reason: str


def _san_access(ds: Datastore, proxy: Proxy, inventory: Inventory) -> _Access:
    """Tier 1 for one datastore, or the reason it is not available."""
    if ds.kind is DatastoreKind.NFS:
        if ds.nfs_export in proxy.nfs_exports:
            return _Access(Tier.SAN, "direct-nfs", f"{proxy.name} mounts NFS export {ds.nfs_export} of {ds.name}")
        return _Access(None, None, f"{proxy.name} does not mount NFS export {ds.nfs_export} of {ds.name}")
    if ds.kind is DatastoreKind.LOCAL:
        return _Access(None, None, f"{ds.name} is on a local disk of {', '.join(ds.hosts) or 'its host'}")
    if ds.kind is not DatastoreKind.VMFS or not ds.extents:
        return _Access(None, None, f"{ds.name} ({ds.type}) has no LUN a proxy can read")
    reasons = []
    for lun in ds.extents:
        access = proxy.lun_access(lun)
        if access is None:
            return _Access(None, None, f"LUN {lun} of {ds.name} is not visible to {proxy.name}")
        paths = inventory.lun_paths(lun)
        active = [(host, p) for host, p in paths if p.active]
        if not active:
            states = ", ".join(f"{host} {p.name} {p.state}" for host, p in paths) or "no host path"
            return _Access(None, None, f"LUN {lun} of {ds.name} has no active path ({states})")
        host, path = active[0]
        reasons.append(f"LUN {lun} of {ds.name}: {access.via}; active path {path.name} on {host}")
    return _Access(Tier.SAN, "san", "; ".join(reasons))


def _hotadd_access(vm: VM, proxy: Proxy, inventory: Inventory) -> tuple[_Access, int]:
    if proxy.kind is not ProxyKind.VM:
        return _Access(None, None, f"{proxy.name} is a physical proxy (hot-add needs a VM proxy)"), 2
    if proxy.vm_moref == vm.moref:
        return _Access(None, None, f"{proxy.name} cannot hot-add its own disks"), 2
    host = inventory.host_by_name.get(proxy.host or "")
    if host is None:
        return _Access(None, None, f"ESXi host of {proxy.name} is unknown"), 2
    missing = [ds for ds in vm.datastores if ds not in host.datastores]
    if missing:
        return _Access(None, None, f"host {host.name} of {proxy.name} does not mount {', '.join(missing)}"), 2
    if host.name == vm.host:
        affinity, where = 0, "same host"
    elif host.cluster is not None and host.cluster == vm.cluster:
        affinity, where = 1, f"same cluster {host.cluster}"
    else:
        affinity, where = 2, "another cluster" if host.cluster else "standalone host"
    mounts = ", ".join(vm.datastores)
    return _Access(Tier.HOTADD, "hotadd", f"host {host.name} of {proxy.name} mounts {mounts} ({where})"), affinity


def classify_tier(vm: VM, proxy: Proxy, inventory: Inventory) -> Classification:
    """Classify one (VM, proxy) pair (US 9563514 FIG. 6 block 604): its tier, mode and reason."""
    def verdict(tier: Tier | None, mode: str | None, reason: str, affinity: int = 2) -> Classification:
        return Classification(vm.name, proxy.name, tier, mode, reason, affinity)

    if not proxy.alive:
        return verdict(None, None, f"{proxy.name} is down" + (f": {proxy.down_reason}" if proxy.down_reason else ""))
    if not proxy.vsda_active:
        return verdict(None, None, f"VSDA is not active on {proxy.name}")
    if not vm.datastores:
        return verdict(None, None, f"{vm.name} has no disk to back up")

    unknown = [name for name in vm.datastores if name not in inventory.datastore_by_name]
    if unknown:
        return verdict(None, None, f"datastore {', '.join(unknown)} of {vm.name} was not discovered")

    san = [_san_access(inventory.datastore_by_name[name], proxy, inventory) for name in vm.datastores]
    if all(a.tier is Tier.SAN for a in san):
        modes = {a.mode for a in san}
        mode = "san" if "san" in modes else "direct-nfs"
        return verdict(Tier.SAN, mode, "; ".join(a.reason for a in san))
    not_san = next(a.reason for a in san if a.tier is None)

    hotadd, affinity = _hotadd_access(vm, proxy, inventory)
    if hotadd.tier is Tier.HOTADD:
        return verdict(Tier.HOTADD, "hotadd", f"{hotadd.reason}; not san: {not_san}", affinity)

    if proxy.nbd:
        return verdict(Tier.NBD, "nbd",
                       f"network read through {vm.host or 'its host'}; not san: {not_san}; not hotadd: {hotadd.reason}")
    return verdict(None, None, f"no access path: not san: {not_san}; not hotadd: {hotadd.reason}; "
                               f"nbd disabled on {proxy.name}")


_RANK = attrgetter("tier", "affinity", "proxy")


@dataclass(frozen=True)
class TierTable:
    """The classification of every (VM, proxy) pair of a job, the input of every round."""

    entries: dict[tuple[str, str], Classification]

    @cached_property
    def _index(self) -> tuple[dict[str, list[Classification]], dict[str, dict[int, list[str]]]]:
        """One pass over the pairs: every verdict by VM, and the eligible proxies by VM and tier."""
        by_vm: dict[str, list[Classification]] = {}
        by_tier: dict[str, dict[int, list[str]]] = {}
        last: str | None = None
        verdicts: list[Classification] = []
        tiers: dict[int, list[str]] = {}
        for (vm, proxy), c in self.entries.items():
            if vm != last:  # a table is usually built VM by VM: look the VM up once per run of its pairs
                last = vm
                if vm in by_vm:
                    verdicts, tiers = by_vm[vm], by_tier[vm]
                else:
                    verdicts = by_vm[vm] = []
                    tiers = by_tier[vm] = {}
            verdicts.append(c)
            tier = c.tier
            if tier is not None:
                names = tiers.get(tier)
                if names is None:
                    tiers[tier] = [proxy]
                else:
                    names.append(proxy)
        return by_vm, by_tier

    @property
    def _by_vm(self) -> dict[str, list[Classification]]:
        return self._index[0]

    @cached_property
    def _ranked(self) -> dict[str, tuple[list[Classification], list[int]]]:
        """Per VM: its eligible classifications best first (tier, affinity, proxy) and their tiers."""
        ranked: dict[str, tuple[list[Classification], list[int]]] = {}
        for vm, classifications in self._by_vm.items():
            chosen = [c for c in classifications if c.tier is not None]
            chosen.sort(key=_RANK)
            ranked[vm] = (chosen, [c.tier for c in chosen if c.tier is not None])
        return ranked

    @classmethod
    def declared(cls, tiers: Mapping[str, Mapping[str, Tier | None]], reason: str = "declared") -> TierTable:
        """A table from known tiers, {vm: {proxy: tier}}: what a scenario file or a test states directly."""
        modes = {Tier.SAN: "san", Tier.HOTADD: "hotadd", Tier.NBD: "nbd"}
        return cls({(vm, proxy): Classification(vm, proxy, tier, modes[tier] if tier else None,
                                                f"{reason} {modes[tier]}" if tier else f"{reason}: no access")
                    for vm, row in tiers.items() for proxy, tier in row.items()})

    def for_vm(self, vm: str) -> list[Classification]:
        """Every proxy's verdict for `vm`, by proxy name."""
        return sorted(self._by_vm.get(vm, ()), key=lambda c: c.proxy)

    def get(self, vm: str, proxy: str) -> Classification | None:
        return self.entries.get((vm, proxy))

    def best_tier(self, vm: str) -> Tier | None:
        tiers = self._index[1].get(vm)
        return Tier(min(tiers)) if tiers else None

    def eligible_names(self, vm: str, round_number: int, serving: frozenset[str] | None = None) -> frozenset[str]:
        """The names of the proxies `eligible` returns, unordered, restricted to `serving` when given: what the
        scheduler needs, and cheaper. Used by `eligible_proxies`."""
        tiers = self._index[1].get(vm)
        if not tiers:
            return frozenset()
        limit = allowed_tier(Tier(min(tiers)), round_number)
        admitted = [names for tier, names in tiers.items() if tier <= limit]
        picked = admitted[0] if len(admitted) == 1 else [p for names in admitted for p in names]
        return frozenset(picked) if serving is None else serving.intersection(picked)

    def eligible(self, vm: str, round_number: int) -> tuple[Classification, ...]:
        """See `eligible_proxies`; a slice of a precomputed ranking, cheap enough for 10,000 x 200 pairs."""
        chosen, tiers = self._ranked.get(vm, ((), ()))
        if not tiers:
            return ()
        return tuple(chosen[:bisect_right(tiers, allowed_tier(Tier(tiers[0]), round_number))])

    @property
    def vms(self) -> list[str]:
        return sorted(self._by_vm)


def tier_table(vms: Iterable[VM], proxies: Sequence[Proxy], inventory: Inventory) -> TierTable:
    """Classify every (VM, proxy) pair."""
    return TierTable({(vm.name, p.name): classify_tier(vm, p, inventory) for vm in vms for p in proxies})


def allowed_tier(best: Tier, round_number: int) -> Tier:
    """The lowest tier a round admits: round 1 only the VM's best tier, round k every tier <= k."""
    if round_number < 1:
        raise ValueError(f"round {round_number}: rounds start at 1")
    return Tier(min(max(best, round_number), LAST_TIER))


class Eligible:
    """The answer of `eligible_proxies` for one VM in one round.

    `names` is the set of eligible proxies, unordered: what the scheduler reads (membership, and the count the
    priority list sorts by). Iterating yields their classifications best first, ranked only when asked for.
    """

    __slots__ = ("_round", "_table", "_vm", "names")

    def __init__(self, names: frozenset[str], vm: str, round_number: int, table: TierTable) -> None:
        self.names = names
        self._vm, self._round, self._table = vm, round_number, table

    def __iter__(self) -> Iterator[Classification]:
        names = self.names
        return (c for c in self._table.eligible(self._vm, self._round) if c.proxy in names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return f"Eligible({self._vm!r}, round {self._round}: {sorted(self.names)})"


def eligible_proxies(vm: str, round_number: int, table: TierTable, *,
                     serving: frozenset[str] | None = None) -> Eligible:
    """The proxies eligible to back up `vm` in a round (US 9563514 FIG. 6 block 606; DESIGN §3).

    Round 1 admits only the VM's best available tier; round k admits every tier <= k, so lower tiers
    join in later rounds to stop stranded VMs from being stranded again. The best tier is the VM's over the
    whole table. `serving`, when given, names the proxies that can serve at all (the coordinator's: not down,
    stream limit above 0); a proxy outside it is never eligible. Iterated, the answer is ordered best first:
    tier, then hot-add affinity (same host, same cluster), then proxy name.
    """
    return Eligible(table.eligible_names(vm, round_number, serving), vm, round_number, table)
