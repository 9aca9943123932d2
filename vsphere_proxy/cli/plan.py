"""`vsphere-proxy plan`: a dry run. For every VM of the job: why it was selected, the tier, mode and
reason of each proxy, and the proxies eligible in round 1; then the priority list and the first wave of
assignments the scheduler would make on idle proxies, each with its reason. Nothing is changed in vCenter."""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from vsphere_proxy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_OK,
    CommandError,
    add_config_argument,
    console,
    emit_json,
    line,
    read_config,
    styled,
    vcenter,
)
from vsphere_proxy.config import Config, ConfigError
from vsphere_proxy.coordinator import Assignment, Coordinator, Job, WorkVM
from vsphere_proxy.ledger import InMemoryLedger
from vsphere_proxy.model import Inventory, Proxy
from vsphere_proxy.proxies import resolve_proxies
from vsphere_proxy.selection import Selected, select_vms
from vsphere_proxy.tiers import TierTable, eligible_proxies, tier_table

HELP = "dry run: access tiers with reasons, the priority list and the first assignments the scheduler would make"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--round", type=int, default=1, help="show eligibility for this round (default 1)")
    p.add_argument("--explain", action="store_true",
                   help="give the reason of every (VM, proxy) pair and every scheduling decision")
    p.set_defaults(func=do_plan)


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


@dataclass(frozen=True)
class JobSetup:
    """A job as the configuration and vCenter's inventory define it, before it runs."""

    selected: list[Selected]
    proxies: list[Proxy]
    table: TierTable
    job: Job


def build_job(config: Config, inventory: Inventory, job_id: str | None = None) -> JobSetup:
    """Resolve the proxies, select the VMs (skips keep their reason), compute the tiers: the job to run."""
    try:
        proxies = resolve_proxies(config.job_proxies(), inventory)
    except ConfigError as e:
        raise CommandError(str(e), EXIT_BAD_INPUT) from None
    selected = select_vms(inventory, config.job.select, {p.name for p in proxies})
    table = tier_table((s.vm for s in selected if not s.skip), proxies, inventory)
    job = Job(job_id or config.job.name, tuple(WorkVM.from_vm(s.vm) for s in selected if not s.skip), table,
              tuple(proxies), config.job.policy.to_policy())
    return JobSetup(selected, proxies, table, job)


def make_plan(config: Config, inventory: Inventory, round_number: int = 1) -> Plan:
    if round_number < 1:
        raise CommandError(f"--round: must be 1 or more (got {round_number})", EXIT_BAD_INPUT)
    setup = build_job(config, inventory)
    selected, proxies, table, job = setup.selected, setup.proxies, setup.table, setup.job
    coordinator = Coordinator(job, InMemoryLedger(), explain=True)
    first_wave = coordinator.start()
    return Plan(selected, proxies, table, round_number, coordinator, first_wave)


def do_plan(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    with vcenter(config) as found:
        plan = make_plan(config, found.inventory, args.round)
    if args.json:
        emit_json(plan.to_json())
        return EXIT_OK
    out = console()
    data = plan.to_json()
    active = [p for p in plan.proxies if p.alive and p.vsda_active]
    out.print(line(styled(config.job.name, "bold"), f": {len(plan.selected)} VMs selected, "
                   f"{len(active)}/{len(plan.proxies)} proxies usable, round {plan.round}"))
    table = Table("VM", "best", f"round {plan.round}", *(p.name for p in plan.proxies), title="Access tiers")
    for v in data["vms"]:
        if "skipped" in v:
            table.add_row(v["vm"], "skip", v["skipped"], *("" for _ in plan.proxies))
            continue
        cells = [f"{c['tier']} {c['mode']}" if c["tier"] else "-" for c in (v["proxies"][p.name] for p in plan.proxies)]
        table.add_row(v["vm"], v["best_tier"] or "none", ", ".join(v["eligible"]) or "NONE", *cells)
    out.print(table)
    out.print(line(styled("Why", "bold"),
                   " (every pair)" if args.explain else f" (proxies eligible in round {plan.round})"))
    for v in data["vms"]:
        if "skipped" in v:
            continue
        shown = v["proxies"] if args.explain else {p: v["proxies"][p] for p in v["eligible"]}
        for proxy, c in shown.items():
            out.print(f"  {v['vm']} -> {proxy}: {c['mode'] or 'no access'}: {c['reason']}", soft_wrap=True)
    modes = Counter(c.mode or "no access" for c in plan.table.entries.values())
    out.print("pairs by mode: " + ", ".join(f"{n} {m}" for m, n in sorted(modes.items())))
    if data["unprotected"]:
        out.print(styled(f"no eligible proxy for: {', '.join(data['unprotected'])}", "red"), soft_wrap=True)
    out.print(line(styled("Priority list", "bold"), " (round 1: fewest eligible proxies first, then largest): ",
                   ", ".join(f"{e['vm']} ({e['eligible']})" for e in data["priority_list"])), soft_wrap=True)
    limits = ", ".join(f"{p} {n}" for p, n in data["stream_limits"].items())
    out.print(line(styled("First assignments", "bold"), f" on idle proxies (job limit {data['job_limit']} streams; "
                   f"proxy limits: {limits})"), soft_wrap=True)
    for a in data["first_assignments"]:
        extra = " (extra disk stream)" if a["extra"] else ""
        out.print(f"  {a['vm']} disk {a['disk']} -> {a['proxy']} ({a['mode']}){extra}"
                  + (f": {a['reason']}" if args.explain else ""), soft_wrap=True)
    if args.explain:
        out.print(styled("Decisions", "bold"))
        for d in data["decisions"]:
            if d["verdict"] in ("assign", "disk-stream"):
                continue
            who = " ".join(x for x in (d["vm"], f"on {d['proxy']}" if d["proxy"] else "") if x)
            out.print(f"  {d['verdict']}: {who + ': ' if who else ''}{d['reason']}", soft_wrap=True)
    return EXIT_OK
