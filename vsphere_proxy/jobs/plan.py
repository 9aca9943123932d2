"""A dry run of the job: for every VM, why it was selected, the tier, mode and reason of each proxy, and the
proxies eligible in a round; then the priority list and the first wave of assignments the scheduler would make
on idle proxies, each with its reason. Nothing is changed anywhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vsphere_proxy.config import Config
from vsphere_proxy.coordinator import Assignment, Coordinator
from vsphere_proxy.jobs.errors import BadJob
from vsphere_proxy.jobs.setup import build_job
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.model import Inventory, Proxy
from vsphere_proxy.selection import Selected
from vsphere_proxy.tiers import TierTable, eligible_proxies


@dataclass(frozen=True)
class Plan:
    selected: list[Selected]
    proxies: list[Proxy]
    table: TierTable
    round: int
    coordinator: Coordinator
    first_wave: list[Assignment]

    def to_json(self) -> dict[str, Any]:
        vms = []
        for s in self.selected:
            entry: dict[str, Any] = {"vm": s.vm.name, "selected_by": s.because, "total_bytes": s.vm.total_bytes,
                                     "datastores": list(s.vm.datastores)}
            if s.skip:
                entry["skipped"] = s.skip
                vms.append(entry)
                continue
            best = self.table.best_tier(s.vm.name)
            entry["best_tier"] = best.label if best else None
            entry["eligible"] = [c.proxy for c in eligible_proxies(s.vm.name, self.round, self.table)]
            entry["proxies"] = {
                c.proxy: {"tier": int(c.tier) if c.tier else None, "mode": c.mode, "reason": c.reason}
                for c in self.table.for_vm(s.vm.name)
            }
            vms.append(entry)
        return {
            "round": self.round,
            "proxies": [{"name": p.name, "kind": p.kind.value, "cpus": p.cpus, "ram_mb": p.ram_mb, "alive": p.alive,
                         "vsda_active": p.vsda_active, "host": p.host, "luns": [a.lun for a in p.luns],
                         "nfs_exports": sorted(p.nfs_exports)} for p in self.proxies],
            "vms": vms,
            "unprotected": [v["vm"] for v in vms if "skipped" not in v and not v["eligible"]],
            "job_limit": self.coordinator.job.limit,
            "stream_limits": self.coordinator.limits,
            "priority_list": [{"vm": e.vm, "eligible": len(e.eligible), "total_bytes": e.total_bytes}
                              for e in self.coordinator.priority],
            "first_assignments": [{"vm": a.vm, "proxy": a.proxy, "mode": a.mode, "disk": a.disk, "stream": a.stream,
                                   "extra": a.extra, "reason": a.reason} for a in self.first_wave],
            "decisions": [{"verdict": d.verdict, "vm": d.vm, "proxy": d.proxy, "reason": d.reason,
                           "scores": dict(d.scores)} for d in self.coordinator.decisions],
        }


def make_plan(config: Config, inventory: Inventory, round_number: int = 1) -> Plan:
    if round_number < 1:
        raise BadJob(f"--round: must be 1 or more (got {round_number})")
    setup = build_job(config, inventory)
    selected, proxies, table, job = setup.selected, setup.proxies, setup.table, setup.job
    coordinator = Coordinator(job, InMemoryLedger(), explain=True)
    first_wave = coordinator.start()
    return Plan(selected, proxies, table, round_number, coordinator, first_wave)
