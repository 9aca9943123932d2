"""A what-if scenario for the backup-window simulator: proxies, datastores, VMs, access tiers, failures.

One YAML (or JSON) file, validated by pydantic; a bad field is one line naming it and its value. Sizes are
GiB, rates MiB/s. Disk k of a VM is on `datastores[k]` (cycling); an entry that is itself a list is taken in
turn by the VMs of a group: a VM entry with `count` stands for many alike VMs, its `name` holds `{n}` (e.g.
`web-{n:03d}`).

    name: skewed
    rates_mib_s: {san: 300, direct-nfs: 250, hotadd: 200, nbd: 60}    # per stream, by access mode
    policy: {max_streams: 24}                                         # as in the job config
    proxies:
      - {name: phys-01, kind: physical, cpus: 4, ram_mb: 8192, rates_mib_s: {san: 400}}
    datastores:
      - {name: vmfs-fc-01, mib_s: 1500}                                # shared by its active streams
    vms:
      - {name: sap-01, disks_gib: [1200, 80], datastores: [vmfs-fc-01], tiers: {phys-01: san, "*": nbd}}
      - {name: "web-{n:03d}", count: 40, disks_gib: [30, 8], datastores: [vmfs-fc-01, [local-01, local-02]],
         tiers: {"*": nbd}}
    failures:
      - {proxy: phys-01, down_at_s: 1800}
      - {vm: sap-01, fails: 2, after_fraction: 0.5}
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from vsphere_proxy.config import ConfigError, Name, PolicyConfig, _Strict, read_yaml_mapping, validate
from vsphere_proxy.coordinator import Policy, WorkDisk, WorkVM
from vsphere_proxy.model import Proxy, ProxyKind
from vsphere_proxy.tiers import Classification, Tier, TierTable

GIB = 1 << 30
MIB = 1 << 20
MODES: dict[str, Tier | None] = {"san": Tier.SAN, "direct-nfs": Tier.SAN, "hotadd": Tier.HOTADD, "nbd": Tier.NBD,
                                 "none": None}
Mode = Literal["san", "direct-nfs", "hotadd", "nbd"]
Rate = Annotated[float, Field(gt=0, le=1e6)]


class ProxySpec(_Strict):
    name: Name
    kind: Literal["vm", "physical"] = "physical"
    cpus: Annotated[int, Field(ge=0, le=4096)]
    ram_mb: Annotated[int, Field(ge=0, le=1 << 24)]
    rates_mib_s: dict[Mode, Rate] = Field(default_factory=dict)
    max_mib_s: Rate | None = None  # the proxy's own ceiling (NIC, CPU), shared by its streams


class DatastoreSpec(_Strict):
    name: Name
    mib_s: Rate  # aggregate read bandwidth shared by its active streams


class VmSpec(_Strict):
    name: Annotated[str, Field(min_length=1, max_length=80)]
    count: Annotated[int, Field(ge=1, le=1_000_000)] = 1
    disks_gib: Annotated[list[Annotated[float, Field(gt=0, le=1 << 20)]], Field(min_length=1, max_length=64)]
    datastores: Annotated[list[Name | Annotated[list[Name], Field(min_length=1)]], Field(min_length=1)]
    tiers: dict[str, Literal["san", "direct-nfs", "hotadd", "nbd", "none"]]  # proxy (or "*") -> mode

    @model_validator(mode="after")
    def _name(self) -> VmSpec:
        if self.count > 1 and "{n" not in self.name:
            raise ValueError("name: needs {n} (e.g. web-{n:03d}) when count > 1")
        try:
            self.name.format(n=1)
        except (KeyError, IndexError, ValueError):
            raise ValueError(f"name: only {{n}} may be formatted (got {self.name!r})") from None
        return self


class FailureSpec(_Strict):
    proxy: Name | None = None
    down_at_s: Annotated[float, Field(ge=0)] | None = None
    reason: str = "stopped answering"
    vm: str | None = None
    fails: Annotated[int, Field(ge=1, le=100)] = 1
    after_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.5  # of its first disk, each failing attempt

    @model_validator(mode="after")
    def _one(self) -> FailureSpec:
        if (self.proxy is None) == (self.vm is None):
            raise ValueError("give either proxy (with down_at_s) or vm (with fails)")
        if self.proxy is not None and self.down_at_s is None:
            raise ValueError("down_at_s: needed with proxy")
        return self


class ScenarioSpec(_Strict):
    name: Name
    description: str = ""
    rates_mib_s: dict[Mode, Rate]
    policy: PolicyConfig = PolicyConfig()
    proxies: Annotated[list[ProxySpec], Field(min_length=1)]
    datastores: Annotated[list[DatastoreSpec], Field(min_length=1)]
    vms: Annotated[list[VmSpec], Field(min_length=1)]
    failures: list[FailureSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _references(self) -> ScenarioSpec:
        proxies = {p.name for p in self.proxies}
        datastores = {d.name for d in self.datastores}
        for i, vm in enumerate(self.vms):
            for ds in (d for entry in vm.datastores for d in ([entry] if isinstance(entry, str) else entry)):
                if ds not in datastores:
                    raise ValueError(f"vms[{i}].datastores: {ds!r} is not one of the datastores")
            for proxy, mode in vm.tiers.items():
                if proxy != "*" and proxy not in proxies:
                    raise ValueError(f"vms[{i}].tiers: {proxy!r} is not one of the proxies")
                if mode == "hotadd" and proxy != "*" and next(p for p in self.proxies if p.name == proxy).kind != "vm":
                    raise ValueError(f"vms[{i}].tiers.{proxy}: hotadd needs a VM proxy")
        for i, f in enumerate(self.failures):
            if f.proxy is not None and f.proxy not in proxies:
                raise ValueError(f"failures[{i}].proxy: {f.proxy!r} is not one of the proxies")
        return self


@dataclass(frozen=True)
class ProxyDown:
    proxy: str
    at_s: float
    reason: str


@dataclass(frozen=True)
class VmFailure:
    vm: str
    fails: int
    after_fraction: float


@dataclass(frozen=True)
class Scenario:
    """A scenario ready to simulate: the job's inputs plus the physics (rates, caps) and the failures."""

    name: str
    description: str
    policy: Policy
    proxies: tuple[Proxy, ...]
    vms: tuple[WorkVM, ...]
    table: TierTable
    rates: dict[tuple[str, str], float]  # (proxy, mode) -> bytes/s per stream
    proxy_caps: dict[str, float]  # proxy -> bytes/s, when it has a ceiling
    datastore_caps: dict[str, float]  # datastore -> bytes/s
    proxy_downs: tuple[ProxyDown, ...]
    vm_failures: dict[str, VmFailure]

    def rate(self, proxy: str, mode: str) -> float:
        return self.rates[(proxy, mode)]


