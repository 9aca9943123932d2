"""`vsphere-proxy plan`: the job's dry run (`vsphere_proxy.jobs.plan`), printed: access tiers with the reason of
each (VM, proxy) pair, the proxies eligible in a round, the priority list and the first assignments the scheduler
would make on idle proxies. Nothing is changed in vCenter."""

from __future__ import annotations

import argparse
from collections import Counter
from typing import Any

from rich.table import Table

from vsphere_proxy.cli.common import (
    EXIT_OK,
    add_config_argument,
    console,
    emit_json,
    job_failure,
    line,
    read_config,
    styled,
    vcenter,
)
from vsphere_proxy.jobs.errors import BadJob
from vsphere_proxy.jobs.plan import make_plan

HELP = "dry run: access tiers with reasons, the priority list and the first assignments the scheduler would make"


def build_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help=HELP, description=HELP)
    add_config_argument(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--round", type=int, default=1, help="show eligibility for this round (default 1)")
    p.add_argument("--explain", action="store_true",
                   help="give the reason of every (VM, proxy) pair and every scheduling decision")
    p.set_defaults(func=do_plan)


def do_plan(args: argparse.Namespace) -> int:
    config = read_config(args.config)
    with vcenter(config) as found:
        try:
            plan = make_plan(config, found.inventory, args.round)
        except BadJob as e:
            raise job_failure(e) from None
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