def _datastore(entry: str | list[str], n: int) -> str:
    """Disk k of VM n: a name, or a list the VMs of a group take in turn."""
    return entry if isinstance(entry, str) else entry[(n - 1) % len(entry)]


def build(spec: ScenarioSpec, source: str = "scenario") -> Scenario:
    modes = ("san", "direct-nfs", "hotadd", "nbd")
    rates = {}
    for p in spec.proxies:
        for m in modes:
            rate = p.rates_mib_s.get(m, spec.rates_mib_s.get(m))  # type: ignore[call-overload]
            if rate is not None:
                rates[(p.name, m)] = rate * MIB
    proxies = tuple(Proxy(p.name, ProxyKind(p.kind), p.cpus, p.ram_mb) for p in spec.proxies)
    vms: list[WorkVM] = []
    entries: dict[tuple[str, str], Classification] = {}
    for i, v in enumerate(spec.vms):
        for n in range(1, v.count + 1):
            name = v.name.format(n=n)
            disks = tuple(WorkDisk(k, int(gib * GIB), _datastore(v.datastores[k % len(v.datastores)], n))
                          for k, gib in enumerate(v.disks_gib))
            vms.append(WorkVM(name, disks))
            for p in spec.proxies:
                mode = v.tiers.get(p.name, v.tiers.get("*", "none"))
                tier = MODES[mode]
                if tier is not None and (p.name, mode) not in rates:
                    raise ConfigError(f"{source}: vms[{i}].tiers.{p.name}: no rate for mode {mode!r}; "
                                      f"add it to rates_mib_s")
                if mode == "hotadd" and p.kind != "vm":
                    tier, mode = None, "none"
                entries[(name, p.name)] = Classification(
                    name, p.name, tier, mode if tier else None,
                    f"scenario: {mode}" if tier else "scenario: no access")
    names = [v.name for v in vms]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{source}: vms: {dup!r} is named twice")
    failures = {}
    for f in spec.failures:
        if f.vm is not None:
            if f.vm not in set(names):
                raise ConfigError(f"{source}: failures: vm {f.vm!r} is not one of the VMs")
            failures[f.vm] = VmFailure(f.vm, f.fails, f.after_fraction)
    downs = tuple(sorted((ProxyDown(f.proxy, f.down_at_s, f.reason) for f in spec.failures
                          if f.proxy is not None and f.down_at_s is not None), key=lambda d: d.at_s))
    return Scenario(spec.name, spec.description, spec.policy.to_policy(), proxies, tuple(vms), TierTable(entries),
                    rates, {p.name: p.max_mib_s * MIB for p in spec.proxies if p.max_mib_s},
                    {d.name: d.mib_s * MIB for d in spec.datastores}, downs, failures)


def parse_scenario(data: Any, source: str = "scenario") -> Scenario:
    return build(validate(ScenarioSpec, data, source), source)


def load_scenario(path: Path) -> Scenario:
    """Read and validate a scenario file; every problem is a one-line ConfigError."""
    return parse_scenario(read_yaml_mapping(path, "name, rates_mib_s, proxies, datastores and vms"), str(path))
